"""How big each benchmark is: the full run (`make bench`), `--quick`, and the smoke test's size."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Size:
    name: str
    repeats: int
    """Interleaved rounds (A B C, A B C, ...) of every comparison; intervals need 3 or more."""
    fashion_steps: int = 210
    """Optimizer steps of each fashion-cnn throughput run (the first STEADY_AFTER_STEPS are warm-up)."""
    fashion_checkpoint_every: int = 100
    alexnet_steps: int = 14
    """Optimizer steps of each AlexNet throughput run; 0 leaves AlexNet out."""
    alexnet_checkpoint_every: int = 1000
    """A realistic interval: minutes of training between checkpoints, so none falls in the timing."""
    alexnet_stress_every: int = 7
    """The stress case: a 228 MB checkpoint to S3 every 7 steps (one inside the timing, steps 8-14)."""
    alexnet_batch_size: int = 4
    checkpoint_rounds: int = 5
    """Checkpoints taken per storage in the checkpoint benchmark."""
    checkpoint_state: str = "alexnet"
    """Whose state the checkpoint benchmark writes: `alexnet` (0.49 GB) or `fashion-cnn` (small)."""
    recovery_rounds: int = 5
    fault_rounds: int = 3
    telemetry_ab_steps: int = 600
    """Steps of each arm of each in-run telemetry comparison (turns of 25 steps)."""
    telemetry_runs: int = 4
    """In-run comparisons; even, so each arm goes first in half of them."""
    profile_hz: int = 500
    short_steps: int = 12
    """Steps of the start-up runs (only the first step is timed)."""
    embedded_startup: bool = True
    """Start-up measured on embedded clusters; the smoke reads its rounds from the submissions instead
    (two more Ray start-ups would double its time; `gradyard run` without a cluster runs in other tests)."""
    local_rounds: bool = True
    """The contenders checkpointing to local disk."""
    s3_rounds: bool = True
    """The contenders checkpointing to S3 (all of them, to the same server)."""

    def with_repeats(self, n: int) -> "Size":
        return replace(self, repeats=n, checkpoint_rounds=n, recovery_rounds=n, fault_rounds=n,
                       telemetry_runs=n + n % 2)


FULL = Size("full", repeats=4)
QUICK = Size("quick", repeats=3, fashion_steps=110, fashion_checkpoint_every=50, alexnet_steps=10,
             alexnet_stress_every=5, alexnet_batch_size=2, checkpoint_rounds=3, recovery_rounds=3,
             fault_rounds=3, telemetry_ab_steps=300, telemetry_runs=2)
SMOKE = Size("smoke", repeats=1, fashion_steps=20, fashion_checkpoint_every=10, alexnet_steps=0,
             checkpoint_rounds=1, checkpoint_state="fashion-cnn", recovery_rounds=1, fault_rounds=1,
             telemetry_ab_steps=100, telemetry_runs=1, profile_hz=200, short_steps=8, local_rounds=False,
             embedded_startup=False)
