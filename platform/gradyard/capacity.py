"""Whether a cluster can ever hold a job's workers: what the job asks against what the nodes have.

The comparison (:func:`assess`) is pure: node resource dicts in (``ray.nodes()``' totals), a
:class:`Verdict` out, so every case is unit-tested without Ray.  Below it, a few functions ask
Ray what the nodes are, whether the cluster can add any, and wait for them.
:func:`gradyard.runner.preflight_capacity` puts the two together before any worker starts:
start, wait visibly for an autoscaler, or fail naming the job key.

Totals, not what is free: a cluster busy with other jobs can still run this one later, and Ray
queues it; a cluster whose nodes are too small never can, and Ray would wait for ever.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Literal, Mapping, Optional, Sequence

GRAIN = 10_000
"""Ray keeps resource amounts as fixed point with 4 decimals: compare in those units, not floats."""
UNBOUNDED = 10 ** 9
"""Workers that fit a node when a worker asks for nothing."""
SHOWN = ("CPU", "GPU")
"""Always shown when describing nodes (with whatever the job asks for)."""

Resources = Mapping[str, float]


def worker_bundle(resources_per_worker: Mapping[str, float], use_gpu: bool) -> dict[str, float]:
    """One worker's Ray resources as Ray Train reserves them.

    Ray Train's rule (``ray.air.config.ScalingConfig._resources_per_worker_not_none``; v2's
    controller reserves nothing itself): none given is 1 CPU, or 1 GPU and no CPU with use_gpu;
    zeros are dropped; use_gpu adds 1 GPU unless one is given.  tests/test_capacity.py checks
    this copy against Ray's.
    """
    if not resources_per_worker:  # gradyard passes an empty dict to Ray as None
        return {"GPU": 1.0} if use_gpu else {"CPU": 1.0}
    bundle = {k: float(v) for k, v in resources_per_worker.items() if v != 0}
    if use_gpu:
        bundle.setdefault("GPU", 1.0)
    return bundle


@dataclass(frozen=True)
class Demand:
    """What a job asks of the cluster."""

    workers: int
    """Workers that must fit at once: all of them, or an elastic job's minimum."""
    bundle: Mapping[str, float]
    """One worker's resources (:func:`worker_bundle`); a worker's bundle must fit on one node."""
    placement: str
    """Ray's placement strategy: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD."""
    use_gpu: bool = False
    given: tuple[str, ...] = ()
    """The resources the job file names in scaling.resources_per_worker (the rest are defaults)."""
    elastic: bool = False

    @classmethod
    def of(cls, scaling) -> "Demand":
        """From a :class:`gradyard.job.ScalingSection`."""
        given = tuple(k for k, v in scaling.resources_per_worker.items() if v != 0)
        return cls(workers=scaling.min_workers, placement=scaling.placement, use_gpu=scaling.use_gpu,
                   bundle=worker_bundle(scaling.resources_per_worker, scaling.use_gpu), given=given,
                   elastic=not isinstance(scaling.num_workers, int))


@dataclass(frozen=True)
class Verdict:
    state: Literal["fits", "wait", "never"]
    """``fits``: the nodes there hold the job; ``wait``: only nodes the cluster may add would;
    ``never``: neither can."""
    key: str = ""
    """The job key to change (``scaling.use_gpu``, ``scaling.num_workers``...); empty when it fits."""
    asks: str = ""
    """What the job asks, e.g. ``the job asks 4 workers x 1 GPU``."""
    has: str = ""
    """What the nodes there offer, e.g. ``this cluster has no GPU (2 nodes: 4 CPU, 2 CPU)``."""
    fix: str = ""
    """What to change in the job or where to run it."""
    growth: str = ""
    """Why waiting cannot help (``never``), or what it waits for (``wait``)."""

    @property
    def message(self) -> str:
        """The one line a user reads."""
        if self.state == "fits":
            return "the cluster holds the job"
        return f"{self.key}: {self.asks}; {self.has}{self.growth}; {self.fix}"


def _units(amount: float) -> int:
    return round(amount * GRAIN)


def per_node(node: Resources, bundle: Resources) -> int:
    """How many workers' bundles fit on one node's totals."""
    counts = [_units(node.get(k, 0.0)) // _units(v) for k, v in bundle.items() if _units(v) > 0]
    return min(counts) if counts else UNBOUNDED


def fits(demand: Demand, nodes: Sequence[Resources]) -> bool:
    """Whether ``nodes`` hold ``demand.workers`` bundles under its placement strategy.

    Bundles are identical, so each node independently holds ``per_node`` of them and the
    strategies reduce to counts: STRICT_PACK needs them all on one node, STRICT_SPREAD one node
    per worker, PACK and SPREAD may split them over any nodes.
    """
    counts = [per_node(n, demand.bundle) for n in nodes]
    if demand.placement == "STRICT_PACK":
        return max(counts, default=0) >= demand.workers
    if demand.placement == "STRICT_SPREAD":
        return sum(1 for c in counts if c >= 1) >= demand.workers
    return sum(counts) >= demand.workers


def _amount(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _amounts(resources: Resources, keys: Sequence[str]) -> str:
    parts = [f"{_amount(resources[k])} {k}" for k in keys if resources.get(k, 0) > 0]
    return " + ".join(parts) or (f"0 {keys[0]}" if keys else "nothing")


def describe(nodes: Sequence[Resources], bundle: Optional[Resources] = None) -> str:
    """``3 nodes: 2 x 4 CPU, 2 CPU``: each node by the resources that matter here (CPU, GPU and what
    ``bundle`` asks for), identical ones counted."""
    bundle = bundle or {}
    keys = [k for k in SHOWN if k in bundle or any(n.get(k, 0) > 0 for n in nodes)]
    keys += sorted(k for k in bundle if k not in keys)
    shown = Counter(_amounts(n, keys) for n in nodes)
    largest = {_amounts(n, keys): tuple(-n.get(k, 0) for k in keys) for n in nodes}
    parts = [text if count == 1 else f"{count} x {text}"  # the most common first, then the largest
             for text, count in sorted(shown.items(), key=lambda kv: (-kv[1], largest[kv[0]]))]
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: {', '.join(parts)}" if nodes else "no node"


def _workers(demand: Demand) -> str:
    n = f"{demand.workers} worker{'s' if demand.workers != 1 else ''}"
    return f"at least {n} (elastic)" if demand.elastic else n


def _such(n: int) -> str:
    return f"{n} such worker{'s' if n != 1 else ''}"


def _per_worker_key(demand: Demand, resource: str) -> str:
    if resource == "GPU" and demand.use_gpu and "GPU" not in demand.given:
        return "scaling.use_gpu"
    return "scaling.resources_per_worker"


def shortfall(demand: Demand, nodes: Sequence[Resources], label: str = "this cluster") -> Verdict:
    """Why ``nodes`` do not hold ``demand``, naming the job key to change (state ``never``;
    :func:`assess` decides whether waiting may help)."""
    if fits(demand, nodes):
        return Verdict("fits")
    bundle = demand.bundle
    each = _amounts(bundle, list(bundle))
    asks = f"the job asks {_workers(demand)} x {each}"
    where = describe(nodes, bundle)
    for resource in bundle:  # a resource no node has at all
        if bundle[resource] > 0 and not any(n.get(resource, 0) > 0 for n in nodes):
            key = _per_worker_key(demand, resource)
            fix = ("set scaling.use_gpu: false or run on a GPU cluster" if key == "scaling.use_gpu" else
                   f"ask only for resources its nodes have, or run where nodes have {resource}")
            default = "" if resource in demand.given or key == "scaling.use_gpu" else \
                " (Ray Train's default when scaling.resources_per_worker does not say)"
            return Verdict("never", key, asks + default, f"{label} has no {resource} ({where})", fix)
    best = max((per_node(n, bundle) for n in nodes), default=0)
    if best == 0:  # every resource exists somewhere, but no one node holds a whole worker
        lacking = [k for k in bundle if max(_units(n.get(k, 0)) for n in nodes) < _units(bundle[k])]
        # Nothing lacking alone: the mix is the problem, and a mix is always partly the job file's.
        key = _per_worker_key(demand, lacking[0]) if lacking else "scaling.resources_per_worker"
        return Verdict("never", key, asks, f"no node of {label} holds one worker's {each} ({where})",
                       "a worker's resources must fit on one node: ask for less per worker")
    counts = [per_node(n, bundle) for n in nodes]
    if demand.placement == "STRICT_PACK":
        return Verdict("never", "scaling.placement", f"{asks}, all on one node (STRICT_PACK)",
                       f"the largest node of {label} holds {_such(best)} ({where})",
                       "use placement PACK, or fewer workers (scaling.num_workers)")
    if demand.placement == "STRICT_SPREAD":
        usable = sum(1 for c in counts if c >= 1)
        return Verdict("never", "scaling.placement", f"{asks}, each on its own node (STRICT_SPREAD)",
                       f"{label} has {usable} node{'s that hold' if usable != 1 else ' that holds'} one ({where})",
                       "use placement SPREAD or PACK, or fewer workers (scaling.num_workers)")
    total = min(sum(counts), UNBOUNDED)
    return Verdict("never", "scaling.num_workers", asks, f"{label} holds {_such(total)} ({where})",
                   f"ask for at most {total} worker{'s' if total != 1 else ''}, or run on a larger cluster")


def assess(demand: Demand, nodes: Sequence[Resources], addable: Optional[Sequence[Resources]],
           label: str = "this cluster") -> Verdict:
    """Start, wait or fail.

    ``addable``: the resources of each node type the cluster can add, any number of each; ``[]``
    when it can add none (an embedded or fixed cluster); None when that cannot be known (an
    autoscaler whose node types Ray does not tell a driver), which waits: a job that may start
    must not be refused, and the wait is visible and bounded (scaling.resource_wait_s).
    """
    verdict = shortfall(demand, nodes, label)
    if verdict.state == "fits":
        return verdict
    if addable is None:
        return replace(verdict, state="wait", growth="; waiting for its autoscaler to add nodes")
    # Any number of each type: the demand's worker count of each is as many as could ever help.
    grown = list(nodes) + [t for t in addable for _ in range(demand.workers)]
    if addable and fits(demand, grown):
        return replace(verdict, state="wait",
                       growth="; waiting for its autoscaler to add nodes of a type that holds it")
    if addable:
        return replace(verdict, growth=", and none of the node types its autoscaler can add holds it")
    return replace(verdict, growth=" and cannot add nodes")


# --- Asking Ray (imported lazily: the comparison above runs without Ray) -------------------------

SAY_EVERY_S = 30.0
"""While waiting for nodes, how often the driver says what it waits for."""


def alive_nodes() -> list[dict]:
    """``ray.nodes()`` without the dead ones."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def node_totals() -> list[dict]:
    """Each alive node's total resources, for :func:`assess`."""
    return [dict(n.get("Resources", {})) for n in alive_nodes()]


def addable_node_types() -> Optional[list]:
    """What the attached cluster can add, for :func:`assess`: [] nothing, None unknown.

    Ray does not tell a driver its autoscaler's node types (they live in a config file on the head
    node, or in KubeRay's RayCluster), so a real autoscaler reads as unknown, and unknown waits:
    refusing a job that a scale-up would have run is worse than a visible, bounded wait.  What
    can be known is when nothing can be added: no autoscaler reports, or the one that does is
    Ray's read-only one, which `ray start` runs on a hand-made cluster and which names each node
    type after the node it mirrors.  Autoscaler v2 reads as unknown too; while waiting,
    :func:`wait_for_nodes` asks it whether any of its node types fits.
    """
    import json

    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        if is_autoscaler_v2(fetch_from_server=True):
            return None
        raw = _internal_kv_get("__autoscaling_status")  # ray_constants.DEBUG_AUTOSCALING_STATUS (v1)
        if raw is None:
            return []  # no autoscaler (`ray start --head --no-monitor`, KubeRay without one)
        report = json.loads(raw).get("autoscaler_report") or {}
        types = {*(report.get("active_nodes") or {}), *(report.get("idle_nodes") or {}),
                 *(report.get("pending_launches") or {})}
        mirrored = {f"node_{n['NodeID']}" for n in alive_nodes()}
        return [] if types and types <= mirrored else None
    except Exception:  # noqa: BLE001 - unreadable autoscaler state: it may add nodes
        return None


def _infeasible(pg) -> bool:
    """Autoscaler v2's own verdict on the placement group: no node type it can add holds it."""
    import ray
    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    try:
        reply = GetClusterStatusReply()
        reply.ParseFromString(GcsClient(ray.get_runtime_context().gcs_address).get_cluster_status(timeout_s=5))
    except Exception:  # noqa: BLE001 - no verdict to read: keep waiting
        return False
    # Each request's details start with its placement group's id ("<id>:<strategy>|<state>").
    return any(g.details.startswith(pg.id.hex()) for g in reply.autoscaling_state.infeasible_gang_resource_requests)


def wait_for_nodes(job: str, demand: Demand, verdict: Verdict, limit_s: float,
                   label: str = "this cluster") -> None:
    """Ask the autoscaler for the workers and wait, saying so every 30 s, until the nodes hold them.

    The request is a placement group shaped as Ray Train's will be (the same bundles and
    strategy), so the autoscaler plans for exactly this job.  It is removed once the nodes are
    there, and Ray Train places its own on them moments later, well inside any idle timeout.
    Raises :class:`gradyard.job.JobError` after ``limit_s`` (scaling.resource_wait_s), or as soon
    as autoscaler v2 says none of its node types holds the job.
    """
    import time

    from ray.util.placement_group import placement_group, remove_placement_group

    from gradyard.job import JobError

    if limit_s <= 0:
        raise JobError(replace(verdict, growth=" and scaling.resource_wait_s is 0: no waiting for "
                                              "nodes its autoscaler may add").message)
    pg = placement_group([dict(demand.bundle)] * demand.workers, strategy=demand.placement)
    start = time.monotonic()
    said = start - SAY_EVERY_S
    try:
        while True:
            now = time.monotonic()
            if now - said >= SAY_EVERY_S:
                said = now
                print(f"[{job}] waiting for nodes ({now - start:.0f} s of scaling.resource_wait_s "
                      f"{limit_s:g} s): {verdict.asks}; {verdict.has}", flush=True)
            if now - start >= limit_s:
                raise JobError(f"scaling.resource_wait_s: no nodes that hold the job came in {limit_s:g} s: "
                               f"{verdict.key}: {verdict.asks}; {verdict.has}; raise scaling.resource_wait_s, "
                               f"or {verdict.fix}")
            if pg.wait(timeout_seconds=max(min(5.0, start + limit_s - now), 0.1)):
                return
            if _infeasible(pg):
                raise JobError(replace(verdict, state="never", growth=", and none of the node types "
                                       "its autoscaler can add holds it").message)
            verdict = assess(demand, node_totals(), None, label)
            if verdict.state == "fits":  # there, though busy: Ray Train queues for it like any job
                return
    finally:
        remove_placement_group(pg)
