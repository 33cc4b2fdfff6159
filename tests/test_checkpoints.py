"""Checkpoints are never lost: findings 1-10 of the checkpoint review, each as the reproduction that
failed before, run through gradyard's real worker (``run_worker``: the Trainer, the checkpoint manager,
the storage seam) in this process, on local disk or moto's S3 server behind a fault proxy.

Real processes and signals (SIGKILL, SIGSTOP, SIGTERM), hangs and outages are in ``test_chaos``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import JOBS, VENV_BIN, run_cli
from gradyard.checkpoint import (
    COMPLETE, CORRUPT, LeaseHeld, LeaseKeeper, acquire, list_checkpoints, read_record, scan,
)
from gradyard.checkpoint import retention
from gradyard.checkpoint.format import CheckpointInfo
from gradyard.events import Callback, Event
from gradyard.job import load_job
from gradyard.storage import open_storage
from gradyard.worker import run_directory, run_worker
from testkit import FaultProxy

pytestmark = pytest.mark.unit

BASE = ["scaling.num_workers=1", "telemetry.enabled=false", "checkpoint.at_epoch_end=false"]


def train(root, *overrides, job="circles", callbacks=(), storage=None):
    """One run of ``job`` through the real worker, in this process (world size 1), holding the run lease
    as ``python -m gradyard.train`` does."""
    spec = load_job(JOBS / f"{job}.yaml", [*BASE, *overrides])
    run = storage or run_directory(spec, str(root))
    keeper = LeaseKeeper(acquire(run))
    try:
        return run_worker({"spec": spec.model_dump(mode="json"), "storage": run.spec(), "launcher": "torchrun",
                           "lease": keeper.token, "callbacks": list(callbacks)})
    finally:
        keeper.release()


def ckpt_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def loadable(run_dir: Path) -> list[int]:
    """Steps of the checkpoints that verify (every byte hashed)."""
    return [i.step for i in list_checkpoints(open_storage(str(run_dir)), deep=True) if i.status == COMPLETE]


# ------------------------------------------------------------------ finding 1: retention


def test_resume_past_a_corrupt_checkpoint_keeps_a_loadable_one(tmp_path):
    """Finding 1: the newest checkpoint corrupt with its size intact, then a resumed run with keep: 1.
    Before, retention kept the corrupt one and deleted the rest, the run's own final checkpoint too."""
    first = train(tmp_path, "schedule.epochs=1", "checkpoint.every_steps=5", "checkpoint.keep=3")
    run = tmp_path / "circles"
    newest = ckpt_dirs(run)[-1]
    flip_a_byte(run / "checkpoints" / newest / "model.pt")
    again = train(tmp_path, "schedule.epochs=2", "checkpoint.every_steps=5", "checkpoint.keep=1")
    assert again["resumed_from_step"] == first["steps"] - 5
    infos = {i.name: i for i in list_checkpoints(open_storage(str(run)), deep=True)}
    assert infos[newest].status == CORRUPT, "the corrupt one is left for a human"
    good = [i.step for i in infos.values() if i.status == COMPLETE]
    # keep: 1 newest verified, plus the one the attempt resumed from: both loadable.
    assert good == [again["resumed_from_step"], again["steps"]]


def test_retention_rules():
    """Own lineage only; verified ones count; the newest verified, the resumed-from and the best stay."""
    def info(step, run_id="r", verified=True, status=COMPLETE, acc=None):
        return CheckpointInfo(step=step, path=f"/c/step_{step:09d}", status=status, run_id=run_id,
                              verified=verified, metrics={"test_accuracy": acc} if acc is not None else {})

    infos = [info(10, acc=0.9), info(20, verified=False), info(30), info(40, run_id="other"),
             info(50, status=CORRUPT), info(55, run_id=None), info(60), info(70),
             CheckpointInfo(step=65, path="/c/step_000000065")]  # incomplete
    doomed = {i.step for i in retention.to_delete(infos, run_id="r", keep=2, protected=["step_000000030"],
                                                  best_metric="test_accuracy")}
    # 10 is the best, 30 resumed-from, 60 and 70 the newest verified; 40 foreign, 55 format 1, 50 corrupt.
    assert doomed == {20, 65}
    # Too few verified ones: nothing complete goes, whatever its age.
    assert not {i.step for i in retention.to_delete([info(10, verified=False), info(20)], run_id="r", keep=2)}


# ------------------------------------------------------------------ finding 2: the run lease


def test_a_second_driver_is_refused_with_the_holder_named(tmp_path):
    """Finding 2 (the lease itself; real processes in test_chaos): one live driver per run directory."""
    run = open_storage(str(tmp_path / "run"))
    held = acquire(run)
    with pytest.raises(LeaseHeld) as err:
        acquire(run)
    msg = str(err.value)
    assert f"pid {os.getpid()}" in msg and "expires in" in msg and "lease.json" in msg
    # A holder that no longer exists (SIGKILLed) is taken over at once.
    doc = json.loads((tmp_path / "run" / "lease.json").read_text())
    doc["holder"]["pid"] = _a_dead_pid()
    (tmp_path / "run" / "lease.json").write_text(json.dumps(doc))
    taken = acquire(run)
    assert taken.token != held.token


def _a_dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_the_lease_is_exclusive_on_s3_too(s3, request):
    with FaultProxy(s3.endpoint) as proxy:
        run = open_storage(f"s3://gradyard-test/lease-{request.node.name}-{time.time_ns()}",
                           endpoint_url=proxy.endpoint)
        first = acquire(run)
        with pytest.raises(LeaseHeld):
            acquire(run)
        doc = json.loads(run.read_bytes(run.join("lease.json")))
        doc["expires_at"] = doc["renewed_at"] = time.time() - 1  # expired: the next driver takes it over
        run.fs.pipe_file(run.join("lease.json"), json.dumps(doc).encode())
        second = acquire(run)
        assert second.token != first.token
        assert json.loads(run.read_bytes(run.join("lease.json")))["token"] == second.token


# ------------------------------------------------------------------ finding 3: published is never rewritten


def test_a_published_checkpoint_is_never_written_again(tmp_path):
    """Finding 3: re-running a finished job saved its final step again, truncating the only copy."""
    train(tmp_path, "schedule.epochs=1", "checkpoint.every_steps=10")
    run = tmp_path / "circles"
    files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (run / "checkpoints").rglob("*") if p.is_file()}
    again = train(tmp_path, "schedule.epochs=1", "checkpoint.every_steps=10")
    assert again["resumed_from_step"] == again["steps"] and again["checkpoints"]["saved_total"] == 0
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == files

    # A resume from an older checkpoint that reaches a published step writes a fresh directory.
    newest = ckpt_dirs(run)[-1]
    before = (run / "checkpoints" / newest / "model.pt").read_bytes()
    flip_a_byte(run / "checkpoints" / newest / "state.pt")
    third = train(tmp_path, "schedule.epochs=1", "checkpoint.every_steps=10")
    assert third["resumed_from_step"] < third["steps"]
    names = ckpt_dirs(run)
    assert newest in names and any(n.startswith(newest + "-") for n in names), names
    assert (run / "checkpoints" / newest / "model.pt").read_bytes() == before


# ------------------------------------------------------------------ finding 4: torn records


def test_a_torn_manifest_is_a_corrupt_checkpoint_and_resume_falls_back(tmp_path):
    """Finding 4: a short manifest.json blocked every restart and broke `checkpoints` and `export`."""
    first = train(tmp_path, "schedule.epochs=1", "checkpoint.every_steps=5", "checkpoint.keep=5")
    run = tmp_path / "circles"
    newest = ckpt_dirs(run)[-1]
    manifest = run / "checkpoints" / newest / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:37])
    listing = run_cli("checkpoints", str(run), "--json", timeout=120)
    assert listing.returncode == 0, listing.stderr
    rows = {r["name"]: r for r in json.loads(listing.stdout)}
    assert rows[newest]["status"] == "corrupt" and "manifest.json" in rows[newest]["problem"]
    out = tmp_path / "model.pt"
    export = run_cli("export", str(run), "--out", str(out), timeout=120)
    assert export.returncode == 0, export.stderr
    assert f"step {first['steps'] - 5}" in export.stdout and newest in export.stderr  # says what it skipped
    again = train(tmp_path, "schedule.epochs=2", "checkpoint.every_steps=5", "checkpoint.keep=5")
    assert again["resumed_from_step"] == first["steps"] - 5


def test_a_torn_run_record_starts_a_new_one_and_keeps_the_lineage(tmp_path, capsys):
    """Finding 4: a short attempts.json failed every restart (forever with max_failures: -1)."""
    first = train(tmp_path, "schedule.epochs=1", "checkpoint.every_steps=5", "checkpoint.keep=2")
    run = tmp_path / "circles"
    record = run / "attempts.json"
    record.write_bytes(record.read_bytes()[:15])
    again = train(tmp_path, "schedule.epochs=2", "checkpoint.every_steps=5", "checkpoint.keep=2")
    out = capsys.readouterr().out
    assert "attempts.json is not readable JSON" in out and "starting a new run record" in out
    assert again["resumed_from_step"] == first["steps"]
    assert again["run_id"] == first["run_id"], "the lineage is adopted from the checkpoint"
    assert read_record(open_storage(str(run))).run_id == first["run_id"]
    # Retention went on (keep 2 newest + the resumed-from): the disk does not fill.
    assert len(ckpt_dirs(run)) == 3


# ------------------------------------------------------------------ finding 5: the final checkpoint


def test_a_final_checkpoint_that_cannot_be_written_fails_the_run(s3, request):
    """Finding 5: the final checkpoint failed and the run reported success; export then silently
    exported an older step.  Now the run fails, naming the step and the cause, and export says which."""
    url = f"s3://gradyard-test/final-{time.time_ns()}"
    with FaultProxy(s3.endpoint) as proxy:
        proxy.deny_writes_matching = "/checkpoints/step_000000025/"  # the final one: read-only there
        spec = load_job(JOBS / "circles.yaml", [*BASE, "schedule.epochs=1", "checkpoint.every_steps=10",
                                                f"storage.endpoint_url={proxy.endpoint}"])
        summary = train(None, "schedule.epochs=1", "checkpoint.every_steps=10",
                        f"storage.endpoint_url={proxy.endpoint}", storage=run_directory(spec, url))
    assert summary["status"] == "failed"
    assert f"the final checkpoint at step {summary['steps']} could not be written" in summary["error"]
    assert "AccessDenied" in summary["error"] or "PermissionError" in summary["error"]
    direct = open_storage(url + "/circles", endpoint_url=s3.endpoint)
    assert [i.step for i in list_checkpoints(direct, deep=True) if i.status == COMPLETE] == [10, 20]
    export = run_cli("export", url + "/circles", "--out", "/dev/null", "--endpoint-url", s3.endpoint,
                     timeout=120)
    assert export.returncode == 0 and "step 20" in export.stdout


# ------------------------------------------------------------------ finding 6: resume reads


def test_resume_retries_reads_and_reads_the_chosen_checkpoint_once(s3):
    """Finding 6: one S3 503 during resume cost a restart; resume hashed every retained checkpoint in
    full, then read the chosen one again.  Now: retried, each byte of the chosen one read once (counted
    from the HTTP traffic), and of the other retained checkpoints nothing but their manifests."""
    url = f"s3://gradyard-test/resume-{time.time_ns()}"
    with FaultProxy(s3.endpoint, seed=3) as proxy:
        over = [f"storage.endpoint_url={proxy.endpoint}", "checkpoint.every_steps=5", "checkpoint.keep=4"]
        first = train(None, "schedule.epochs=1", *over, storage=_run(url, proxy))
        direct = open_storage(url + "/circles", endpoint_url=s3.endpoint)
        infos = [i for i in list_checkpoints(direct) if i.status == COMPLETE]
        assert len(infos) >= 4
        proxy.fail_rate, proxy.fail_methods, proxy.fail_kinds = 0.3, {"GET"}, ("503", "drop")
        before_failed, before_log = proxy.failed, len(proxy.log)
        again = train(None, "schedule.epochs=2", *over, storage=_run(url, proxy),
                      callbacks=[StopFaultsAtFirstStep(proxy)])
        resume_reads = [r for r in proxy.log[before_log:] if r.method == "GET" and "/checkpoints/" in r.path]
    assert again["resumed_from_step"] == first["steps"] and again["status"] == "succeeded"
    assert proxy.failed > before_failed, "no read failed: the test tested nothing"
    chosen = infos[-1]
    read = bytes_read_by_file(resume_reads)
    prefix = "/gradyard-test/" + chosen.path.split("/", 1)[1] + "/"
    for name, meta in chosen.files.items():
        assert read.pop(prefix + name) == [(0, meta["size"])], f"{name} not read exactly once"
    # What is left: the manifests (the listing reads each once), and nothing else of any checkpoint.
    assert all(path.endswith("/manifest.json") for path in read), sorted(read)


def bytes_read_by_file(reads) -> dict[str, list[tuple[int, int]]]:
    """path -> the byte ranges [start, end) its successful GETs answered, merged where they touch:
    each byte read once shows as one range, a byte read twice as an overlap (raised here)."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for r in reads:
        assert r.status in (200, 206), r
        start = int(r.range.split("=")[1].split("-")[0]) if r.range else 0
        spans.setdefault(r.path, []).append((start, start + r.nbytes))
    merged = {}
    for path, ranges in spans.items():
        out: list[tuple[int, int]] = []
        for a, b in sorted(ranges):
            assert not out or a >= out[-1][1], f"{path}: bytes {a}-{min(b, out[-1][1])} read twice"
            out[-1:] = [(out[-1][0], b)] if out and a == out[-1][1] else [*out[-1:], (a, b)]
        merged[path] = out
    return merged


def test_s3_files_upload_in_parts_beside_serialising_and_resume_reads_them_in_parts_once(s3, monkeypatch):
    """Issue 21: the writer serialised a file, hashed it, uploaded it whole, then began the next; resume
    read each file in one GET.  Now each file goes up in concurrent multipart parts while the next one
    is serialised, each part retried alone, and resume reads a file as concurrent ranged GETs, each byte
    once, hashing the bytes it loads."""
    import dataclasses

    import gradyard.checkpoint.writer as writer
    from gradyard.checkpoint.format import load_blobs, read_verified
    from gradyard.storage import Transfer

    part = 5 * 2**20  # S3's smallest part
    tensors = {n: torch.arange(3_000_000, dtype=torch.float32) * i for i, n in enumerate(("model", "optim"), 1)}
    snap = writer.Snapshot(step=1, epoch=0, files={"model.pt": {"w": tensors["model"]},
                                                   "optimizer.pt": {"m": tensors["optim"]}, "state.pt": {"s": 1}},
                           manifest={"run_id": "r"})
    uploading_while_serialising: list[bool] = []
    real = writer._serialise

    def serialise(obj, out):
        if obj is snap.files["optimizer.pt"]:  # model.pt's upload is held at the proxy: in flight now?
            uploading_while_serialising.append(proxy.uploading.wait(30))
            proxy.release.set()
        return real(obj, out)

    monkeypatch.setattr(writer, "_serialise", serialise)
    url = f"s3://gradyard-test/parts-{time.time_ns()}"
    with FaultProxy(s3.endpoint, seed=5) as proxy:
        storage = dataclasses.replace(open_storage(url, endpoint_url=proxy.endpoint),
                                      transfer=Transfer(part_size=part, concurrency=4))
        proxy.hold_uploads, proxy.throttle_first = True, 1  # each object's first PUT: 503 SlowDown
        info = writer.write_checkpoint(storage, snap, "step_000000001")
        writes = [r for r in proxy.log if r.method in ("PUT", "POST")]
        proxy.hold_uploads = False
        assert uploading_while_serialising == [True], "optimizer.pt was serialised with no upload in flight"
        model = f"/gradyard-test/{url.split('/', 3)[3]}/checkpoints/step_000000001/model.pt"
        assert [r.method for r in writes if r.path == model] == ["POST", "PUT", "PUT", "POST"], \
            "model.pt: start, two parts, complete"
        assert proxy.failed >= 3, "no part was retried: the test tested nothing"
        direct = open_storage(url, endpoint_url=s3.endpoint)
        assert [i.status for i in list_checkpoints(direct, deep=True)] == [COMPLETE]

        proxy.fail_rate, proxy.fail_methods, proxy.fail_kinds = 0.3, {"GET"}, ("503", "drop")
        failed, first = proxy.failed, len(proxy.log)
        blobs = read_verified(storage, info)
        reads = [r for r in proxy.log[first:] if r.method == "GET"]
    assert proxy.failed > failed, "no read failed: the test tested nothing"
    loaded = load_blobs(blobs)
    assert torch.equal(loaded["model.pt"]["w"], tensors["model"]) and torch.equal(loaded["optimizer.pt"]["m"],
                                                                                   tensors["optim"])
    assert len([r for r in reads if r.path == model]) == 3, "12 MB in ranged parts of 5 MiB"
    read = bytes_read_by_file(reads)
    assert read == {f"{model.rsplit('/', 1)[0]}/{n}": [(0, m["size"])] for n, m in info.files.items()}


class StopFaultsAtFirstStep(Callback):
    events = frozenset((Event.BATCH_END,))

    def __init__(self, proxy):
        self.proxy = proxy

    def on_event(self, event, state):
        self.proxy.fail_rate = 0.0


def _run(url, proxy):
    return open_storage(url, endpoint_url=proxy.endpoint).child("circles")


# ------------------------------------------------------------------ finding 8: best-effort observers


class FailingObserver(Callback):
    name = "failing_observer"
    critical = False

    def on_event(self, event, state):
        if event is Event.BATCH_END and state.step == 3:
            raise RuntimeError("observer broke")

    def close(self):
        raise RuntimeError("close broke")


def test_telemetry_analysis_and_discovery_failures_never_stop_training(tmp_path, monkeypatch):
    """Finding 8: a file_sd write error at FIT_START, a close() that raises (skipping the others'),
    an analysis write failure at step ~7: each killed training.  Now each is counted, and training ends."""
    from gradyard.analysis.calibrate import DeviceProfile, device_name

    # A cached device profile, so the live analysis does not calibrate this machine first.
    monkeypatch.setenv("GRADYARD_PROFILE_DIR", str(tmp_path / "profiles"))
    DeviceProfile(device=device_name(), device_type="cpu", peak_flops={"float32": 5e10},
                  mem_bandwidth_bytes_per_s=1e10, dispatch_overhead_s=5e-6, quick=True).save()
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the discovery directory should be")
    monkeypatch.setenv("GRADYARD_PROMETHEUS_SD_DIR", str(blocker / "sd"))
    run = tmp_path / "runs" / "circles"
    run.mkdir(parents=True)
    (run / "analysis").write_text("a file where the analysis directory should be")
    summary = train(tmp_path / "runs", "schedule.epochs=1", "telemetry.enabled=true",
                    callbacks=[FailingObserver()])
    assert summary["status"] == "succeeded" and summary["steps"] == 25
    errors = summary["observer_errors"]
    assert errors["prometheus_exporter"] == 1  # discovery
    assert errors["census"] >= 1  # the analysis' write
    assert errors["failing_observer"] == 2  # its event and its close


# ------------------------------------------------------------------ finding 9: non-finite loss


class PoisonInputs(Callback):
    events = frozenset((Event.AFTER_DATA,))

    def __init__(self, at):
        self.at = set(at)

    def on_event(self, event, state):
        if state.step + 1 in self.at:
            state.inputs.fill_(float("nan"))


def test_a_non_finite_loss_stops_naming_the_step_and_is_never_checkpointed(tmp_path):
    """Finding 9: a NaN loss trained on, and retention rotated the good checkpoints out for NaN ones."""
    summary = train(tmp_path, "schedule.epochs=2", "checkpoint.every_steps=4", "checkpoint.keep=2",
                    callbacks=[PoisonInputs([14])])
    assert summary["status"] == "failed"
    assert "not finite" in summary["error"] and "at step 14" in summary["error"]
    assert summary["steps"] < 20
    run = tmp_path / "circles"
    assert loadable(run) == [8, 12]  # the good ones before it stay; nothing at or after 14
    for step in loadable(run):
        state = torch.load(run / "checkpoints" / f"step_{step:09d}" / "model.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state.values())


def test_skip_mode_skips_and_counts_non_finite_steps(tmp_path):
    summary = train(tmp_path, "schedule.epochs=1", "failure.on_nonfinite=skip", "checkpoint.every_steps=5",
                    callbacks=[PoisonInputs([6, 7, 11])])
    assert summary["status"] == "succeeded" and summary["skipped_steps"] == 3
    assert summary["steps"] == 25 and all(v == v for v in summary["metrics"].values())


# ------------------------------------------------------------------ finding 10: counters


def test_checkpoint_counters_come_from_durable_saves(tmp_path):
    """Finding 10: gradyard_checkpoints_total ended one short and the first stall never reached the
    histogram (copied by polling).  The real Trainer, the real manager, the real telemetry."""
    from prometheus_client import CollectorRegistry

    from gradyard.checkpoint import CheckpointManager, record_start, resume
    from gradyard.telemetry import build_telemetry_callbacks
    from gradyard.trainer import DistInfo, Trainer

    spec = load_job(JOBS / "circles.yaml", [*BASE, "schedule.epochs=1", "checkpoint.every_steps=5",
                                            "telemetry.enabled=true"])
    run = run_directory(spec, str(tmp_path))
    record = record_start(run)
    registry = CollectorRegistry()
    callbacks = build_telemetry_callbacks(spec, registry=registry, sd_directory=tmp_path / "sd")
    manager = CheckpointManager(spec, run, rank=0, world_size=1, record=record)
    trainer = Trainer(spec, run, DistInfo(), record.run_id, callbacks, checkpointer=manager)
    resume(manager)
    trainer.fit()
    labels = next(cb.metrics.identity for cb in callbacks if hasattr(cb, "metrics"))
    saves = registry.get_sample_value("gradyard_checkpoints_total", labels)
    stalls = registry.get_sample_value("gradyard_checkpoint_blocked_seconds_count", labels)
    assert saves == manager.stats.saved_total == 5  # steps 5, 10, 15, 20 and the final 25
    assert stalls == 5
    assert registry.get_sample_value("gradyard_checkpoint_failures_total", labels) == 0


# ------------------------------------------------------------------ listing


def test_scan_tells_complete_incomplete_corrupt_and_leftovers(tmp_path):
    train(tmp_path, "schedule.epochs=1", "checkpoint.every_steps=5", "checkpoint.keep=5")
    run = tmp_path / "circles"
    names = ckpt_dirs(run)
    (run / "checkpoints" / names[0] / "manifest.json").unlink()
    (run / "checkpoints" / names[1] / "optimizer.pt").write_bytes(b"short")
    (run / "checkpoints" / ".partial-step_000000099-abcd1234").mkdir()
    (run / "checkpoints" / ".partial-step_000000099-abcd1234" / "model.pt").write_bytes(b"a crash's half")
    infos, partials = scan(open_storage(str(run)))
    status = {i.name: i.status for i in infos}
    assert status[names[0]] == "incomplete" and status[names[1]] == "corrupt"
    assert all(status[n] == "complete" for n in names[2:])
    assert [Path(p).name for p in partials] == [".partial-step_000000099-abcd1234"]


def test_torchrun_entry_refuses_a_run_directory_in_use(tmp_path):
    spec = load_job(JOBS / "circles.yaml")
    run = run_directory(spec, str(tmp_path))
    acquire(run)
    r = subprocess.run([str(VENV_BIN / "python"), "-m", "gradyard.train", str(JOBS / "circles.yaml"),
                        "--storage", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "is in use" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------ publishing


def test_local_files_are_synced_before_the_manifest_and_published_by_one_rename(tmp_path, monkeypatch):
    """On local disk a checkpoint appears under its name only once every file and its manifest are on
    disk: assembled in a .partial- folder, each file synced, the manifest last, the folder synced,
    then renamed into place and the parent synced.  A crash at any point leaves no published torn files."""
    import gradyard.checkpoint.writer as writer
    import gradyard.storage.core as core

    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append("sync " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(a, b):
        events.append(f"rename {os.path.basename(a)[:9]} -> {os.path.basename(b)}")
        return real_rename(a, b)

    monkeypatch.setattr(writer.os, "fsync", fsync)
    monkeypatch.setattr(core.os, "fsync", fsync)
    monkeypatch.setattr(writer.os, "rename", rename)
    storage = open_storage(str(tmp_path / "run"))
    snap = writer.Snapshot(step=7, epoch=0, files={"model.pt": {"w": torch.ones(3)}, "state.pt": {"s": 7}},
                           manifest={"run_id": "r"})
    info = writer.write_checkpoint(storage, snap, "step_000000007")
    partial = next(e for e in events if e.startswith("sync .partial")).split(" ", 1)[1]
    assert events == ["sync model.pt", "sync state.pt", "sync manifest.json", f"sync {partial}",
                      "rename .partial- -> step_000000007", "sync checkpoints"]
    assert info.verified and [i.status for i in list_checkpoints(storage, deep=True)] == ["complete"]
    with pytest.raises(writer.PublishConflict):  # a published name is never replaced
        writer.write_checkpoint(storage, snap, "step_000000007")
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".partial")]


def test_s3_checkpoints_cost_their_puts_and_no_listing(s3):
    """After the first listing (at resume), a checkpoint on S3 costs one PUT per file and the manifest's
    conditional PUT, one small GET (the run lease), and one bulk delete when an old one goes: no listing."""
    url = f"s3://gradyard-test/requests-{time.time_ns()}"
    counts: list[dict] = []

    class Count(Callback):
        events = frozenset((Event.CHECKPOINT_SAVED,))

        def on_event(self, event, state):
            counts.append(dict(proxy.methods))

    with FaultProxy(s3.endpoint) as proxy:
        summary = train(None, "schedule.epochs=2", "checkpoint.every_steps=5", "checkpoint.keep=2",
                        f"storage.endpoint_url={proxy.endpoint}", storage=_run(url, proxy), callbacks=[Count()])
    assert summary["checkpoints"]["saved_total"] == len(counts) == 10
    # Steady state (retention deletes one each time), over the last six saves: events fire when the
    # manager drains the writer's completions, so count per save over several rather than between two.
    first, last = counts[3], counts[-1]
    per_save = {m: (last.get(m, 0) - first.get(m, 0)) / (len(counts) - 4) for m in ("GET", "HEAD", "PUT", "POST")}
    assert per_save == {"GET": 1, "HEAD": 0, "PUT": 4, "POST": 1}, per_save


def test_the_kill_fault_kills_once_at_each_listed_step(tmp_path):
    """The recovery tests' and benchmark's one run of many kills (testkit.faults): each listed step kills
    once, in order, and every attempt's first step is logged (no Ray: the 'attempts' are plain processes)."""
    import signal
    import sys

    from testkit.faults import read_marker

    marker = tmp_path / "faults.log"
    script = ("import sys, types\n"
              "from gradyard.events import Event\n"
              "from testkit.faults import KillAtStep\n"
              "start = int(sys.argv[1])\n"
              f"cb = KillAtStep([3, 5], rank=0, marker={str(marker)!r})\n"
              "for step in range(start + 1, 8):\n"
              "    cb.on_event(Event.BATCH_END, types.SimpleNamespace(step=step, rank=0))\n")
    codes, start = [], 0
    for _ in range(3):  # each "restart" resumes from the step before its kill
        r = subprocess.run([sys.executable, "-c", script, str(start)], timeout=60, cwd=JOBS.parent)
        codes.append(r.returncode)
        kills = [e["step"] for e in read_marker(str(marker)) if e["event"] == "kill"]
        start = kills[-1] - 1 if kills else start
    assert codes == [-signal.SIGKILL, -signal.SIGKILL, 0]
    events = [(e["event"], e["step"]) for e in read_marker(str(marker))]
    assert events == [("first_step", 1), ("kill", 3), ("first_step", 3), ("kill", 5), ("first_step", 5)]
