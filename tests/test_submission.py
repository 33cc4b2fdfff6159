"""`ray job submit` and `gradyard submit` against a real Ray cluster, on one and two nodes."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from ray.job_submission import JobSubmissionClient

from conftest import JOBS, ROOT, VENV_BIN, RayCluster, quiet_success, run_cli, wait_until
from test_telemetry import Prometheus, prometheus_binary, shipped_prometheus_config
from gradyard.checkpoint import list_checkpoints
from gradyard.storage import open_storage

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def two_nodes():
    """Head on 127.0.0.2 (with the dashboard, 2 CPUs) and a worker node on 127.0.0.3 (3 CPUs), via Ray's CLI.

    As on two machines, each node has temporary directories of its own: Ray's (``--temp-dir``) and
    gradyard's Prometheus discovery directory (``node_sd_dirs``, head first).  The worker node has
    more room, so a SPREAD job's first bundle, and with it rank 0, lands there (Ray places each
    bundle on the node it leaves the most free)."""
    roots = [tempfile.mkdtemp(prefix=f"gynode{n}-", dir="/tmp") for n in ("a", "b")]
    # Not inside Ray's temp dir: Ray makes that one writable by everyone (private_dir refuses it).
    sd = [os.path.join(r, "gradyard", "prometheus_sd") for r in roots]
    cluster = RayCluster(ip="127.0.0.2", num_cpus=2, worker_ports="22000-22999", temp_dir=f"{roots[0]}/ray",
                         extra_env={"GRADYARD_PROMETHEUS_SD_DIR": sd[0]}).start()
    cluster.node_sd_dirs = sd
    cluster.worker_port = cluster.add_node("127.0.0.3", num_cpus=3, temp_dir=f"{roots[1]}/ray",
                                           env={"GRADYARD_PROMETHEUS_SD_DIR": sd[1]})
    client = JobSubmissionClient(cluster.dashboard)
    wait_until(lambda: len(client.get_version()) > 0, timeout=30, what="dashboard")
    yield cluster
    cluster.stop()
    for r in roots:
        shutil.rmtree(r, ignore_errors=True)




def test_gradyard_submit_refuses_a_broken_job_before_the_cluster(ray_cluster, tmp_path):
    bad = ROOT / f"jobs-broken-{uuid.uuid4().hex[:6]}.yaml"
    bad.write_text((JOBS / "circles.yaml").read_text().replace("lr: 0.01", "lr: -3"))
    try:
        r = run_cli("submit", str(bad), "--address", ray_cluster.dashboard, timeout=120)
    finally:
        bad.unlink()
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "ray." not in r.stderr.lower().split("error")[0]
    assert r.stderr.startswith("error: ")
    assert "optimizer.lr: input should be greater than 0" in r.stderr
    validate = run_cli("validate", str(JOBS / "circles.yaml"), "--set", "optimizer.lr=-3", timeout=60)
    assert "optimizer.lr: input should be greater than 0" in validate.stderr


def test_a_job_failing_on_the_cluster_fails_submit_with_its_error(ray_cluster):
    """`submit` waits by default (as `ray job submit` does) and exits 1 with the job's error."""
    r = run_cli("submit", "jobs/fashion-cnn.yaml", "--address", ray_cluster.dashboard,
                "--quiet", "--set", "data.source=/nonexistent/FashionMNIST", timeout=300)
    assert r.returncode == 1
    assert "data.source: nothing at /nonexistent/FashionMNIST" in r.stderr
    assert "Traceback" not in r.stderr
    job_id = r.stdout.strip().splitlines()[0]
    st = run_cli("status", job_id, "--address", ray_cluster.dashboard, timeout=60)
    assert st.returncode == 1 and "FAILED" in st.stdout
    assert len(st.stdout.strip().splitlines()) == 1, st.stdout  # Ray's message carries the job's logs


def test_the_cli_behaves_like_rays_and_every_exit_code_follows_the_scheme(ray_cluster, tmp_path):
    """--no-wait, `list` while it runs, `logs -f` streaming it, --json everywhere, exit codes 0/1/2,
    and RAY_ADDRESS as the default address."""
    env = {"RAY_ADDRESS": ray_cluster.dashboard}
    sub = run_cli("submit", "jobs/circles.yaml", "--no-wait", "--json", "--storage", str(tmp_path),
                  "--set", "schedule.epochs=null", "--set", "schedule.steps=1500",
                  "--set", "checkpoint.every_steps=500", "--set", "telemetry.enabled=false",
                  env=env, timeout=120)
    assert sub.returncode == 0, sub.stderr
    job_id = json.loads(sub.stdout)["submission_id"]

    follow = subprocess.Popen([str(VENV_BIN / "gradyard"), "logs", job_id, "-f"], cwd=ROOT,
                              env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        client = JobSubmissionClient(ray_cluster.dashboard)
        # A line of training arrives while the job still runs: the logs stream, they are not
        # fetched once at the end.
        while True:
            line = follow.stdout.readline()
            assert line, "logs -f ended without a line of training: " + follow.stderr.read()[-3000:]
            if "[circles] epoch" in line:
                break
        assert str(client.get_job_status(job_id)) in ("RUNNING", "JobStatus.RUNNING")
        listed = run_cli("list", "--json", env=env, timeout=60)
        assert listed.returncode == 0, listed.stderr
        row = next(r for r in json.loads(listed.stdout) if r["submission_id"] == job_id)
        assert row["status"] == "RUNNING" and row["gradyard_job"] == "circles"
        assert row["run_dir"] == f"{tmp_path}/circles" and row["progress"]["total"] == 1500
        table = run_cli("list", env=env, timeout=60).stdout
        assert job_id in table and "circles" in table and "SUBMISSION ID" in table
        rest, err = follow.communicate(timeout=300)
    finally:
        follow.kill()
    assert follow.returncode == 0, err[-3000:]
    assert "[circles] finished: 1500 steps" in rest
    st = run_cli("status", job_id, "--json", env=env, timeout=60)
    assert st.returncode == 0 and json.loads(st.stdout)["status"] == "SUCCEEDED"
    assert set(json.loads(st.stdout)) >= {"submission_id", "status", "message", "gradyard_job", "run_dir",
                                          "start_time", "end_time"}
    logs = run_cli("logs", job_id, "--json", env=env, timeout=60)
    assert logs.returncode == 0 and "finished: 1500 steps" in json.loads(logs.stdout)["logs"]
    quiet_success(json.loads(logs.stdout)["logs"])

    # Exit status 2: an unknown job id, a run directory that is not there, a bad job file, usage.
    for args in (["status", "raysubmit_nonexistent"], ["logs", "raysubmit_nonexistent"],
                 ["checkpoints", str(tmp_path / "nonexistent")],
                 ["validate", "jobs/circles.yaml", "--set", "optimizer.lr=-1"], ["run", "--nonsense"],
                 ["run", "jobs/circles.yaml", "--address", "127.0.0.1:1", "--storage", str(tmp_path / "x")]):
        r = run_cli(*args, env=env, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
    v = run_cli("validate", "jobs/circles.yaml", "jobs/blobs.yaml", "--json", timeout=60)
    assert v.returncode == 0 and [x["ok"] for x in json.loads(v.stdout)] == [True, True]
    assert run_cli("--version").stdout.startswith("gradyard ")




@pytest.mark.multinode
def test_ray_job_submit_exactly_as_the_readme_shows(two_nodes, s3):
    ray_cluster = two_nodes
    job_id = f"gy-{uuid.uuid4().hex[:8]}"
    run_url = f"s3://gradyard-test/submit-{job_id}"
    # The README's command line, with the S3 test server as storage.
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard,
           "--working-dir", ".", "--submission-id", job_id, "--",
           "python", "-m", "gradyard.launch", "jobs/circles.yaml",
           "--set", "schedule.epochs=2", "--set", f"storage.url={run_url}",
           "--set", f"storage.endpoint_url={s3.endpoint}"]
    readme = (ROOT / "README.md").read_text()
    assert "ray job submit --address http://HEAD:8265 --working-dir . -- python -m gradyard.launch jobs/" in readme
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired:
        logs = run_cli("logs", job_id, "--address", ray_cluster.dashboard, timeout=60)
        pytest.fail(f"ray job submit did not finish; job logs:\n{logs.stdout[-5000:]}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr).lower()

    status = run_cli("status", job_id, "--address", ray_cluster.dashboard, timeout=60)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    logs = run_cli("logs", job_id, "--address", ray_cluster.dashboard, timeout=60)
    assert logs.returncode == 0
    assert "[circles] finished: 26 steps, 2 epochs" in logs.stdout
    token = os.environ["RAY_AUTH_TOKEN"]
    for text in (r.stdout, r.stderr, status.stdout, status.stderr, logs.stdout, logs.stderr):
        assert token not in text
    storage = open_storage(f"{run_url}/circles", endpoint_url=s3.endpoint)
    infos = list_checkpoints(storage)
    assert infos and infos[-1].status == "complete" and infos[-1].step == 26
    assert storage.fs.exists(storage.join("summary.json"))


def _submit(cluster, *args: str, entrypoint: str = "python -m gradyard.launch", timeout: float = 400,
            env: dict | None = None) -> tuple[str, str]:
    """(final status, logs) of a job submitted with Ray's job API."""
    client = JobSubmissionClient(cluster.dashboard)
    job_id = client.submit_job(entrypoint=f"{entrypoint} " + shlex.join(args),
                               runtime_env={"working_dir": str(ROOT), "env_vars": env or {},
                                            "excludes": [".venv/", ".git/", "runs/"]})
    status = wait_until(lambda: (s := str(client.get_job_status(job_id).value)) in
                        ("SUCCEEDED", "FAILED", "STOPPED") and s, timeout=timeout, interval=1,
                        what=f"job {job_id}")
    return status, client.get_job_logs(job_id)


def _submit_and_wait(cluster, *args: str, **kw) -> str:
    status, logs = _submit(cluster, *args, **kw)
    assert status == "SUCCEEDED", logs[-4000:]
    return logs


@pytest.mark.multinode
def test_local_storage_with_workers_on_several_nodes_is_refused_before_they_start(two_nodes, tmp_path):
    """Each node would write its own copy of the run directory and resume from a stale one."""
    status, logs = _submit(two_nodes, "jobs/circles.yaml", "--set", "scaling.placement=SPREAD",
                           "--storage", str(tmp_path), timeout=200)
    assert status == "FAILED"
    assert "storage.url:" in logs and "is a local path, but this cluster has 2 nodes" in logs
    assert "storage.shared: true" in logs and "Traceback" not in logs
    assert "training on Ray" not in logs, "no worker may start"


@pytest.mark.multinode
def test_spread_puts_one_worker_on_each_node_and_trains_over_gloo(two_nodes, tmp_path):
    # The two "nodes" share this machine's disk, so a local run directory is shared: say so.
    _submit_and_wait(two_nodes, "jobs/circles.yaml", "--set", "schedule.epochs=4",
                     "--set", "scaling.placement=STRICT_SPREAD", "--set", "telemetry.enabled=false",
                     "--set", "storage.shared=true", "--storage", str(tmp_path))
    summary = json.loads((tmp_path / "circles" / "summary.json").read_text())
    ranks = {r["rank"]: r for r in summary["ranks"]}
    assert len(ranks) == 2 and ranks[0]["node"] != ranks[1]["node"], summary["ranks"]
    assert {r["node_ip"] for r in ranks.values()} == {"127.0.0.2", "127.0.0.3"}
    assert summary["metrics"]["test_accuracy"] > 0.9  # DDP over gloo between the nodes learned


@pytest.mark.multinode
@pytest.mark.prometheus
def test_prometheus_on_the_head_scrapes_every_rank_of_both_nodes_with_nothing_shared(two_nodes, s3, tmp_path):
    """Prometheus on the head with the shipped config (paths substituted) scrapes all four ranks of a
    SPREAD job on both nodes, though rank 0 runs on the other node and the nodes share no directory;
    Ray's own series of the same workers join gradyard's on Ray Train's run and rank labels."""
    head_sd = Path(two_nodes.node_sd_dirs[0])
    prom = Prometheus(prometheus_binary(), tmp_path, config=shipped_prometheus_config({
        "/tmp/ray/": f"{two_nodes.temp_dir}/", "/tmp/gradyard/prometheus_sd/": f"{head_sd}/"}))
    name = f"sd-{uuid.uuid4().hex[:6]}"
    run = f'ray_train_run_name="{name}"'
    marker, release = tmp_path / "marker", tmp_path / "release"
    client = JobSubmissionClient(two_nodes.dashboard)
    try:
        prom.wait_ready(time.monotonic() + 30)
        job_id = client.submit_job(
            entrypoint="python testkit/launch_faults.py --on-cluster " + shlex.join([
                "--hold-until", str(release), "--marker", str(marker), "jobs/circles.yaml",
                "--set", f"name={name}", "--set", "scaling.num_workers=4", "--set", "scaling.placement=SPREAD",
                "--set", "schedule.epochs=null", "--set", "schedule.steps=10", "--set", "checkpoint.every_steps=10",
                "--set", f"storage.url=s3://gradyard-test/{name}", "--set", f"storage.endpoint_url={s3.endpoint}"]),
            runtime_env={"working_dir": str(ROOT), "excludes": [".venv/", ".git/", "runs/"]})
        ended = ("SUCCEEDED", "FAILED", "STOPPED")
        wait_until(lambda: marker.exists() or str(client.get_job_status(job_id).value) in ended, timeout=300,
                   interval=1, what="every rank at the end of training")
        assert marker.exists(), client.get_job_logs(job_id)[-4000:]
        # Every rank, held at the end of training: scraped at its last step.
        steps = wait_until(lambda: len(r := prom.query(f"gradyard_steps_total{{{run}}} == 10")) == 4 and r,
                           timeout=60, interval=0.5, what="all four ranks scraped on the head")
        ranks = {s["metric"]["ray_train_worker_world_rank"]: s["metric"]["instance"].rsplit(":", 1)[0]
                 for s in steps}
        assert sorted(ranks) == ["0", "1", "2", "3"]
        assert ranks["0"] == "127.0.0.3", f"rank 0 on the node without Prometheus (Ray placed it: {ranks})"
        assert set(ranks.values()) == {"127.0.0.2", "127.0.0.3"}
        assert len(prom.query(f'up{{job="gradyard",{run}}} == 1')) == 4
        # Ray's own metrics agents of both nodes, from Ray's discovery file on the head.
        agents = {u["metric"]["instance"].rsplit(":", 1)[0] for u in prom.query('up{job="ray"} == 1')}
        assert {"127.0.0.2", "127.0.0.3"} <= agents
        release.touch()
        # Ray Train reports its per-worker series at the run's end (gradyard reports once): join the
        # last of each on Ray Train's labels; every rank finds its Ray worker, on the same node.
        join = (f"last_over_time(gradyard_steps_total{{{run}}}[10m]) + on (ray_train_run_name, "
                f"ray_train_worker_world_rank) group_left (NodeAddress, ray_train_worker_actor_id) "
                f"(0 * last_over_time(ray_train_report_total_blocked_time_s{{{run}}}[10m]))")
        joined = wait_until(lambda: len(r := prom.query(join)) == 4 and r, timeout=120, interval=1,
                            what="Ray Train's worker series of all four ranks")
        assert {j["metric"]["ray_train_worker_world_rank"]: j["metric"]["NodeAddress"] for j in joined} == ranks
        assert {float(j["value"][1]) for j in joined} == {10.0}
        status = wait_until(lambda: (s := str(client.get_job_status(job_id).value)) in ended and s,
                            timeout=300, interval=1, what="job end")
        assert status == "SUCCEEDED", client.get_job_logs(job_id)[-4000:]
        # The run withdrew its targets at its end.
        wait_until(lambda: not list(head_sd.glob("*.json")), timeout=60, what="the run's file_sd removed")
    finally:
        release.touch()
        prom.stop()


@pytest.mark.multinode
def test_losing_a_worker_node_continues_elastically_on_what_is_left(two_nodes, tmp_path):
    """Shows which: with num_workers [1, 2] and 2 CPUs per worker (one worker per
    node), the job resumes from its newest checkpoint on the capacity left (1
    worker on the head) instead of waiting for the node to come back.
    Runs last in this module: it takes the second node away."""
    ckpts = tmp_path / "circles" / "checkpoints"

    def lose_node_after_first_checkpoint():
        wait_until(lambda: ckpts.is_dir() and any((p / "manifest.json").exists() for p in ckpts.iterdir()),
                   timeout=300, what="a complete checkpoint")
        two_nodes.kill_node(two_nodes.worker_port)

    import threading

    t = threading.Thread(target=lose_node_after_first_checkpoint, daemon=True)
    t.start()
    logs = _submit_and_wait(
        two_nodes, "--on-cluster", "--slow", "0.2", "jobs/circles.yaml", "--set", "schedule.epochs=3",
        "--set", "scaling.num_workers=[1, 2]", "--set", "scaling.placement=SPREAD",
        "--set", "scaling.resources_per_worker={CPU: 2}", "--set", "checkpoint.every_steps=5",
        "--set", "failure.max_failures=3", "--set", "telemetry.enabled=false", "--set", "storage.shared=true",
        "--storage", str(tmp_path), entrypoint="python testkit/launch_faults.py", timeout=500)
    t.join(5)
    summary = json.loads((tmp_path / "circles" / "summary.json").read_text())
    assert summary["restarts"] >= 1, logs[-3000:]
    assert summary["resumed_from_step"] and summary["resumed_from_step"] > 0
    assert summary["world_size"] == 1, "continued on the capacity left"
    assert {r["node_ip"] for r in summary["ranks"]} == {"127.0.0.2"}
    assert "resumed from checkpoint at step" in logs


@pytest.mark.unit
def test_both_submit_paths_upload_the_same_files_and_never_the_repository():
    """Ray's own packaging walk (the one `ray job submit --working-dir .` runs) over this checkout:
    the README's plain command and `gradyard submit` (its excludes) upload the same files, and
    neither .git/ nor .venv/."""
    import logging

    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    from gradyard.submit import EXCLUDES

    def uploaded(excludes: list[str]) -> set[str]:
        seen: set[str] = set()
        _dir_travel(ROOT, [_get_excludes(ROOT, excludes)], lambda p: p.is_file() and seen.add(p.relative_to(ROOT).as_posix()),
                    include_gitignore=True, logger=logging.getLogger("test"))
        return seen

    plain, ours = uploaded([]), uploaded(EXCLUDES)
    assert plain == ours
    assert "platform/gradyard/cli.py" in plain and "jobs/circles.yaml" in plain
    assert not [p for p in plain if p.split("/")[0] in (".git", ".venv", ".hypothesis")]
