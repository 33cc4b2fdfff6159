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

from bench.contenders import Workload
from bench.env import JOBS, PY, ROOT, SCRIPTS, calibrate_once, machine
from bench.report import cell
from bench.stats import paired, ratio, summary

WORKLOADS = {"alexnet": 64, "efficientnet-transfer": 64}
"""job file: batch on the GPU."""


def workload(job: str, steps: int, batch: int, dry: bool, telemetry: bool = True) -> Workload:
    # A checkpoint at the step before the last: it counts in the last step's time, inside the timing
    # (every contender books a step's save in the next step), and the final save is outside it.
    return Workload(job, steps, steps - 1, batch_size=batch, workers=1, telemetry=telemetry,
                    use_gpu=not dry, precision="bf16")


class Scraper:
    """Polls the worker's /metrics while it runs, found through its discovery file; keeps the last answer."""

    def __init__(self, sd_dir: Path):
        self.sd_dir, self.text, self._stop = sd_dir, "", threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):  # often: a short run serves its last figures only briefly
            try:
                files = sorted(self.sd_dir.glob("*.json"))
                target = json.loads(files[0].read_text())[0]["targets"][0] if files else None
                if target:
                    with urllib.request.urlopen(f"http://{target}/metrics", timeout=2) as r:
                        text = r.read().decode()
                    if "gradyard_mfu_ratio" in text or not self.text:  # keep the latest with MFU in it
                        self.text = text
            except (OSError, ValueError, IndexError, KeyError):
                pass  # not there yet, or gone: the last answer stands

    def stop(self) -> str:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.text


def value(text: str, name: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return None


def run_gradyard(wl: Workload, d: Path, scrape: bool) -> dict:
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "gradyard.train",
           str(JOBS / f"{wl.job}.yaml"), "--storage", str(d / "runs"),
           *[a for s in wl.overrides() for a in ("--set", s)]]
    sd = d / "sd"
    sd.mkdir(mode=0o700)
    scraper = Scraper(sd) if scrape else None
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "GRADYARD_PROMETHEUS_SD_DIR": str(sd)})
    metrics = scraper.stop() if scraper else ""
    if r.returncode != 0:
        raise RuntimeError(f"gradyard {wl.job} failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    run = d / "runs" / wl.spec().name
    s = json.loads((run / "summary.json").read_text())
    verdict = run / "analysis" / "verdict.json"
    return {"steps_per_second": s["steady_steps_per_second"],
            "checkpoint_seconds": s["checkpoints"].get("blocked_seconds", []), "metrics": metrics,
            "verdict": json.loads(verdict.read_text()) if verdict.exists() else None, "command": cmd}


def run_plain(wl: Workload, d: Path) -> dict:
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", str(SCRIPTS / "ddp_torchrun.py"),
           *wl.plain_args(), "--snapshot-path", str(d / "snapshot.pt"), "--out", str(d / "result.json"), "--bf16",
           "--device", "cuda" if wl.use_gpu else "cpu"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"plain {wl.job} failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    out = json.loads((d / "result.json").read_text())
    return {"steps_per_second": out["steady_steps_per_second"], "checkpoint_seconds": out["checkpoint_seconds"],
            "command": cmd}


def measure(job: str, rounds: int, steps: int, batch: int, dry: bool, tmp: Path, say) -> dict:
    from gradyard.telemetry.nvml import READINGS

    arms = {"plain": workload(job, steps, batch, dry), "on": workload(job, steps, batch, dry),
            "off": workload(job, steps, batch, dry, telemetry=False)}
    raw: dict[str, list[dict]] = {arm: [] for arm in arms}
    for r in range(rounds):
        for arm, wl in arms.items():
            d = Path(tempfile.mkdtemp(dir=tmp))
            res = run_plain(wl, d) if arm == "plain" else run_gradyard(wl, d, scrape=arm == "on")
            raw[arm].append(res)
            say(f"  {job} round {r + 1}/{rounds} {arm}: {res['steps_per_second']:.2f} steps/s")
    rate = {k: [x["steps_per_second"] for x in v] for k, v in raw.items()}
    last = raw["on"][-1]
    step_s = 1 / summary(rate["on"])["median"]
    # The checkpoint inside the timing: gradyard's first save (its last one is the final, after it).
    stall = summary([x["checkpoint_seconds"][0] / step_s for x in raw["on"] if x["checkpoint_seconds"]])
    return {"job": job, "steps": steps, "batch": batch, "steps_per_second": {k: summary(v) for k, v in rate.items()},
            "gradyard_over_plain": ratio(paired(rate["on"], rate["plain"]), 0.95),
            "telemetry_on_over_off": ratio(paired([1 / x for x in rate["on"]], [1 / x for x in rate["off"]]), 1.01, "lower"),
            "checkpoint_stall_over_step": stall,
            "nvml_series": {name: value(last["metrics"], name) is not None for name in READINGS},
            "mfu": value(last["metrics"], "gradyard_mfu_ratio"),
            "peak_flops_used": value(last["metrics"], "gradyard_peak_flops_per_second"),
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
    # Dry: long enough that the worker publishes its metrics (about once a second) while it is scraped.
    rounds, steps = (1, 30) if args.dry else (args.rounds, args.steps)
    if args.dry:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="gy-gpu-") as tmp:
        os.environ["GRADYARD_PROFILE_DIR"] = os.environ.get("GRADYARD_PROFILE_DIR", str(Path(tmp) / "profiles"))
        # The device's calibrated peak before any run, as a machine that ran gradyard before has it:
        # otherwise MFU appears only once a run's live analysis has calibrated, late in a short run.
        calibrate_once()
        workloads = [measure(job, rounds, steps, 1 if args.dry else batch, args.dry, Path(tmp),
                             lambda m: print(m, flush=True)) for job, batch in WORKLOADS.items()]
        doc = {"generated_at": dt.datetime.now().isoformat(timespec="seconds"), "dry": args.dry,
               "seconds": round(time.time() - t0, 1), "machine": machine(), "peaks": peaks(), "workloads": workloads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(report(doc))
    print(report(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
