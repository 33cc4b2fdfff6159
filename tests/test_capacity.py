"""A job the cluster can never hold fails in seconds, naming the job key; one that only nodes an
autoscaler may add would hold waits for them, saying so, for scaling.resource_wait_s.

The comparison (gradyard.capacity) is unit-tested on node resource dicts; the real driver is run
on an embedded cluster, on the shared test cluster and on a cluster whose autoscaler adds nodes.
"""

from __future__ import annotations

import json
import time

import pytest

from conftest import JOBS, RayCluster, run_cli, wait_until
from gradyard.capacity import Demand, addable_node_types, assess, describe, fits, worker_bundle
from gradyard.job import ScalingSection, load_job

HEAD = {"CPU": 4.0, "memory": 8e9, "object_store_memory": 3e8, "node:127.0.0.1": 1.0,
        "node:__internal_head__": 1.0}
"""A node as ray.nodes() reports it: the test cluster's head."""
SMALL = {"CPU": 2.0, "memory": 4e9, "object_store_memory": 2e8, "node:127.0.0.2": 1.0}
GPU_NODE = {"CPU": 8.0, "GPU": 1.0, "memory": 3e10}


def demand(**scaling) -> Demand:
    return Demand.of(ScalingSection(**scaling))


@pytest.mark.unit
@pytest.mark.parametrize("scaling, nodes", [
    ({"num_workers": 4}, [HEAD]),                                      # Ray Train's default: 1 CPU each
    ({"num_workers": 6}, [HEAD, SMALL]),                               # PACK splits over nodes
    ({"num_workers": 2, "placement": "STRICT_SPREAD"}, [HEAD, SMALL]),
    ({"num_workers": 2, "resources_per_worker": {"CPU": 2}, "placement": "STRICT_PACK"}, [HEAD]),
    ({"num_workers": [2, 16]}, [HEAD]),                                # elastic: the minimum must fit
    ({"num_workers": 2, "use_gpu": True}, [GPU_NODE, GPU_NODE]),      # use_gpu alone asks no CPU
    ({"num_workers": 12, "resources_per_worker": {"CPU": 0.3333}}, [HEAD]),  # Ray's fixed point
    ({"num_workers": 8, "resources_per_worker": {"CPU": 0}}, [SMALL]),  # asks nothing at all
])
def test_fits(scaling, nodes):
    d = demand(**scaling)
    assert fits(d, nodes)
    assert assess(d, nodes, []).state == "fits"


@pytest.mark.unit
@pytest.mark.parametrize("scaling, nodes, key, says", [
    ({"num_workers": 2, "use_gpu": True}, [HEAD, SMALL], "scaling.use_gpu",
     "the job asks 2 workers x 1 GPU; this cluster has no GPU (2 nodes: 4 CPU, 2 CPU) and cannot add "
     "nodes; set scaling.use_gpu: false or run on a GPU cluster"),
    ({"num_workers": 9}, [HEAD], "scaling.num_workers",
     "the job asks 9 workers x 1 CPU; this cluster holds 4 such workers (1 node: 4 CPU)"),
    ({"num_workers": [5, 8]}, [HEAD], "scaling.num_workers", "at least 5 workers (elastic) x 1 CPU"),
    ({"num_workers": 4, "use_gpu": True}, [GPU_NODE, GPU_NODE], "scaling.num_workers",
     "this cluster holds 2 such workers (2 nodes: 2 x 8 CPU + 1 GPU)"),
    ({"num_workers": 2, "resources_per_worker": {"CPU": 3}, "placement": "STRICT_PACK"}, [HEAD, SMALL],
     "scaling.placement", "all on one node (STRICT_PACK); the largest node of this cluster holds 1 such worker"),
    ({"num_workers": 3, "placement": "STRICT_SPREAD"}, [HEAD, SMALL], "scaling.placement",
     "each on its own node (STRICT_SPREAD); this cluster has 2 nodes that hold one"),
    ({"resources_per_worker": {"CPU": 6}}, [HEAD, SMALL], "scaling.resources_per_worker",
     "no node of this cluster holds one worker's 6 CPU (2 nodes: 4 CPU, 2 CPU)"),
    ({"resources_per_worker": {"CPU": 3, "GPU": 1}}, [HEAD, {"CPU": 1.0, "GPU": 1.0}],
     "scaling.resources_per_worker", "no node of this cluster holds one worker's 3 CPU + 1 GPU"),
    ({"use_gpu": True, "resources_per_worker": {"GPU": 2}}, [GPU_NODE], "scaling.resources_per_worker",
     "holds one worker's 2 GPU"),
    ({"resources_per_worker": {"tpu_v5": 1}}, [HEAD], "scaling.resources_per_worker",
     "this cluster has no tpu_v5 (1 node: 4 CPU)"),
    ({}, [{"memory": 1e9}], "scaling.resources_per_worker",
     "1 CPU (Ray Train's default when scaling.resources_per_worker does not say)"),
])
def test_never_fits_names_the_key_and_what_the_cluster_has(scaling, nodes, key, says):
    verdict = assess(demand(**scaling), nodes, [])
    assert verdict.state == "never"
    assert verdict.key == key
    assert verdict.message.startswith(f"{key}: the job asks ")
    assert says in verdict.message, verdict.message
    assert "and cannot add nodes" in verdict.message


@pytest.mark.unit
def test_what_an_autoscaler_may_add_decides_between_waiting_and_failing():
    gpu_job = demand(num_workers=2, use_gpu=True)
    assert assess(gpu_job, [HEAD], [GPU_NODE]).state == "wait"      # fits only on a node type
    assert assess(gpu_job, [HEAD], None).state == "wait"            # node types unknown: may add
    never = assess(gpu_job, [HEAD], [SMALL])
    assert never.state == "never" and never.key == "scaling.use_gpu"
    assert "none of the node types its autoscaler can add holds it" in never.message
    packed = demand(num_workers=4, use_gpu=True, placement="STRICT_PACK")
    assert assess(packed, [HEAD], [GPU_NODE]).state == "never"      # any number of them, one GPU each
    assert assess(packed, [HEAD], [GPU_NODE, {**GPU_NODE, "GPU": 4.0}]).state == "wait"
    spread = demand(num_workers=3, placement="STRICT_SPREAD")
    assert assess(spread, [HEAD], [SMALL]).state == "wait"          # one more node per worker
    assert assess(demand(num_workers=2), [HEAD], []).state == "fits"


@pytest.mark.unit
def test_the_wait_is_bounded_by_the_job_file():
    assert ScalingSection().resource_wait_s == 600
    for bad in (-1, 86_401, float("inf")):
        with pytest.raises(ValueError):
            ScalingSection(resource_wait_s=bad)


@pytest.mark.unit
def test_nodes_are_described_by_what_matters_here():
    assert describe([HEAD, HEAD, SMALL]) == "3 nodes: 2 x 4 CPU, 2 CPU"
    assert describe([GPU_NODE, SMALL], {"CPU": 1, "ssd": 1}) == "2 nodes: 8 CPU + 1 GPU, 2 CPU"
    assert describe([]) == "no node"
    assert describe([{"memory": 1e9}, SMALL]) == "2 nodes: 2 CPU, 0 CPU"
    assert describe([SMALL, {"CPU": 1, "big": 1}, HEAD, SMALL], {"big": 1}) == "4 nodes: 2 x 2 CPU, 4 CPU, 1 CPU + 1 big"


@pytest.mark.unit
@pytest.mark.parametrize("resources, use_gpu", [
    ({}, False), ({}, True), ({"CPU": 2}, False), ({"CPU": 2}, True), ({"CPU": 0, "GPU": 0}, True),
    ({"GPU": 2, "ssd": 1}, True), ({"CPU": 0}, False), ({"ssd": 0.5}, False),
])
def test_the_worker_bundle_is_the_one_ray_train_reserves(resources, use_gpu):
    from gradyard.runner import scaling_config

    spec = load_job(JOBS / "circles.yaml", [f"scaling.resources_per_worker={json.dumps(resources)}",
                                            f"scaling.use_gpu={str(use_gpu).lower()}"])
    assert worker_bundle(resources, use_gpu) == scaling_config(spec)._resources_per_worker_not_none


# --- The real driver ----------------------------------------------------------------------------

def _one_error_line(r) -> str:
    """The CLI's contract for a bad job: exit 2, one `error:` line last, no traceback."""
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.stderr[-3000:]
    assert "training on Ray" not in r.stdout  # no worker was started
    return errors[0]


@pytest.mark.ray
def test_a_gpu_job_on_a_machine_without_gpus_fails_in_seconds(tmp_runs):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the job would run")
    t0 = time.monotonic()
    r = run_cli("run", str(JOBS / "alexnet.yaml"), "--set", "data.source=synthetic",
                "--set", "data.num_samples=64", "--set", "data.loader_workers=0",
                "--storage", str(tmp_runs), timeout=180, env={"RAY_ADDRESS": ""})  # an embedded cluster
    elapsed = time.monotonic() - t0
    line = _one_error_line(r)
    assert elapsed < 60, f"{elapsed:.0f} s: {line}"
    assert line.startswith("error: scaling.use_gpu: the job asks 4 workers x 1 GPU; "
                           "this machine's embedded Ray cluster has no GPU (1 node: "), line
    assert line.endswith("CPU) and cannot add nodes; set scaling.use_gpu: false or run on a GPU cluster"), line


@pytest.mark.ray
@pytest.mark.parametrize("sets, says", [
    (["scaling.num_workers=9"],
     "scaling.num_workers: the job asks 9 workers x 1 CPU; this cluster holds 4 such workers (1 node: 4 CPU) "
     "and cannot add nodes; ask for at most 4 workers"),
    (["scaling.num_workers=2", "scaling.resources_per_worker={CPU: 3}", "scaling.placement=STRICT_PACK"],
     "scaling.placement: the job asks 2 workers x 3 CPU, all on one node (STRICT_PACK); the largest node of "
     "this cluster holds 1 such worker (1 node: 4 CPU) and cannot add nodes; use placement PACK"),
], ids=["workers", "strict-pack"])
def test_more_than_the_shared_cluster_holds_fails_in_seconds(ray_cluster, tmp_runs, sets, says):
    t0 = time.monotonic()
    r = run_cli("run", str(JOBS / "circles.yaml"), "--address", ray_cluster.address, "--storage", str(tmp_runs),
                *(a for s in sets for a in ("--set", s)), timeout=180)
    elapsed = time.monotonic() - t0
    line = _one_error_line(r)
    assert elapsed < 60, f"{elapsed:.0f} s: {line}"
    assert line.startswith(f"error: {says}"), line


@pytest.mark.ray
def test_a_cluster_started_by_hand_reads_as_one_that_cannot_add_nodes(ray_cluster):
    """`ray start` runs Ray's read-only autoscaler, which mirrors the nodes there and adds none."""
    from ray.experimental.internal_kv import _internal_kv_get

    wait_until(lambda: _internal_kv_get("__autoscaling_status"), timeout=60, what="the autoscaler's report")
    assert addable_node_types() == []


@pytest.fixture(scope="module")
def autoscaling(tmp_path_factory):
    """A head of 2 CPU whose autoscaler (Ray's fake multi-node provider, real processes) can add one
    node of type `big`: 1 CPU and 1 `big`, a resource the head lacks."""
    config = tmp_path_factory.mktemp("autoscaler") / "cluster.json"
    cluster = RayCluster(num_cpus=2, worker_ports="24000-24999", head_args=(f"--autoscaling-config={config}",),
                         extra_env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    config.write_text(json.dumps({
        "cluster_name": "gradyard-test", "max_workers": 1, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "gcs_address": cluster.address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "big": {"resources": {"CPU": 1, "big": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1}},
        "head_node_type": "ray.head.default", "auth": {}, "docker": {},
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                           "rsync_exclude", "rsync_filter")},
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False}))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.mark.ray
@pytest.mark.multinode
def test_an_autoscaler_is_waited_for_visibly_and_for_no_longer_than_asked(autoscaling, tmp_runs):
    job = [str(JOBS / "circles.yaml"), "--address", autoscaling.address, "--storage", str(tmp_runs),
           "--set", "scaling.resources_per_worker={CPU: 1, big: 1}", "--set", "schedule.epochs=1"]
    # Only a node the autoscaler adds holds the worker: the driver says so, waits, and the job trains there.
    r = run_cli("run", *job, "--set", "scaling.num_workers=1", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "waiting for nodes (0 s of scaling.resource_wait_s 600 s): the job asks 1 worker x 1 CPU + 1 big; " \
           "this cluster has no big (1 node: 2 CPU)\n" in r.stdout, r.stdout
    assert "training on Ray" in r.stdout and (tmp_runs / "circles" / "summary.json").exists()
    # Two such workers: one is there now, the second cannot come (the node type's max_workers is 1),
    # which the driver cannot know.  With no waiting asked for, it fails at once.
    full = "scaling.num_workers: the job asks 2 workers x 1 CPU + 1 big; this cluster holds 1 such worker " \
           "(2 nodes: 2 CPU, 1 CPU + 1 big)"
    r = run_cli("run", *job, "--set", "scaling.resource_wait_s=0", timeout=180)
    assert "waiting for nodes" not in r.stdout
    assert _one_error_line(r) == f"error: {full} and scaling.resource_wait_s is 0: no waiting for nodes its " \
                                 "autoscaler may add; ask for at most 1 worker, or run on a larger cluster"
    # A short wait: the driver says what it waits for, then gives up, naming the key.
    t0 = time.monotonic()
    r = run_cli("run", *job, "--set", "scaling.resource_wait_s=2", timeout=180)
    line = _one_error_line(r)
    assert time.monotonic() - t0 < 60
    assert f"waiting for nodes (0 s of scaling.resource_wait_s 2 s): {full.split(': ', 1)[1]}" in r.stdout
    assert line.startswith(f"error: scaling.resource_wait_s: no nodes that hold the job came in 2 s: {full}; "
                           "raise scaling.resource_wait_s, or ask for at most 1 worker"), line
