"""The benchmarks still run: each once at smoke size (a few steps, one round), so none rots.

Not a measurement (`make bench` is).  `python -m bench` starts its own Ray
cluster and S3 server on loopback and stops only its own processes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

ALL = ["throughput", "telemetry", "checkpoint", "recovery", "faults", "submit", "startup"]


@pytest.mark.parametrize("job", ["fashion-cnn", "alexnet"])
def test_plain_scripts_train_the_same_model_as_gradyard(job):
    sys.path.insert(0, str(ROOT))
    try:
        from bench.contenders import Workload

        assert Workload(job, steps=20, checkpoint_every=10).check_same_model() > 0
        from bench.scripts.plain_models import WARMUP_STEPS
        from gradyard.trainer import STEADY_AFTER_STEPS

        assert WARMUP_STEPS == STEADY_AFTER_STEPS  # every contender times the same steps
    finally:
        sys.path.remove(str(ROOT))


@pytest.mark.ray
def test_every_benchmark_runs_once(tmp_path):
    results, page = tmp_path / "latest.json", tmp_path / "benchmarks.md"
    r = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--results",
                        str(results), "--docs", str(page)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    doc = json.loads(results.read_text())
    assert sorted(doc["benchmarks"]) == sorted(ALL)
    for name, b in doc["benchmarks"].items():
        assert b["status"] == "ok", (name, b.get("error"))

    tp = doc["benchmarks"]["throughput"]["workloads"]["fashion-cnn"]
    for contender, s in tp["steps_per_second"].items():
        assert s["n"] == 1 and s["median"] > 0, contender
    assert {"gradyard_local/ray_train", "gradyard_s3/torchrun"} <= set(tp["ratios"])
    assert [x["host_allocator"]["tuned"] for x in tp["raw"]["gradyard_local"]] == [True]
    assert doc["benchmarks"]["telemetry"]["step_time_ratio_on_over_off"]["n"] == 1  # smoke: one comparison
    prof = doc["benchmarks"]["telemetry"]["profile"]  # at smoke size whether or not the target is met
    assert "error" not in prof, prof
    on, off = prof["arms"]["on"]["categories"], prof["arms"]["off"]["categories"]
    assert sum(v for k, v in on.items() if k.startswith("telemetry:")) > 0
    assert "telemetry: DDP comm hook (its Python, not the allreduce)" not in off  # no hook in that arm
    assert on.get("compute: backward + DDP allreduce", 0) > 0 and off.get("compute: backward + DDP allreduce", 0) > 0
    ck = doc["benchmarks"]["checkpoint"]
    assert ck["parameters"] == 61_100_840 and ck["checkpoint_bytes"] > 4e8
    assert ck["upload"]["ratio"]["median"] > 0
    for state in (ck["cpu_seconds_per_checkpoint"], ck["small_state"]["cpu_seconds_per_checkpoint"]):
        assert state["writer_s3"]["median"] > 0 and state["s3_server"]["n"] > 0
    assert ck["s3_server_profile"]["samples"] > 0  # py-spy could attach to the S3 server
    assert doc["benchmarks"]["recovery"]["seconds_to_first_resumed_step"]["median"] > 0
    sub = doc["benchmarks"]["submit"]
    assert not sub["available"] or sub["seconds_to_first_step"]["gradyard"]["median"] > 0
    assert doc["benchmarks"]["startup"]["seconds_to_first_step"]["ray_train"]["median"] > 0

    text = page.read_text()
    assert "do not quote" in text and "## 5. Start-up on an embedded cluster" in text
    assert "AKIA" not in text and "gy-bench-not-a-secret" not in text  # no S3 key on the page


@pytest.mark.unit
def test_profile_keeps_one_off_census_out_of_the_loop_shares():
    """The census and FLOP count of steps 1-7 precede the timed steps: not shares of the loop."""
    sys.path.insert(0, str(ROOT))
    try:
        from bench.profile import ONE_OFF, parse_raw
    finally:
        sys.path.remove(str(ROOT))
    top = 'process 7:"ray::RayTrainWorker";MainThread;Trainer.fit (gradyard/trainer.py:360)'
    raw = "\n".join([
        f"{top};Trainer.train_step (gradyard/trainer.py:280);Tensor.backward (torch/_tensor.py:600) 10",
        f"{top};Trainer.fire (gradyard/trainer.py:240);CensusCallback.on_event (gradyard/analysis/callback.py:100);"
        "CensusMode.__torch_dispatch__ (gradyard/analysis/census.py:300) 5",
        f"{top};Trainer.train_step (gradyard/trainer.py:280);Module._call_impl (torch/nn/modules/module.py:1);"
        "FlopCounterMode.__torch_dispatch__ (torch/utils/flop_counter.py:700) 1",
        # Their dispatch on the other steps is per-step cost of the callback, not one-off.
        f"{top};Trainer.fire (gradyard/trainer.py:240);CensusCallback.on_event (gradyard/analysis/callback.py:92) 4",
        # The comm hook's wait for the allreduce is DDP's own wait, in backward.
        f"{top};Trainer.train_step (gradyard/trainer.py:280);Tensor.backward (torch/_tensor.py:600);"
        "GradSyncMonitor._hook (gradyard/telemetry/comm.py:190);allreduce_and_wait (gradyard/telemetry/comm.py:78) 7",
        f"{top};Trainer.fire (gradyard/trainer.py:240);GradSyncMonitor.on_event (gradyard/telemetry/comm.py:150) 2",
        'process 7:"ray::RayTrainWorker";writer;BackgroundWriter._run (gradyard/checkpoint/writer.py:210) 3',
    ])
    got = parse_raw(raw)
    cats = {k: v["samples"] for k, v in got["categories"].items()}
    assert got["samples"] == 32 and got["loop_samples"] == 23
    assert cats[ONE_OFF] == 6 and cats["background: checkpoint writer thread"] == 3
    assert cats["compute: backward + DDP allreduce"] == 17
    assert cats["gradyard: gradyard.telemetry.comm (GradSyncMonitor)"] == 2
    assert cats["gradyard: gradyard.analysis.callback (CensusCallback)"] == 4


@pytest.mark.unit
def test_telemetry_profile_tells_the_arms_and_telemetrys_own_code_apart():
    """The A/B profile counts each arm's thread apart; the hook's allreduce wait is backward, as without it."""
    sys.path.insert(0, str(ROOT))
    try:
        from bench.profile import BACKWARD, parse_ab_raw
        from bench.report import _telemetry_profile
    finally:
        sys.path.remove(str(ROOT))
    fit = "Thread.run (threading.py:982);run (telemetry_ab.py:150);Trainer.fit (gradyard/trainer.py:360)"
    bwd = "Trainer.train_step (gradyard/trainer.py:280);Tensor.backward (torch/_tensor.py:600)"
    raw = "\n".join([
        f"thread (0x1): arm-on;{fit};{bwd} 90",
        f"thread (0x1): arm-on;{fit};{bwd};GradSyncMonitor._hook (gradyard/telemetry/comm.py:185) 3",
        f"thread (0x1): arm-on;{fit};{bwd};GradSyncMonitor._hook (gradyard/telemetry/comm.py:190);"
        "allreduce_and_wait (gradyard/telemetry/comm.py:78) 10",
        f"thread (0x1): arm-on;{fit};Trainer.fire (gradyard/trainer.py:240);"
        "StepTimer.on_event (gradyard/telemetry/timing.py:80) 2",
        f"thread (0x1): arm-on;{fit};Trainer.train_step (gradyard/trainer.py:280);"
        "FlopCounterMode.__torch_dispatch__ (torch/utils/flop_counter.py:700) 7",
        f"thread (0x2): arm-off;{fit};{bwd} 100",
        f"thread (0x2): arm-off;{fit};Trainer.fire (gradyard/trainer.py:240);"
        "Turns.on_event (bench/scripts/telemetry_ab.py:110) 1",
        "thread (0x3): MainThread;main (telemetry_ab.py:170);Thread.join (threading.py:1119) 50",
        "thread (0x4): arm-off;Thread.run (threading.py:982);run (telemetry_ab.py:150) 4",  # not in fit
    ])
    arms = parse_ab_raw(raw)
    assert set(arms) == {"on", "off"}
    on, off = arms["on"], arms["off"]
    assert on["loop_samples"] == 105 and on["one_off_samples"] == 7 and off["loop_samples"] == 101
    assert on["categories"][BACKWARD] == 100 and off["categories"][BACKWARD] == 100
    assert on["categories"]["telemetry: DDP comm hook (its Python, not the allreduce)"] == 3
    assert on["categories"]["telemetry: callbacks"] == 2
    assert off["categories"]["bench: handing turns over"] == 1
    text = "\n".join(_telemetry_profile({"arms": arms, "rate": 1000, "command": "py-spy ...",
                                         "total_ratio": 1.04}, {"met": False}))
    assert text.lstrip().startswith("Why, from a profile") and "| telemetry: callbacks | 2 | 0 | +2.0% |" in text
    assert "| **training loop** | 105 | 101 | +4.0% |" in text

