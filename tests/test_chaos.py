"""Chaos: real training processes SIGKILLed, SIGSTOPped and SIGTERMed, storage failing and gone for a
minute, a second driver, a full disk.  The assertion is always the same: nothing published is lost, and
the run ends with the weights an uninterrupted run ends with, bit for bit.

Most runs use plain torchrun (2 gloo workers, its agent restarting them: ``--max-restarts``), which
restarts in seconds; the SIGTERM test runs on the shared Ray cluster, where the handler has to be set on
the worker actor's main thread.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import JOBS, ROOT, VENV_BIN, run_cli, wait_until
from gradyard.checkpoint import COMPLETE, list_checkpoints
from gradyard.events import Callback, Event
from gradyard.storage import StorageError, open_storage
from testkit import FaultProxy
from testkit.processes import psutil

pytestmark = pytest.mark.chaos

# Every run here trains this job, so one uninterrupted run is the reference for all of them.
# Dropout (RNG streams), momentum (optimizer state) and a cosine schedule: all must resume exactly.
JOB = ["schedule.epochs=null", "schedule.steps=48", "checkpoint.every_steps=4", "checkpoint.keep=3",
       "checkpoint.at_epoch_end=false", "telemetry.enabled=false", "scaling.num_workers=2",
       "regularization.dropout=0.2", "optimizer.momentum=0.9", "schedule.lr_scheduler.name=cosine"]


def sets(*overrides: str) -> list[str]:
    return [a for o in [*JOB, *overrides] for a in ("--set", o)]


def torchrun(storage: str, *overrides: str, slow: float = 0.05, restarts: int = 25, env: dict | None = None,
             job: str = "circles", faults: tuple[str, ...] = ()) -> subprocess.Popen:
    """``torchrun`` of gradyard's torchrun entry with slow steps (testkit's wrapper passes the faults in)."""
    cmd = [str(VENV_BIN / "python"), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(restarts), "--monitor-interval", "0.2",
           str(ROOT / "testkit" / "torchrun_faults.py"), "--slow", str(slow), *faults,
           str(JOBS / f"{job}.yaml"), "--storage", storage, *sets(*overrides)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun's agent and every process under it (its workers run in sessions of their own)."""
    ps = psutil()
    try:
        procs = [ps.Process(proc.pid), *ps.Process(proc.pid).children(recursive=True)]
    except ps.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except ps.NoSuchProcess:
            pass


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"torchrun did not finish:\n{out[-8000:]}")
    assert proc.returncode == 0, out[-8000:]
    return out


def workers(proc: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the training processes torchrun's agent runs now."""
    ps = psutil()
    out = {}
    try:
        for child in ps.Process(proc.pid).children(recursive=True):
            try:
                env = child.environ()
                if "torchrun_faults.py" in " ".join(child.cmdline()) and "RANK" in env:
                    out[int(env["RANK"])] = child.pid
            except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
                pass
    except ps.NoSuchProcess:
        pass
    return out


def summary_of(run: Path | str, endpoint: str | None = None) -> dict:
    st = open_storage(str(run), endpoint_url=endpoint)
    return st.read_json(st.join("summary.json"))


def verified(run: str, endpoint: str | None = None) -> list:
    return list_checkpoints(open_storage(run, endpoint_url=endpoint), deep=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run every interrupted one must match: run once per test session, also when
    pytest-xdist spreads this module over several workers (they share the session's temp root)."""
    import json

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with FileLock(str(shared / "chaos-reference.lock")):
        cached = shared / "chaos-reference.json"
        if not cached.exists():
            root = shared / "chaos-reference"
            finish(torchrun(str(root), slow=0.0))
            cached.write_text(json.dumps(summary_of(root / "circles")))
        return json.loads(cached.read_text())


def same_weights(summary: dict, reference: dict) -> None:
    assert summary["steps"] == reference["steps"]
    assert summary["model_sha256"] == reference["model_sha256"]
    assert summary["optimizer_sha256"] == reference["optimizer_sha256"]


# ------------------------------------------------------------------ SIGKILL


def test_sigkill_at_random_moments_never_loses_a_checkpoint(s3, reference):
    """20 SIGKILLs of a worker at random moments across runs checkpointing to S3, several of them while
    an upload is in flight: every run ends bitwise where the uninterrupted one does, every published
    checkpoint still verifies, and none corrupt or foreign is ever loaded."""
    rng = random.Random(20261201)
    kills_total, during_upload, runs = 0, 0, 0
    # Runs until 20 kills have landed: a run that ends before its share (its 48 steps spent between
    # kills) is followed by another, so the count is what the test promises, not what the timing allowed.
    while kills_total < 20:
        assert runs < 5, f"only {kills_total} kills landed in {runs} runs"
        runs += 1
        url = f"s3://gradyard-test/chaos-kill-{time.time_ns()}"
        with FaultProxy(s3.endpoint) as proxy:
            proc = torchrun(url, f"storage.endpoint_url={proxy.endpoint}")
            kills = 0
            try:
                while kills < 10 and kills_total + kills < 20 and proc.poll() is None:
                    pids = wait_until(lambda: proc.poll() is not None or (len(w := workers(proc)) == 2 and w),
                                      timeout=120, what="two workers")
                    if proc.poll() is not None:
                        break
                    # Moments of training, not of start-up: once this attempt has published a checkpoint
                    # (killing a worker inside torchrun's rendezvous tests torchrun, not gradyard).
                    published = proxy.manifests
                    wait_until(lambda: proc.poll() is not None or proxy.manifests > published, timeout=120,
                               what="a checkpoint of this attempt")
                    in_upload = rng.random() < 0.4  # kill while a checkpoint is being uploaded
                    if in_upload:
                        if not proxy.uploading.wait(timeout=10):
                            continue
                    else:
                        time.sleep(rng.uniform(0.0, 0.6))
                    victim = pids[rng.choice(sorted(pids))]
                    try:
                        os.kill(victim, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    kills += 1
                    during_upload += in_upload
                    wait_until(lambda: proc.poll() is not None or victim not in workers(proc).values(),
                               timeout=60, what="the agent to notice the kill")
                out = finish(proc)
            except BaseException:
                kill_tree(proc)
                raise
        kills_total += kills
        run = url + "/circles"
        same_weights(summary_of(run, s3.endpoint), reference)
        infos = verified(run, s3.endpoint)
        assert infos and all(i.status == COMPLETE for i in infos if i.files), [(i.name, i.status) for i in infos]
        assert "corrupt" not in out.replace("corrupt (", "")  # no checkpoint was found corrupt
        assert "another run" not in out
    assert kills_total >= 20 and during_upload >= 3, (kills_total, during_upload)


# ------------------------------------------------------------------ storage errors and an outage


def test_s3_errors_and_a_minute_outage_during_checkpointing_and_resume(s3, reference):
    """S3 failing 20% of requests, then gone for 60 s: it goes while a checkpoint is uploading, and a
    worker is SIGKILLed during it, so the restarted workers resume while there is no storage at all."""
    url = f"s3://gradyard-test/chaos-outage-{time.time_ns()}"
    with FaultProxy(s3.endpoint, fail_rate=0.2, seed=7) as proxy:
        proc = torchrun(url, f"storage.endpoint_url={proxy.endpoint}", slow=0.15)
        try:
            wait_until(lambda: proc.poll() is not None or any(
                i.status == COMPLETE for i in list_checkpoints(open_storage(url + "/circles", endpoint_url=s3.endpoint))),
                timeout=120, what="a first checkpoint")
            assert proxy.uploading.wait(timeout=60), "no upload to interrupt"
            proxy.outage = True
            t0 = time.monotonic()
            time.sleep(5)
            pids = workers(proc)
            assert len(pids) == 2, "training ended before the outage could bite"
            os.kill(pids[1], signal.SIGKILL)
            time.sleep(max(0.0, 60 - (time.monotonic() - t0)))
            failed_during = proxy.failed
            proxy.outage = False
            out = finish(proc, timeout=400)
        except BaseException:
            kill_tree(proc)
            raise
    assert proxy.failed > failed_during > 0
    same_weights(summary_of(url + "/circles", s3.endpoint), reference)
    infos = verified(url + "/circles", s3.endpoint)
    assert infos[-1].status == COMPLETE and infos[-1].step == reference["steps"]
    assert all(i.status == COMPLETE for i in infos if i.files)
    assert "resumed from checkpoint at step" in out


# ------------------------------------------------------------------ a hang


def test_a_stopped_rank_is_detected_named_and_the_group_resumes(tmp_path, reference):
    """SIGSTOP of rank 1: rank 0 stops arriving at its collectives' partner, its watchdog reports
    rank 1 within the bound (floor 3 s here), and torchrun restarts the group from the newest checkpoint."""
    proc = torchrun(str(tmp_path), "failure.hang_timeout_s=3", slow=0.1)
    try:
        ckpts = tmp_path / "circles" / "checkpoints"
        wait_until(lambda: proc.poll() is not None or (ckpts.is_dir() and any(
            (p / "manifest.json").exists() for p in ckpts.iterdir())), timeout=120, what="a first checkpoint")
        pids = workers(proc)
        os.kill(pids[1], signal.SIGSTOP)
        stopped = time.monotonic()
        out = finish(proc)
    except BaseException:
        kill_tree(proc)
        raise
    report = next((ln for ln in out.splitlines() if "hang detected" in ln), "")
    assert "rank(s) 1 did not arrive" in report and "heartbeat stopped" in report, out[-3000:]
    assert "rank(s) 0" not in report
    assert "restarting the worker group from the newest checkpoint" in report
    assert "resumed from checkpoint at step" in out
    summary = summary_of(tmp_path / "circles")
    assert summary["restarts"] >= 1
    same_weights(summary, reference)
    assert time.monotonic() - stopped < 120


# ------------------------------------------------------------------ a rank that reads other bytes


def test_a_rank_reading_other_bytes_than_rank_0_sends_every_rank_to_an_older_checkpoint(tmp_path, reference):
    """Finding 7: rank 1's copy of the newest checkpoint differs from what rank 0 verified (a node whose
    filesystem serves a stale copy): it is caught against rank 0's digests, rank 0 says so, and both
    ranks resume together from the next older checkpoint, never from bytes rank 0 did not check."""
    finish(torchrun(str(tmp_path), slow=0.0))  # 48 steps, a checkpoint every 4, the newest three kept
    out = finish(torchrun(str(tmp_path), "schedule.steps=52", slow=0.0,
                          faults=("--stale-reads-rank", "1", "--stale-step", "48")))
    assert "not every rank read rank 0's bytes (rank 1: model.pt does not match its sha256)" in out, out[-4000:]
    assert "resumed from checkpoint at step 44" in out, out[-4000:]
    assert summary_of(tmp_path / "circles")["steps"] == 52


# ------------------------------------------------------------------ a second driver


def test_a_second_driver_is_refused_and_the_first_run_is_untouched(tmp_path, reference):
    # Slow enough (48 steps, ~24 s) that both refused drivers, each a CLI start-up on a busy machine,
    # come while the first run still trains.
    proc = torchrun(str(tmp_path), slow=0.5)
    try:
        ckpts = tmp_path / "circles" / "checkpoints"
        wait_until(lambda: proc.poll() is not None or (ckpts.is_dir() and any(
            (p / "manifest.json").exists() for p in ckpts.iterdir())), timeout=120, what="a first checkpoint")
        for extra in ([], ["--fresh"]):
            r = run_cli("run", str(JOBS / "circles.yaml"), "--storage", str(tmp_path), *sets(), *extra,
                        timeout=60)
            assert r.returncode == 2, r.stdout + r.stderr
            assert "is in use" in r.stderr and "pid" in r.stderr and "lease" in r.stderr
            assert "Traceback" not in r.stderr
            assert proc.poll() is None, "the first run ended before the second driver was refused"
        out = finish(proc)
    except BaseException:
        kill_tree(proc)
        raise
    assert "--fresh: removed" not in out
    same_weights(summary_of(tmp_path / "circles"), reference)
    assert all(i.status == COMPLETE for i in verified(str(tmp_path / "circles")))


# ------------------------------------------------------------------ SIGTERM (Ray)


@pytest.mark.ray
def test_sigterm_checkpoints_the_current_step_and_the_restart_loses_none(ray_cluster, tmp_path, reference):
    """A SIGTERM to a Ray Train worker (spot reclaim, node drain): every rank checkpoints the step just
    finished, the group restarts from exactly that step, and the run ends where an uninterrupted one does."""
    from gradyard.job import load_job
    from gradyard.runner import run_job
    from testkit.faults import SlowSteps

    ps = psutil()
    result: dict = {}

    def train():
        try:
            spec = load_job(JOBS / "circles.yaml", [*JOB, "checkpoint.every_steps=10"])
            result["summary"] = run_job(spec, storage_url=str(tmp_path), callbacks=[SlowSteps(0.15)])
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    t = threading.Thread(target=train, daemon=True)
    t.start()
    ckpts = tmp_path / "circles" / "checkpoints"
    wait_until(lambda: "error" in result or (ckpts.is_dir() and any(
        (p / "manifest.json").exists() for p in ckpts.iterdir())), timeout=180, what="a first checkpoint")
    assert "error" not in result, result.get("error")

    def train_workers():
        out = []
        for proc in ps.process_iter(["name", "cmdline"]):
            try:
                if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []) and \
                        proc.environ().get("GRADYARD_TEST_CLUSTER") == ray_cluster.tag:
                    out.append(proc)
            except (ps.NoSuchProcess, ps.AccessDenied):
                pass
        return out

    victims = wait_until(lambda: len(w := train_workers()) == 2 and w, timeout=60, what="the workers")
    victims[0].send_signal(signal.SIGTERM)
    t.join(timeout=300)
    assert not t.is_alive(), "the run did not finish"
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary["restarts"] == 1
    steps = [i.step for i in verified(str(tmp_path / "circles")) if i.status == COMPLETE]
    preempted = [s for s in steps if s % 10 and s != summary["steps"]]
    # The preemption checkpoint is of the step in progress, not a scheduled one, and the restart
    # resumed from it: no step lost.
    assert summary["resumed_from_step"] in preempted or summary["resumed_from_step"] % 10, (steps, summary)
    same_weights(summary, reference)


# ------------------------------------------------------------------ a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a real filesystem that runs out of space (short writes, then ENOSPC)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        msg = f"cannot mount a tmpfs here ({r.stderr.strip()}); the full-disk test needs root"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


PAGE = 4096


class Fill(Callback):
    """A callback that fills the disk after given steps, leaving so many pages free (None: frees it)."""

    name = "fill_disk"
    events = frozenset((Event.BATCH_END,))

    def __init__(self, disk: Path, at: dict):
        self.disk, self.at = disk, at

    def on_event(self, event, state) -> None:
        if state.step not in self.at:
            return
        # The checkpoint before this step lands first: the disk fills for the next one, whatever the
        # (lowest-priority) writer's pace on a busy machine.
        checkpointer = state.trainer.checkpointer
        if checkpointer is not None and checkpointer.store is not None:
            checkpointer.store.wait()
        ballast = self.disk / "ballast"
        ballast.unlink(missing_ok=True)
        pages = self.at[state.step]
        if pages is not None:
            fill_disk(self.disk, pages)


def fill_disk(disk: Path, pages_free: int) -> None:
    st = os.statvfs(disk)
    room = st.f_bavail * st.f_frsize - pages_free * PAGE
    with open(disk / "ballast", "ab") as f:
        f.write(b"\0" * max(0, room))


def test_a_full_disk_never_loses_a_published_checkpoint(small_disk):
    """Short writes and ENOSPC in checkpoint files, manifests and records on a real (tiny) filesystem:
    what is being written fails, what was published stays intact, training goes on, and once there is
    space again the next checkpoints land.  A final checkpoint that cannot land fails the run, saying why;
    a run record that cannot be written fails the start, and the old record stays whole."""
    from gradyard.checkpoint import CheckpointFailed
    from test_checkpoints import train
    from testkit.faults import SlowSteps

    runs = small_disk / "runs"
    # circles' checkpoint files take 1, 3 and 5 pages, its manifest 1: with 2 pages free optimizer.pt
    # runs out part-way (a short write, then ENOSPC); with 9 free, the manifest does.
    # Slow steps: each checkpoint's background write is done before the next step fills the disk.
    summary = train(runs, "schedule.epochs=null", "schedule.steps=30", "checkpoint.every_steps=2",
                    "checkpoint.keep=3", callbacks=[SlowSteps(0.05), Fill(small_disk, {6: 2, 8: None, 12: 9, 14: None})])
    assert summary["status"] == "succeeded", summary.get("error")
    assert summary["checkpoints"]["failures_total"] == 2
    assert "No space left on device" in summary["checkpoints"]["last_error"]
    infos = verified(str(runs / "circles"))
    assert [i.step for i in infos] == [26, 28, 30] and all(i.status == COMPLETE for i in infos)
    assert not [p for p in (runs / "circles" / "checkpoints").iterdir() if p.name.startswith(".partial")]

    published = {i.name: (Path(i.path) / "model.pt").read_bytes() for i in infos}
    record = (runs / "circles" / "attempts.json").read_text()
    fill_disk(small_disk, 0)  # a full disk when the next run starts: the driver's check says so, and
    with pytest.raises(StorageError, match="not writable .*No space left on device"):
        train(runs, "schedule.epochs=null", "schedule.steps=40", "checkpoint.every_steps=2")
    (small_disk / "ballast").unlink()
    fill_disk(small_disk, 1)  # room for the run lease alone: the run record's write runs out
    with pytest.raises(OSError, match="No space left on device") as err:
        train(runs, "schedule.epochs=null", "schedule.steps=40", "checkpoint.every_steps=2")
    assert "attempts.json" in str(err.value)
    assert (runs / "circles" / "attempts.json").read_text() == record
    (small_disk / "ballast").unlink()

    # Full at the very end: the final checkpoint fails and the run fails with it, saying why.
    with pytest.raises(CheckpointFailed, match="the final checkpoint at step 40 could not be written: .*No space"):
        train(runs, "schedule.epochs=null", "schedule.steps=40", "checkpoint.every_steps=2",
              callbacks=[SlowSteps(0.05), Fill(small_disk, {39: 0})])
    (small_disk / "ballast").unlink(missing_ok=True)
    after = {i.name: (Path(i.path) / "model.pt").read_bytes() for i in verified(str(runs / "circles"))
             if i.status == COMPLETE}
    assert max(int(n.split("_")[1][:9]) for n in after) == 38
    assert all(after.get(n, b) == b for n, b in published.items())  # the old ones, where kept, untouched
