"""How big each benchmark is: the full run (`make bench`), `--quick`, and the smoke test's size."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Size:
    name: str
    repeats: int
    """Interleaved rounds (A B C, A B C, ...) of every comparison."""
    fashion_steps: int = 210
    """Optimizer steps of each fashion-cnn throughput run (the first 7 are warm-up)."""
    fashion_checkpoint_every: int = 100
    """Checkpoint interval of the throughput runs, in steps, for every contender."""
    alexnet_steps: int = 14
    """Optimizer steps of each AlexNet throughput run; 0 leaves AlexNet out.  With a checkpoint
    every 7, each contender pays for one checkpoint inside the timing (steps 8-14): its save at
    step 14, and for gradyard also step 7's background write, which runs beside steps 8-14
    (step 7's hand-off, and the plain scripts' whole save at step 7, end before the timing)."""
    alexnet_checkpoint_every: int = 7
    alexnet_batch_size: int = 4
    """Per-worker batch of AlexNet on CPU (small: the 30-minute budget of `make bench`)."""
    checkpoint_rounds: int = 5
    """Checkpoints taken per storage in the AlexNet-state checkpoint benchmark."""
    recovery_rounds: int = 5
    """SIGKILLs (each followed by a restart and a resume) in the recovery benchmark's run."""
    short_steps: int = 12
    """Steps of the start-up and submission runs (only the first one is timed)."""
    telemetry_ab_steps: int = 600
    """Steps of each arm in each in-run telemetry on/off comparison (turns of 25 steps)."""
    submit_warmup: bool = True
    """Cache the working directory on the cluster with one untimed submission first."""
    telemetry_even_runs: bool = True
    """An even number of telemetry in-run comparisons, each arm first in half of them (the smoke
    runs one: it checks that the comparison runs, not what it finds)."""

    def with_repeats(self, n: int) -> "Size":
        return replace(self, repeats=n, checkpoint_rounds=n, recovery_rounds=n)


FULL = Size("full", repeats=5)
QUICK = Size("quick", repeats=2, fashion_steps=110, fashion_checkpoint_every=50, alexnet_steps=10,
             alexnet_checkpoint_every=5, alexnet_batch_size=2, checkpoint_rounds=2,
             recovery_rounds=2, short_steps=12, telemetry_ab_steps=300)
SMOKE = Size("smoke", repeats=1, fashion_steps=30, fashion_checkpoint_every=10, alexnet_steps=0,
             checkpoint_rounds=1, recovery_rounds=1, short_steps=12, submit_warmup=False,
             telemetry_ab_steps=150, telemetry_even_runs=False)
