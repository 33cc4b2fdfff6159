"""``bench/gpu.sh``'s measurements: gradyard against a plain torchrun script on one GPU, no Ray.

For AlexNet and EfficientNet-B0 (transfer: frozen features, a new head), bf16
autocast, synthetic data of the jobs' shapes, rounds interleaved:

* plain torchrun DDP (``bench/scripts/ddp_torchrun.py --device cuda --bf16``);
* gradyard's torchrun entry (``python -m gradyard.train``) with telemetry on,
  a checkpoint inside the timed steps (its training stall is reported);
* the same with telemetry off.

While each telemetry-on run trains, its worker's metrics endpoint is scraped:
the NVML series (``gradyard.telemetry.nvml.SERIES``) and MFU must be there.
MFU is shown against the peak gradyard used (the device's calibrated profile or
its published datasheet peak) and both peaks beside it; the live analysis's
verdict (``analysis/verdict.json``) is shown with its evidence.  ``--dry`` runs
the same on the CPU at a few steps (the smoke test's), to prove the script, not
to measure.  Ray is not needed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench.env import JOBS, PY, ROOT, SCRIPTS, machine
from bench.report import cell
from bench.stats import paired, ratio, summary

WORKLOADS = {"alexnet": ("alexnet", 64), "efficientnet-transfer": ("efficientnet_b0_transfer", 64)}
"""job file: (plain model name, batch on the GPU)."""
PORT = 9470


def overrides(job: str, steps: int, batch: int, dry: bool, telemetry: bool, every: int) -> list[str]:
    return ["data.source=synthetic", f"data.num_samples={(steps + 2) * batch * 2}", f"data.batch_size={batch}",
            "data.loader_workers=0", "augmentation=[]", "schedule.epochs=null", f"schedule.steps={steps}",
            "schedule.precision=bf16", "schedule.lr_scheduler.name=none", "scaling.num_workers=1",
            f"scaling.use_gpu={'false' if dry else 'true'}", f"checkpoint.every_steps={every}",
            "checkpoint.every_seconds=null", "model.pretrained=null",
            f"telemetry.enabled={'true' if telemetry else 'false'}", f"telemetry.port={PORT}"]


class Scraper:
    """Polls a worker's /metrics while it runs; keeps the last answer."""

    def __init__(self, port: int):
        self.url, self.text, self._stop = f"http://127.0.0.1:{port}/metrics", "", threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    self.text = r.read().decode()
            except OSError:
                pass

    def stop(self) -> str:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.text


def value(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def run_gradyard(job: str, d: Path, sets: list[str], scrape: bool) -> dict:
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "gradyard.train",
           str(JOBS / f"{job}.yaml"), "--storage", str(d), *[a for s in sets for a in ("--set", s)]]
    scraper = Scraper(PORT) if scrape else None
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    metrics = scraper.stop() if scraper else ""
    if r.returncode != 0:
        raise RuntimeError(f"gradyard {job} failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    run = d / job
    s = json.loads((run / "summary.json").read_text())
    verdict = run / "analysis" / "verdict.json"
    return {"steps_per_second": s["steady_steps_per_second"], "launched_at": t0,
            "checkpoint_seconds": s["checkpoints"].get("blocked_seconds", []), "metrics": metrics,
            "verdict": json.loads(verdict.read_text()) if verdict.exists() else None, "command": cmd}


def run_plain(job: str, model: str, d: Path, steps: int, batch: int, dry: bool, every: int) -> dict:
    from bench.contenders import Workload

    wl = Workload(job, steps, every, batch_size=batch, workers=1)
    args = [a for a in wl.plain_args() if a]
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", str(SCRIPTS / "ddp_torchrun.py"),
           *args, "--snapshot-path", str(d / "snapshot.pt"), "--out", str(d / "result.json"), "--bf16",
           "--device", "cpu" if dry else "cuda"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"plain {job} failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    out = json.loads((d / "result.json").read_text())
    return {"steps_per_second": out["steady_steps_per_second"], "checkpoint_seconds": out["checkpoint_seconds"],
            "command": cmd}


def measure(job: str, rounds: int, steps: int, batch: int, dry: bool, tmp: Path, say) -> dict:
    from gradyard.telemetry.nvml import READINGS

    model = WORKLOADS[job][0]
    every = steps - 2  # one checkpoint inside the timed steps (those after STEADY_AFTER_STEPS)
    raw: dict[str, list[dict]] = {"plain": [], "on": [], "off": []}
    for r in range(rounds):
        for arm in raw:
            d = Path(tempfile.mkdtemp(dir=tmp))
            if arm == "plain":
                res = run_plain(job, model, d, steps, batch, dry, every)
            else:
                res = run_gradyard(job, d, overrides(job, steps, batch, dry, arm == "on", every), scrape=arm == "on")
            raw[arm].append(res)
            say(f"  {job} round {r + 1}/{rounds} {arm}: {res['steps_per_second']:.2f} steps/s")
    rate = {k: [x["steps_per_second"] for x in v] for k, v in raw.items()}
    last = raw["on"][-1]
    mfu, peak = value(last["metrics"], "gradyard_mfu_ratio"), value(last["metrics"], "gradyard_peak_flops_per_second")
    step_s = 1 / summary(rate["on"])["median"]
    stall = summary([s / step_s for x in raw["on"] for s in x["checkpoint_seconds"]])
    return {"job": job, "steps": steps, "batch": batch, "steps_per_second": {k: summary(v) for k, v in rate.items()},
            "gradyard_over_plain": ratio(paired(rate["on"], rate["plain"]), 0.95),
            "telemetry_on_over_off": ratio(paired([1 / x for x in rate["on"]], [1 / x for x in rate["off"]]), 1.01, "lower"),
            "checkpoint_stall_over_step": stall,
            "nvml_series": {name: name in last["metrics"] for name in READINGS},
            "mfu": mfu, "peak_flops_used": peak,
            "verdict": {k: (last["verdict"] or {}).get(k) for k in ("regime", "numbers", "evidence")},
            "commands": {"plain": " ".join(raw["plain"][0]["command"]), "gradyard": " ".join(last["command"])}}


def peaks() -> dict:
    from gradyard.analysis.calibrate import DeviceProfile, device_name
    from gradyard.analysis.published import published_peak

    name = device_name()
    profile, published = DeviceProfile.load(name), published_peak(name)
    return {"device": name, "measured_peak_flops": profile.peak_flops if profile else None,
            "published_peak_flops": published.peak_flops if published else None}


def report(doc: dict) -> str:
    out = [f"# bench/gpu.sh, {doc['generated_at']}{' (dry run on CPU: not a measurement)' if doc['dry'] else ''}",
           "", f"Device: {doc['peaks']['device']}; measured peaks {doc['peaks']['measured_peak_flops']}; "
           f"published {doc['peaks']['published_peak_flops']}.", "",
           "| job | gradyard / plain torchrun (≥ 0.95) | telemetry on / off (≤ 1.01) | checkpoint stall / step "
           "| MFU (peak used) | NVML series | verdict |", "|---|---|---|---|---|---|---|"]
    for w in doc["workloads"]:
        g, t = w["gradyard_over_plain"], w["telemetry_on_over_off"]
        nv = sum(w["nvml_series"].values())
        out.append(f"| {w['job']} | {cell(g)} {g.get('verdict')} | {cell(t)} {t.get('verdict')} | "
                   f"{cell(w['checkpoint_stall_over_step'])} | {cell(w['mfu'])} ({cell(w['peak_flops_used'])} FLOP/s) | "
                   f"{nv} of {len(w['nvml_series'])} | {w['verdict']['regime']} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="on the CPU, a few steps: checks the script runs")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    args = p.parse_args(argv)
    rounds, steps = (1, 8) if args.dry else (args.rounds, args.steps)  # 7 warm-up steps, then the timed ones
    if args.dry:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="gy-gpu-") as tmp:
        os.environ["GRADYARD_PROFILE_DIR"] = os.environ.get("GRADYARD_PROFILE_DIR", str(Path(tmp) / "profiles"))
        workloads = [measure(job, rounds, steps, 1 if args.dry else batch, args.dry, Path(tmp),
                             lambda m: print(m, flush=True)) for job, (_, batch) in WORKLOADS.items()]
        doc = {"generated_at": dt.datetime.now().isoformat(timespec="seconds"), "dry": args.dry,
               "seconds": round(time.time() - t0, 1), "machine": machine(), "peaks": peaks(), "workloads": workloads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(report(doc))
    print(report(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
