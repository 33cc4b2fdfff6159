"""Tell Prometheus where a run's workers serve their metrics, on the node where Prometheus reads.

Prometheus finds gradyard's workers through ``file_sd_configs`` files, one per
run (``<job name>-<run id>.json``), in a discovery directory on the node it
runs on (``GRADYARD_PROMETHEUS_SD_DIR``, default /tmp/gradyard/prometheus_sd,
the directory deploy/prometheus/prometheus.yml reads).  Rank 0 gathers every
rank's target (:class:`~gradyard.telemetry.exporter.PrometheusExporter`); this
module puts them there.

Decision: under Ray, rank 0 registers its run's targets with
:class:`HeadRegistry`, one detached actor pinned to the head node, which
writes the file into the *head's* discovery directory; without Ray
(``torchrun``), rank 0 writes the file into its own.  Prometheus runs on the
head of a Ray cluster (as Ray's own docs and deploy/prometheus/prometheus.yml
have it), so a VM or ``ray up`` cluster needs nothing shared: no NFS
directory, no port, no Prometheus change, and rank 0 may land on any node.
It is Ray's own scheme for its own metrics, one step removed: Ray's dashboard,
on the head, writes ``prom_metrics_service_discovery.json`` there from the
cluster's state in the GCS (``PrometheusServiceDiscoveryWriter``), so node
agents on other machines are found without sharing a thing.

Alternatives, and why not:

* HTTP service discovery (``http_sd_configs``) served from the head.  It
  needs a server that outlives every job, on a port fixed in prometheus.yml
  (one more port to open, to keep free, to protect: Ray's token does not
  cover it), and Prometheus keeps its last good answer when the server is
  down, so a stale list outlives the server.  The file needs no server:
  Prometheus reads it with inotify, and the shipped ``gradyard`` scrape job
  stays as it is for torchrun and Ray alike.
* Ray's per-node metrics path (``ray.util.metrics`` through each node's
  metrics agent): see :mod:`gradyard.telemetry.exporter` - it exists only in
  Ray workers, and renames and relabels the series.
* Ray's internal KV (GCS) as the record, with the file written by whoever
  reads it: something on the head must still write the file, and that
  something is this actor; the actor's memory is record enough, since every
  live run sends its whole registration again with each heartbeat (a
  restarted actor is complete again within one beat).
* A module of Ray's dashboard: the dashboard loads only the modules shipped
  inside Ray.  The job's driver: it may run off the cluster (``gradyard run
  --address``), and many jobs' drivers would contend for one place.

The actor asks for no CPU (``num_cpus=0``) and for a sliver of the resource
only the head has (``node:__internal_head__``), so it runs there and never
takes a training slot; it is named (``gradyard/prometheus_sd``), so every run
of every job finds the same one (``get_if_exists``), and detached, so it
outlives the run that started it.  A registration lives ``ttl_s`` after its
last heartbeat: rank 0 beats every ``ttl_s / 4``, so a run that ends without
withdrawing (SIGKILL, a lost node) loses its file within ``ttl_s``, and
Prometheus stops scraping it.  The one gap: the file of a run that died while
the actor itself was down stays until removed by hand (the
``GradyardTargetDown`` alert names it), as any file does under torchrun.

Security: the file carries what rank 0 sent - host:port and the identity
labels - and the shipped scrape config keeps nothing else (``labelkeep``;
``job`` and ``instance`` are Prometheus' own).  Calls to the actor go through
the cluster's own authentication (``RAY_AUTH_MODE=token``).  The directory is
this user's only (:func:`private_dir`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

DEFAULT_SD_DIR = "/tmp/gradyard/prometheus_sd"
TTL_S = 60.0
"""How long a run's registration outlives its last heartbeat (rank 0 beats every quarter of this)."""
PROTOCOL = 2
"""Version of the registry's calls and files, in the actor's name: a cluster's detached actor was
started by some earlier job's gradyard, and a newer gradyard must not call an older one."""
ACTOR_NAME, ACTOR_NAMESPACE = f"prometheus_sd_v{PROTOCOL}", "gradyard"
MARK = "__gradyard_head_registry"
"""A label on every group the registry writes (Prometheus drops ``__`` labels after relabelling): a
restarted registry adopts exactly its own files, so a run that died meanwhile still lapses."""
HEAD_RESOURCE = "node:__internal_head__"
"""The custom resource Ray gives the head node alone."""
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def running_ray():
    """The ``ray`` module when Ray is initialised in this process, else None (Ray is never imported to ask)."""
    ray = sys.modules.get("ray")  # a torchrun worker has none
    return ray if ray is not None and ray.is_initialized() else None


def sd_dir() -> Path:
    """This node's discovery directory."""
    return Path(os.environ.get("GRADYARD_PROMETHEUS_SD_DIR") or DEFAULT_SD_DIR)


class DiscoveryDirError(OSError):
    """A discovery directory another user could write to: targets written there could be forged."""


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) writable by this user only; refuse one another user controls.

    Prometheus reads the files, so the directory stays readable; what must not
    happen is another local user adding, replacing or removing targets, which
    would forge any job's series or break discovery.  So the directory and each
    parent up to a sticky shared one (``/tmp``) must belong to this user (or
    root) and be writable by nobody else.
    """
    path = Path(os.path.abspath(path))
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    uid = os.getuid() if hasattr(os, "getuid") else None
    for d in [path, *path.parents]:
        st = d.lstat()
        if stat.S_ISLNK(st.st_mode):
            raise DiscoveryDirError(f"{d} is a symbolic link: not writing Prometheus targets there")
        if st.st_mode & stat.S_ISVTX and st.st_mode & 0o002:
            break  # /tmp and its kind: others may create names here, but not take ours
        if uid is not None and st.st_uid not in (uid, 0):
            raise DiscoveryDirError(f"{d} belongs to uid {st.st_uid}, not this user ({uid}): not writing "
                                    "Prometheus targets there (set GRADYARD_PROMETHEUS_SD_DIR to a directory "
                                    "of your own)")
        if st.st_mode & 0o022:
            raise DiscoveryDirError(f"{d} is writable by other users (mode {st.st_mode & 0o777:o}): not writing "
                                    "Prometheus targets there")
    return path


def write_file_sd(path: Path, groups: list[dict[str, Any]]) -> None:
    """Write a file_sd JSON atomically: Prometheus never reads half a file."""
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(groups, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


PROTOCOL_MARK = str(PROTOCOL)
_TARGET = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}$")


def _valid(groups: Any) -> list[dict[str, Any]]:
    """file_sd groups of ``host:port`` targets and identity labels only, or ValueError: a caller with the
    cluster's token must not add a ``__metrics_path__``, a ``__param_*`` or any label of its own."""
    from gradyard.telemetry.metrics import IDENTITY_LABELS

    if not isinstance(groups, list) or not groups:
        raise ValueError("registration: a non-empty list of file_sd groups")
    for g in groups:
        if not isinstance(g, dict) or set(g) != {"targets", "labels"}:
            raise ValueError("registration: each group has exactly 'targets' and 'labels'")
        if not isinstance(g["targets"], list) or not all(isinstance(t, str) and _TARGET.match(t) for t in g["targets"]):
            raise ValueError(f"registration: targets must be host:port, not {g['targets']!r}")
        labels = g["labels"]
        if not isinstance(labels, dict) or not set(labels) <= set(IDENTITY_LABELS) or not all(
                isinstance(v, str) for v in labels.values()):
            raise ValueError(f"registration: labels may be only {', '.join(IDENTITY_LABELS)} (strings), "
                             f"not {sorted(labels) if isinstance(labels, dict) else labels!r}")
    return groups


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class FileRegistration:
    """The run's file_sd file, written into a directory of this node (torchrun, or a directory given)."""

    def __init__(self, key: str, directory: Optional[Path] = None):
        self.path = Path(directory or sd_dir()) / f"{key}.json"

    def publish(self, groups: list[dict[str, Any]]) -> None:
        write_file_sd(self.path, groups)

    def withdraw(self) -> None:
        _unlink(self.path)


class HeadRegistry:
    """Live runs' targets, each mirrored into a file_sd file of ``directory``; a run lapses ``ttl_s`` after
    its last :meth:`put`.  Runs on the head node as the actor :func:`head_registry` starts."""

    def __init__(self, directory: Optional[Path] = None, clock: Callable[[], float] = time.monotonic):
        self.directory = Path(directory or sd_dir())
        self.clock = clock
        self._runs: dict[str, tuple[list[dict[str, Any]], float]] = {}
        """key -> (groups, deadline on ``clock``)."""
        self._beats: dict[str, int] = {}
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"registration key {key!r}: letters, digits, '.', '_' and '-' only")
        return self.directory / f"{key}.json"

    def put(self, key: str, groups: list[dict[str, Any]], ttl_s: float = TTL_S) -> str:
        """Register or refresh a run; returns the file's path (on the head)."""
        path = self.path(key)
        groups = [{"targets": g["targets"], "labels": {**g["labels"], MARK: PROTOCOL_MARK}} for g in _valid(groups)]
        with self._lock:
            known = self._runs.get(key)
            self._runs[key] = (groups, self.clock() + ttl_s)
            self._beats[key] = self._beats.get(key, 0) + 1
            if known is None or known[0] != groups or not path.exists():
                write_file_sd(path, groups)
        return str(path)

    def adopt(self, ttl_s: float = TTL_S) -> list[str]:
        """Take back the files a registry wrote before this one started (an actor restart forgets its
        runs): each lapses ``ttl_s`` from now unless its run beats again.  Returns their keys."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                groups = json.loads(path.read_text())
                ours = isinstance(groups, list) and groups and all(g["labels"].get(MARK) == PROTOCOL_MARK for g in groups)
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                continue
            if ours and _KEY.match(path.stem):
                with self._lock:
                    self._runs.setdefault(path.stem, (groups, self.clock() + ttl_s))
                found.append(path.stem)
        return found

    def remove(self, key: str) -> None:
        path = self.path(key)
        with self._lock:
            self._runs.pop(key, None)
            _unlink(path)

    def expire(self) -> list[str]:
        """Drop the runs whose last heartbeat is older than their TTL; returns their keys."""
        with self._lock:
            now = self.clock()
            gone = [k for k, (_, deadline) in self._runs.items() if deadline <= now]
            for key in gone:
                del self._runs[key]
                _unlink(self.path(key))
        for key in gone:
            log.warning("run %s stopped its heartbeat: its Prometheus targets are removed", key)
        return gone

    def beats(self, key: str) -> int:
        """Puts received for ``key`` (its first and its heartbeats) since this registry started."""
        with self._lock:
            return self._beats.get(key, 0)

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._runs)


class _HeadRegistryActor(HeadRegistry):
    """The actor's body: the registry, plus a thread that lets silent runs lapse."""

    def __init__(self):
        super().__init__()
        self.adopt()
        threading.Thread(target=self._sweep, name="gradyard-sd-expiry", daemon=True).start()

    def _sweep(self) -> None:
        while True:
            time.sleep(1.0)
            try:
                self.expire()
            except Exception as exc:  # noqa: BLE001 - one failed sweep (a full disk) must not end the next ones
                log.warning("expiring Prometheus targets failed: %s", exc)


def head_registry():
    """The cluster's one :class:`HeadRegistry` actor, started on the head node if it is not running."""
    import ray

    return ray.remote(_HeadRegistryActor).options(
        name=ACTOR_NAME, namespace=ACTOR_NAMESPACE, get_if_exists=True, lifetime="detached",
        num_cpus=0, resources={HEAD_RESOURCE: 0.001}, max_restarts=-1, max_task_retries=-1,
    ).remote()


class HeadRegistration:
    """The run's targets registered with the head's :class:`HeadRegistry`, kept alive by a heartbeat."""

    def __init__(self, key: str, ttl_s: float = TTL_S):
        self.key, self.ttl_s = key, ttl_s
        self.path: Optional[str] = None
        """The file's path on the head node."""
        self._groups: list[dict[str, Any]] = []
        self._actor = None
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None

    def _call(self, method: str, *args: Any, timeout: float = 60) -> Any:
        import ray

        if self._actor is None:
            self._actor = head_registry()
        try:
            return ray.get(getattr(self._actor, method).remote(*args), timeout=timeout)
        except Exception:
            self._actor = None  # gone for good (killed, its node lost): look it up or start it again next time
            raise

    def _put(self) -> None:
        self.path = self._call("put", self.key, self._groups, self.ttl_s)

    def publish(self, groups: list[dict[str, Any]]) -> None:
        self._groups = groups
        self._put()
        if self._beat is None:
            self._beat = threading.Thread(target=self._heartbeat, name="gradyard-sd-heartbeat", daemon=True)
            self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self._put()
            except Exception as exc:  # noqa: BLE001 - the next beat tries again; training goes on
                log.warning("Prometheus registration heartbeat failed (%s); retrying", exc)

    def withdraw(self) -> None:
        # Bounded: the end of training must not wait on a slow head; a registration not withdrawn lapses.
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
        self._call("remove", self.key, timeout=10)


def open_registration(key: str, directory: Optional[Path] = None):
    """Where rank 0 registers the run: the head's registry under Ray, else a file in ``directory``
    (default :func:`sd_dir`).  A directory given means a file there, Ray or not."""
    if directory is None and running_ray() is not None:
        return HeadRegistration(key)
    return FileRegistration(key, directory)
