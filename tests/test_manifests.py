"""The deployment files agree with each other, with Ray's schema and with the package.

The image name, the Ray version, the token-auth settings, the metrics port and
the GPU resource names are repeated in cluster/*.yaml (Ray cluster launcher),
deploy/kuberay/*.yaml (KubeRay) and deploy/docker/Dockerfile.  These tests keep
the copies in step.  They only read files; no Ray cluster is started.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10; pytest depends on tomli there
    import tomli as tomllib

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

pytestmark = pytest.mark.unit

from gradyard.job import load_job

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
CLUSTER_CONFIGS = sorted((REPO / "cluster").glob("*.yaml"))
KUBERAY_MANIFESTS = sorted((REPO / "deploy" / "kuberay").glob("*.yaml"))
DEPLOY_DOC = REPO / "docs" / "deploy.md"

# Where the manifests take the token from: a Secret with the key that KubeRay's
# own authOptions.secretName also expects.
AUTH_SECRET = {"name": "gradyard-ray-auth", "key": "auth_token"}
METRICS_PORT = 8080

# GPUs per EC2 instance type, from AWS's accelerated-computing instance table.
# A GPU node type in cluster/*.yaml must use one of these and advertise this many GPUs.
EC2_GPUS = {
    "g4dn.xlarge": 1, "g4dn.2xlarge": 1, "g4dn.12xlarge": 4,
    "g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8,
    "g6.xlarge": 1, "g6.12xlarge": 4,
    "p3.2xlarge": 1, "p3.8xlarge": 4, "p3.16xlarge": 8,
    "p4d.24xlarge": 8, "p5.48xlarge": 8,
}  # fmt: skip


# ------------------------------------------------------------------ helpers


def _yaml_docs(path: Path) -> list:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _one(pattern: str, text: str, what: str) -> str:
    found = re.findall(pattern, text, flags=re.MULTILINE)
    assert len(found) == 1, f"{what}: expected exactly one match of {pattern!r}, found {found}"
    return found[0]


def _dockerfile() -> str:
    """The Dockerfile with its continuation lines joined, one instruction per line."""
    return re.sub(r"\\\n", " ", DOCKERFILE.read_text())


def _image() -> str:
    """The image name, decided by the `# image: ...` line at the top of the Dockerfile."""
    return _one(r"^# image: (\S+)\s*$", _dockerfile(), str(DOCKERFILE))


def _dockerfile_ray_version() -> str:
    return _one(r"^ARG RAY_VERSION=(\S+)\s*$", _dockerfile(), str(DOCKERFILE))


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirement(name: str) -> Requirement:
    for dep in _pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == name:
            return req
    raise AssertionError(f"pyproject.toml has no dependency on {name}")


def _kuberay_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in KUBERAY_MANIFESTS for d in _yaml_docs(p)]


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    """Every RayClusterSpec: a RayCluster's spec and a RayJob's rayClusterSpec."""
    specs = []
    for path, doc in _kuberay_docs():
        where = f"{path.relative_to(REPO)}:{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "RayCluster":
            specs.append((where, doc["spec"]))
        elif doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
            specs.append((where, doc["spec"]["rayClusterSpec"]))
    return specs


def _groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, group) for the head group and each worker group."""
    return [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]


def _ray_containers(spec: dict) -> list[tuple[str, dict]]:
    return [
        (name, c) for name, g in _groups(spec) for c in g["template"]["spec"]["containers"]
    ]


def _submitter_containers() -> list[tuple[str, dict]]:
    out = []
    for path, doc in _kuberay_docs():
        if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
            for c in doc["spec"]["submitterPodTemplate"]["spec"]["containers"]:
                out.append((f"{path.name}:submitter", c))
    return out


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _assert_token_auth_env(env: dict[str, dict], where: str) -> None:
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", (
        f"{where}: RAY_AUTH_MODE must be 'token'"
    )
    token = env.get("RAY_AUTH_TOKEN")
    assert token is not None, f"{where}: RAY_AUTH_TOKEN is not set"
    assert "value" not in token, f"{where}: RAY_AUTH_TOKEN must come from a Secret, not a value"
    assert token.get("valueFrom", {}).get("secretKeyRef") == AUTH_SECRET, (
        f"{where}: RAY_AUTH_TOKEN must be valueFrom.secretKeyRef {AUTH_SECRET}"
    )


def _gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _cpus(container: dict) -> str:
    """A container's CPU limit (what KubeRay advertises to Ray), else its request."""
    resources = container.get("resources", {})
    return str(resources.get("limits", {}).get("cpu") or resources.get("requests", {}).get("cpu") or 0)


def _cpu_quantity(q: str) -> float:
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _cluster_config(path: Path) -> dict:
    (doc,) = _yaml_docs(path)
    return doc


def _start_command(commands: list[str], marker: str) -> list[str]:
    """The tokens of the shell command that runs `ray start` with `marker` in it."""
    for command in commands:
        for part in re.split(r";|&&", command):
            tokens = shlex.split(part)
            if "ray" in tokens and "start" in tokens and marker in tokens:
                return tokens
    raise AssertionError(f"no `ray start ... {marker}` among {commands}")


def _text_files() -> list[tuple[Path, str]]:
    """(path, text) of every text file under cluster/ and deploy/, and docs/deploy.md."""
    paths = [p for d in ("cluster", "deploy") for p in (REPO / d).rglob("*") if p.is_file()]
    out = []
    for path in sorted(paths + ([DEPLOY_DOC] if DEPLOY_DOC.exists() else [])):
        try:
            out.append((path, path.read_text()))
        except UnicodeDecodeError:
            pass  # images and other binaries
    return out


# ------------------------------------------------------------------ every file


def test_every_manifest_parses():
    paths = [
        p
        for d in ("cluster", "deploy")
        for p in (REPO / d).rglob("*")
        if p.suffix in (".yaml", ".yml", ".json")
    ]
    assert paths, "no manifests under cluster/ and deploy/"
    for path in paths:
        if path.suffix == ".json":
            json.loads(path.read_text())
            continue
        docs = _yaml_docs(path)
        assert docs, f"{path}: empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            if "apiVersion" in doc and "kind" in doc:
                assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} has no name"


def test_image_name_is_decided_in_the_dockerfile():
    image = _image()
    m = re.fullmatch(r"[a-z0-9.-]+(?::\d+)?/[a-z0-9._/-]+:(?P<version>[0-9][^-]*)-cu(?P<cuda>\d+)", image)
    assert m, f"image {image!r} is not <registry>/<repo>:<version>-cu<NNN>"
    assert m["version"] == _pyproject()["project"]["version"], (
        "the image tag must carry the gradyard version from pyproject.toml"
    )
    init = (REPO / "platform" / "gradyard" / "__init__.py").read_text()
    assert m["version"] == _one(r'^__version__ = "([^"]+)"', init, "gradyard/__init__.py")
    # The CUDA of the locked torch build, the one CI runs (a CUDA build that also runs on CPU).
    import torch

    assert torch.version.cuda, "CI's torch is not a CUDA build: the image's would not be the same"
    assert m["cuda"] == torch.version.cuda.replace(".", ""), f"tag says cu{m['cuda']}, torch has {torch.version.cuda}"
    assert f"-t {image} " in _dockerfile(), "the build command in the Dockerfile must tag the image"


def test_image_is_the_same_everywhere():
    image = _image()
    seen: dict[str, str] = {}
    for path in CLUSTER_CONFIGS:
        docker = _cluster_config(path).get("docker", {})
        assert docker.get("image"), f"{path}: no docker.image"
        for key in ("image", "head_image", "worker_image"):
            if key in docker:
                seen[f"{path.name}:docker.{key}"] = docker[key]
    for where, spec in _ray_cluster_specs():
        for name, c in _ray_containers(spec):
            seen[f"{where}:{name}/{c['name']}"] = c["image"]
        if "image" in spec.get("autoscalerOptions", {}):
            seen[f"{where}:autoscaler"] = spec["autoscalerOptions"]["image"]
    for where, c in _submitter_containers():
        seen[where] = c["image"]
    assert seen, "no image references found"
    # Also every mention in text (comments, docs), so no stale tag survives.
    repo_name = image.rsplit(":", 1)[0]
    for path, text in _text_files():
        for i, mention in enumerate(re.findall(rf"{re.escape(repo_name)}:[\w.-]+", text)):
            seen[f"{path.relative_to(REPO)}#mention{i}"] = mention
    wrong = {k: v for k, v in seen.items() if v != image}
    assert not wrong, f"these do not use {image}: {wrong}"


def test_ray_version_is_pinned_consistently():
    installed = ray.__version__
    assert _dockerfile_ray_version() == installed
    assert _locked()["ray"] == installed
    assert _requirement("ray").specifier.contains(installed)
    specs = _ray_cluster_specs()
    assert specs, "no RayCluster specs under deploy/kuberay"
    for where, spec in specs:
        assert str(spec.get("rayVersion")) == installed, f"{where}: rayVersion"


def _locked() -> dict[str, str]:
    text = (REPO / "requirements.lock").read_text()
    return {re.sub(r"[-_.]+", "-", m[1]).lower(): m[2]
            for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)$", text, flags=re.MULTILINE)}


def test_the_image_and_ci_install_the_same_locked_versions():
    """One lock for CI, `make` and the image: the torch, torchvision and ray CI runs are the locked
    ones, and the Dockerfile installs under the same lock (so the GPU image runs the torch CI tests)."""
    import importlib.metadata as md

    locked = _locked()
    for package in ("torch", "torchvision", "ray", "pydantic", "s3fs", "prometheus-client"):
        assert md.version(package) == locked[package.lower()], package
    assert len(locked) > 100, "the lock holds the whole dependency set, not a few pins"
    text = _dockerfile()
    assert re.search(r"^COPY [^\n]*\brequirements\.lock\b", text, flags=re.MULTILINE)
    installs = re.findall(r"pip install ([^\n]*?)(?:&&|$)", text, flags=re.MULTILINE)
    ours = [i for i in installs if re.search(r"\s\.\s*$|\s\.\s", i + " ")]
    assert len(ours) == 1, installs  # one install of gradyard itself
    install = ours[0]
    assert re.search(r"(?:-c|--constraint) requirements\.lock\b", install), install
    packages = shlex.split(re.sub(r"(?:-c|--constraint) \S+", "", install))
    assert "ray[default,train]==${RAY_VERSION}" in packages and "." in packages
    makefile = (REPO / "Makefile").read_text()
    assert "-c requirements.lock -e '.[test]'" in makefile
    # rsync and ssh for the cluster launcher and autoscaler; wget for KubeRay's probes.
    for tool in ("rsync", "openssh-client", "wget"):
        assert re.search(rf"apt-get install[^\n]*\b{tool}\b", text), tool
    assert re.search(r"^ENV RAY_AUTH_MODE=token\s*$", text, flags=re.MULTILINE)
    assert re.search(r"^COPY jobs/ ", text, flags=re.MULTILINE)


# ------------------------------------------------------------------ Ray cluster launcher


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_validates(path, ray_schema):
    raw = _cluster_config(path)
    # As written ...
    jsonschema.validate(raw, ray_schema)
    # ... and as `ray up` sees it: merged with the provider's defaults, then
    # validated by Ray itself.  Offline: no cloud API is called.
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    for key in (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
    ):
        assert prepared[key] == [], f"{path.name}: {key} must be empty; the image has everything"
    for name, node_type in prepared["available_node_types"].items():
        for key in ("initialization_commands", "worker_setup_commands"):
            assert not node_type.get(key), f"{path.name}: {name}.{key} must be empty"


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_starts_ray_with_token_auth_and_metrics(path):
    config = _cluster_config(path)
    head = _start_command(config["head_start_ray_commands"], "--head")
    worker = _start_command(config["worker_start_ray_commands"], "--address=$RAY_HEAD_IP:6379")
    for role, tokens in (("head", head), ("worker", worker)):
        assert "RAY_AUTH_MODE=token" in tokens[: tokens.index("ray")], (
            f"{path.name}: the {role} `ray start` must run with RAY_AUTH_MODE=token"
        )
        assert f"--metrics-export-port={METRICS_PORT}" in tokens, f"{path.name}: {role} metrics port"
    for flag in ("--port=6379", "--dashboard-host=0.0.0.0", "--autoscaling-config=~/ray_bootstrap_config.yaml"):
        assert flag in head, f"{path.name}: head `ray start` lacks {flag}"
    run_options = " ".join(config["docker"].get("run_options", []))
    assert re.search(r"(--env|-e)[ =]RAY_AUTH_MODE=token\b", run_options), (
        f"{path.name}: every container process needs RAY_AUTH_MODE=token (docker.run_options)"
    )
    # The token travels as a file copied from the submitting machine, never inline.
    assert config.get("file_mounts", {}).get("~/.ray/auth_token") == "~/.ray/auth_token"


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_gpu_resources_match_instances(path):
    config = _cluster_config(path)
    node_types = config.get("available_node_types", {})
    head_type = config.get("head_node_type")
    for name, node_type in node_types.items():
        resources = node_type.get("resources", {})
        odd = [k for k in resources if k.lower() == "gpu" and k != "GPU"]
        assert not odd, f"{path.name}: {name}: Ray's GPU resource is spelled 'GPU', not {odd}"
        instance = node_type.get("node_config", {}).get("InstanceType")
        if name == head_type:
            assert not resources.get("GPU") and instance not in EC2_GPUS, (
                f"{path.name}: the head node type is meant to be CPU only"
            )
            continue
        if instance is None:
            continue
        assert instance in EC2_GPUS, f"{path.name}: {name}: add {instance} to EC2_GPUS or pick a GPU type"
        assert resources.get("GPU") == EC2_GPUS[instance], (
            f"{path.name}: {name}: {instance} has {EC2_GPUS[instance]} GPUs, resources say {resources.get('GPU')}"
        )
    if config["provider"]["type"] == "aws":
        assert any(n != head_type and t.get("resources", {}).get("GPU") for n, t in node_types.items())


# ------------------------------------------------------------------ KubeRay


def test_kuberay_manifests_are_a_raycluster_and_a_rayjob():
    kinds = {doc["kind"] for _, doc in _kuberay_docs()}
    assert {"RayCluster", "RayJob"} <= kinds
    for path, doc in _kuberay_docs():
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1", f"{path.name}: {doc['kind']} apiVersion"


def test_kuberay_ray_containers_use_token_auth_from_the_secret():
    for where, spec in _ray_cluster_specs():
        for name, c in _ray_containers(spec):
            _assert_token_auth_env(_env(c), f"{where}:{name}/{c['name']}")
        if spec.get("enableInTreeAutoscaling"):
            autoscaler_env = {e["name"]: e for e in spec.get("autoscalerOptions", {}).get("env", [])}
            _assert_token_auth_env(autoscaler_env, f"{where}:autoscaler")
        # Token auth is set by hand above; KubeRay's authOptions would add a second source.
        assert "authOptions" not in spec, f"{where}: use the Secret env vars, not authOptions"
    for where, c in _submitter_containers():
        _assert_token_auth_env(_env(c), where)


def test_kuberay_ray_containers_name_their_node_as_dcgm_does():
    """gradyard's Hostname label is NODE_NAME when set (a pod's host name is the pod's): the node's name, as
    DCGM exporter's pod has it, so gradyard's series join DCGM's on (Hostname, gpu)."""
    seen = 0
    for where, spec in _ray_cluster_specs():
        for name, c in _ray_containers(spec):
            node = _env(c).get("NODE_NAME", {})
            assert node.get("valueFrom") == {"fieldRef": {"fieldPath": "spec.nodeName"}}, f"{where}:{name}/{c['name']}"
            seen += 1
    assert seen >= 4  # heads and GPU workers of the RayCluster and the RayJob


def test_kuberay_gpu_resources_and_metrics_port_are_consistent():
    for where, spec in _ray_cluster_specs():
        for name, group in _groups(spec):
            params = group.get("rayStartParams", {})
            assert all(isinstance(v, str) for v in params.values()), (
                f"{where}:{name}: rayStartParams values must be strings"
            )
            assert "GPU" not in params.get("resources", ""), f"{where}:{name}: use num-gpus, not resources"
            assert params.get("metrics-export-port") == str(METRICS_PORT), f"{where}:{name}"
            (ray_container, *_) = group["template"]["spec"]["containers"]
            ports = {p["containerPort"]: p.get("name") for p in ray_container.get("ports", [])}
            assert ports.get(METRICS_PORT) == "metrics", f"{where}:{name}: expose {METRICS_PORT} as 'metrics'"
            for section in ("limits", "requests"):
                keys = ray_container.get("resources", {}).get(section, {})
                odd = [k for k in keys if "gpu" in k.lower() and k != "nvidia.com/gpu"]
                assert not odd, f"{where}:{name}: GPU resource must be nvidia.com/gpu, not {odd}"
            limit = _gpu_limit(ray_container)
            requests = ray_container.get("resources", {}).get("requests", {})
            if "nvidia.com/gpu" in requests:
                assert int(requests["nvidia.com/gpu"]) == limit, f"{where}:{name}: GPU request != limit"
            if name == "head":
                assert limit == 0 and params.get("num-gpus", "0") == "0", f"{where}: the head is CPU only"
            else:
                assert limit > 0, f"{where}:{name}: a worker group without nvidia.com/gpu"
                assert params.get("num-gpus") == str(limit), (
                    f"{where}:{name}: num-gpus {params.get('num-gpus')} != nvidia.com/gpu limit {limit}"
                )
                assert group.get("minReplicas", 0) <= group.get("replicas", 0) <= group["maxReplicas"]


def _rayjobs() -> list[tuple[Path, dict]]:
    jobs = [(p, d) for p, d in _kuberay_docs() if d["kind"] == "RayJob"]
    assert jobs, "no RayJob under deploy/kuberay"
    return jobs


def test_rayjob_runs_one_job_definition():
    workdir = _one(r"^WORKDIR (\S+)\s*$", _dockerfile(), "Dockerfile WORKDIR")
    for path, doc in _rayjobs():
        spec = doc["spec"]
        args = _launch_args(shlex.split(spec["entrypoint"]), f"{path.name}: entrypoint")
        assert re.fullmatch(r"jobs/[a-z0-9][a-z0-9._-]*\.ya?ml", args.file), (
            f"{path.name}: the entrypoint must train a job of the image's jobs/, not {args.file}"
        )
        assert spec.get("shutdownAfterJobFinishes") is True, f"{path.name}: shutdownAfterJobFinishes"
        assert spec.get("rayClusterSpec") or spec.get("clusterSelector"), f"{path.name}: no cluster"
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
        working_dir = runtime_env.get("working_dir")
        if working_dir and "://" not in working_dir:
            # A local path is read in the submitter pod, i.e. inside the image.
            assert working_dir == workdir, f"{path.name}: working_dir is not the image's WORKDIR"


# ------------------------------------------------------------------ shipped examples run as shipped
#
# Every command that trains a job and ships with the repository: each RayJob's entrypoint, and the
# `python -m gradyard.launch ...` commands in the comments of cluster/*.yaml and deploy/kuberay/*.yaml
# and in the shell blocks of README.md and docs/deploy.md.  Each must validate, read data that exist
# where it runs, keep its run off the cluster's disks and use the GPUs of the cluster it is shipped with.

DOCS_WITH_EXAMPLES = [REPO / "README.md", DEPLOY_DOC]
LAUNCH = ["python", "-m", "gradyard.launch"]
STORAGE_SECRET = "gradyard-storage"
S3_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@dataclass(frozen=True)
class Cluster:
    """A cluster as gradyard.capacity sees it, from a manifest."""

    nodes: list
    """Resources of the nodes it starts with (head first)."""
    addable: Optional[list]
    """Resources of the node types its autoscaler may add; [] for a fixed cluster."""
    containers: list
    """(group, container) of every Ray container (KubeRay), else []."""
    worker_types: list
    """node_config of every worker node type (cluster launcher), else []."""


@dataclass(frozen=True)
class Example:
    where: str
    argv: list
    cluster: Optional[Cluster]
    shell_env: dict
    """The env of the container whose shell first expands the command's $VARs: a RayJob's submitter
    (KubeRay runs `bash -c "ray job submit ... -- ENTRYPOINT"` in that pod, not on the head)."""


def _launch_args(argv: list[str], where: str) -> argparse.Namespace:
    """``argv`` (``python -m gradyard.launch ...``) parsed by the launcher's own arguments."""
    from gradyard.cli import add_run_arguments

    assert argv[:3] == LAUNCH, f"{where}: not a `python -m gradyard.launch` command: {argv}"
    parser = argparse.ArgumentParser(prog="python -m gradyard.launch", exit_on_error=False)
    add_run_arguments(parser)
    try:
        return parser.parse_args(argv[3:])
    except (argparse.ArgumentError, SystemExit) as exc:
        raise AssertionError(f"{where}: `{shlex.join(argv)}` is not a launcher command: {exc}") from None


def _kuberay_node(group: dict) -> dict:
    """A group's node as Ray sees it: KubeRay passes num-cpus/num-gpus, else the container's limits."""
    params = group.get("rayStartParams", {})
    container = group["template"]["spec"]["containers"][0]
    cpus = _cpu_quantity(params["num-cpus"]) if "num-cpus" in params else _cpu_quantity(_cpus(container))
    gpus = float(params.get("num-gpus", _gpu_limit(container)))
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


def _kuberay_cluster(spec: dict) -> Cluster:
    workers = spec.get("workerGroupSpecs", [])
    nodes = [_kuberay_node(spec["headGroupSpec"])] + [_kuberay_node(g) for g in workers
                                                      for _ in range(g.get("replicas", 0))]
    grows = spec.get("enableInTreeAutoscaling") is True
    addable = [_kuberay_node(g) for g in workers if grows and g.get("maxReplicas", 0) > g.get("replicas", 0)]
    return Cluster(nodes, addable, _ray_containers(spec), [])


def _launcher_cluster(config: dict) -> Cluster:
    types, head = config["available_node_types"], config["head_node_type"]
    nodes = [dict(types[head]["resources"])]
    nodes += [dict(t["resources"]) for n, t in types.items() if n != head for _ in range(t.get("min_workers", 0))]
    addable = [dict(t["resources"]) for n, t in types.items()
               if n != head and t.get("max_workers", 0) > t.get("min_workers", 0) and config.get("max_workers", 0)]
    return Cluster(nodes, addable, [], [t["node_config"] for n, t in types.items() if n != head])


def _commands(text: str, markdown: bool) -> list[list[str]]:
    """The launcher commands (argv from `python -m gradyard.launch` on) in comments or shell blocks."""
    if markdown:
        lines = [l for block in re.findall(r"^```(?:sh|bash|shell)\n(.*?)^```", text, re.M | re.S)
                 for l in block.splitlines()]
    else:
        lines = [re.sub(r"^\s*#\s?", "", l) for l in text.splitlines() if re.match(r"^\s*#", l)]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [LAUNCH + shlex.split(m[1], comments=True)
            for m in re.finditer(r"python -m gradyard\.launch (.*)$", joined, re.M)]


def _examples() -> list[Example]:
    out = []
    for path, doc in _rayjobs():
        spec = doc["spec"]
        cluster = _kuberay_cluster(spec["rayClusterSpec"]) if "rayClusterSpec" in spec else None
        submitter = spec.get("submitterPodTemplate", {}).get("spec", {}).get("containers", [{}])[0]
        out.append(Example(f"{path.name}: entrypoint", shlex.split(spec["entrypoint"]), cluster, _env(submitter)))
    for path in CLUSTER_CONFIGS + KUBERAY_MANIFESTS:
        docs = _yaml_docs(path)
        clusters = [_launcher_cluster(d) for d in docs if "available_node_types" in d]
        clusters += [_kuberay_cluster(d["spec"]) for d in docs if d.get("kind") == "RayCluster"]
        for argv in _commands(path.read_text(), markdown=False):
            out.append(Example(f"{path.relative_to(REPO)}: comment", argv, clusters[0] if clusters else None, {}))
    for path in DOCS_WITH_EXAMPLES:
        for argv in _commands(path.read_text(), markdown=True):
            out.append(Example(f"{path.relative_to(REPO)}", argv, None, {}))
    return out


EXAMPLES = _examples()


def _example_job(example: Example):
    args = _launch_args(example.argv, example.where)
    return args, load_job(REPO / args.file, args.overrides)


def _image_copies() -> list[tuple[str, str]]:
    """(repository path, path in the image relative to WORKDIR) of each COPY of the Dockerfile."""
    out = []
    for line in _dockerfile().splitlines():
        if line.startswith("COPY "):
            *sources, dest = [t for t in shlex.split(line)[1:] if not t.startswith("--")]
            for source in sources:
                target = dest.rstrip("/") + "/" + Path(source).name if dest.endswith("/") and not source.endswith("/") else dest
                out.append((source.rstrip("/"), os.path.normpath(target)))
    return out


def _in_image(local: str) -> bool:
    """Whether a path relative to the image's WORKDIR (the job's current directory) is in the image."""
    wanted = os.path.normpath(local)
    for source, target in _image_copies():
        if wanted == target or wanted.startswith(target + "/"):
            return (REPO / source / os.path.relpath(wanted, target)).exists()
    return False


def _remote(url: str) -> bool:
    from gradyard.storage.urls import scheme

    return scheme(url) in ("s3", "s3a")


def test_shipped_examples_are_found():
    wheres = {e.where for e in EXAMPLES}
    assert {"rayjob.yaml: entrypoint", "cluster/aws-gpu.yaml: comment", "deploy/kuberay/raycluster.yaml: comment",
            "docs/deploy.md"} <= wheres, wheres


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.where)
def test_shipped_example_job_validates(example):
    """gradyard's own validation (no torch), on the job file with the command's overrides."""
    from gradyard.job import JobError
    from gradyard.storage.urls import problem

    args = _launch_args(example.argv, example.where)
    assert _in_image(args.file), f"{example.where}: {args.file} is not in the image"
    try:
        load_job(REPO / args.file, args.overrides)
    except JobError as exc:
        pytest.fail(f"{example.where}: {exc}")
    if args.storage and not args.storage.startswith("$"):
        assert problem(args.storage) is None, f"{example.where}: --storage {args.storage}: {problem(args.storage)}"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.where)
def test_shipped_example_reads_data_that_exist_where_it_runs(example):
    """A built-in source, synthetic data, a remote URL, or files the image holds: the job's current
    directory on the cluster is the image's WORKDIR (a checkout's upload holds no dataset either)."""
    from gradyard.job import BUILTIN_SOURCES

    _, spec = _example_job(example)
    for key, value in (("data.source", spec.data.source), ("model.pretrained", spec.model.pretrained)):
        if value is None or value in BUILTIN_SOURCES or value == "synthetic" or _remote(value):
            continue
        local = value[len("file://"):] if value.startswith("file://") else value
        assert _in_image(local), (
            f"{example.where}: {key} {value} is a local path the image does not hold (it copies "
            f"{', '.join(s for s, _ in _image_copies())}): use a remote URL, a built-in source or "
            f"--set data.source=synthetic"
        )


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.where)
def test_shipped_example_keeps_its_run_off_the_cluster(example):
    """Checkpoints and metrics in object storage (or a filesystem every node mounts), not on a node's
    disk, which goes with the node; S3 credentials from a Secret on every Ray container, or an instance
    profile on every worker node type, never written in the file."""
    args, spec = _example_job(example)
    storage = args.storage or spec.storage.url
    if storage.startswith("$"):
        name = storage.strip("${}")
        source = example.shell_env.get(name, {}).get("valueFrom", {}).get("secretKeyRef", {})
        assert source.get("name") == STORAGE_SECRET and "value" not in example.shell_env.get(name, {}), (
            f"{example.where}: --storage {storage}: the submitter's {name} (its shell expands the entrypoint) must come from the Secret {STORAGE_SECRET}"
        )
    else:
        assert _remote(storage) or spec.storage.shared, (
            f"{example.where}: the run goes to {storage}, on the disk of the node that writes it: "
            f"give --storage s3://... (or a shared filesystem with storage.shared)"
        )
    cluster = example.cluster
    if cluster is None or spec.storage.shared:
        return
    for group, c in cluster.containers:
        env = _env(c)
        for name in S3_CREDENTIALS:
            ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef", {})
            assert ref.get("name") == STORAGE_SECRET and "value" not in env.get(name, {}), (
                f"{example.where}: {group}/{c['name']} lacks {name} from the Secret {STORAGE_SECRET}"
            )
    for node_config in cluster.worker_types:
        assert node_config.get("IamInstanceProfile"), (
            f"{example.where}: a worker node type has no IamInstanceProfile to write {storage}"
        )


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.cluster is not None], ids=lambda e: e.where)
def test_shipped_example_uses_the_gpus_of_its_cluster(example):
    """The driver's own check (gradyard.capacity) on the nodes the cluster starts with and the ones
    its autoscaler may add; on a GPU cluster the job trains on the GPUs, and on a fixed one on all of them."""
    from gradyard.capacity import Demand, assess

    _, spec = _example_job(example)
    cluster = example.cluster
    demand = Demand.of(spec.scaling)
    verdict = assess(demand, cluster.nodes, cluster.addable)
    assert verdict.state != "never", f"{example.where}: {verdict.message}"
    gpus = sum(n.get("GPU", 0) for n in cluster.nodes + cluster.addable)
    if not gpus:
        return
    assert spec.scaling.use_gpu, f"{example.where}: a CPU job on a GPU cluster: its GPU workers sit idle"
    if not cluster.addable:
        assert verdict.state == "fits", f"{example.where}: {verdict.message}"
        used = demand.workers * demand.bundle.get("GPU", 0)
        assert used == gpus, f"{example.where}: the job uses {used} of the cluster's {gpus} GPUs"


def test_heads_take_no_training_worker():
    """The head runs the GCS, the dashboard and the drivers: Ray must not place a training worker
    (1 CPU by default, or a custom bundle) there.  The cluster launcher's local provider is the
    exception: it takes no resources, and its head may be a GPU machine of yours."""
    from gradyard.capacity import per_node, worker_bundle

    heads = [(f"{where}: head", _kuberay_node(spec["headGroupSpec"])) for where, spec in _ray_cluster_specs()]
    for path in CLUSTER_CONFIGS:
        config = _cluster_config(path)
        if config["provider"]["type"] != "local":
            resources = config["available_node_types"][config["head_node_type"]]["resources"]
            assert "CPU" in resources, f"{path.name}: the head's resources lack CPU: Ray gives it the instance's CPUs"
            heads.append((f"{path.name}: {config['head_node_type']}", resources))
    assert len(heads) >= 3
    for where, head in heads:
        for bundle in (worker_bundle({}, False), worker_bundle({}, True), worker_bundle({"CPU": 0.5}, False)):
            assert per_node(head, bundle) == 0, f"{where} ({head}) takes a training worker of {bundle}"


# ------------------------------------------------------------------ metrics on KubeRay

PODMONITORS = [(p, d) for p, d in _kuberay_docs() if d["kind"] == "PodMonitor"]
CRDS = Path(__file__).resolve().parent / "data" / "crds"


def _crd_schema(crd_file: str, version: str) -> dict:
    """A vendored CRD's openAPIV3Schema (tests/data/crds), checked as `kubectl apply` does: its
    default field validation is strict, so a field the schema does not know is an error, not pruned."""
    (crd,) = _yaml_docs(CRDS / crd_file)
    (schema,) = [v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version]

    def strict(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node = {**node, "additionalProperties": False}
            return {k: strict(v) if k != "enum" else v for k, v in node.items()}
        if isinstance(node, list):
            return [strict(v) for v in node]
        return node

    return strict(schema)


def _kuberay_pod_labels(cluster: str, group_name: str, group: dict, node_type: str) -> dict:
    """The labels KubeRay gives a group's pods (ray-operator's labelPod): the template's, and its own
    node type, group and cluster, which a template cannot override."""
    labels = {"ray.io/is-ray-node": "yes", "app.kubernetes.io/name": "kuberay",
              **group["template"].get("metadata", {}).get("labels", {})}
    return {**labels, "ray.io/cluster": cluster, "ray.io/node-type": node_type,
            "ray.io/group": group_name if node_type == "worker" else "headgroup"}


def _selects(selector: dict, labels: dict) -> bool:
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        ok &= {"In": present and value in e.get("values", []), "NotIn": value not in e.get("values", []),
               "Exists": present, "DoesNotExist": not present}[e["operator"]]
    return ok


def _kuberay_pods() -> list[tuple[str, dict, dict, str]]:
    """(where, pod labels, ray container, node type) of each group of each RayCluster spec."""
    out = []
    for path, doc in _kuberay_docs():
        if doc["kind"] == "RayCluster":
            name, spec = doc["metadata"]["name"], doc["spec"]
        elif doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
            # KubeRay names a RayJob's cluster after the job (plus a suffix no selector here uses).
            name, spec = doc["metadata"]["name"], doc["spec"]["rayClusterSpec"]
        else:
            continue
        for group_name, group in _groups(spec):
            node_type = "head" if group is spec["headGroupSpec"] else "worker"
            labels = _kuberay_pod_labels(name, group_name, group, node_type)
            out.append((f"{path.name}:{group_name}", labels, group, node_type))
    return out


def test_podmonitor_validates_against_the_prometheus_operator_crd():
    schema = _crd_schema("monitoring.coreos.com_podmonitors.yaml", "v1")
    assert PODMONITORS, "no PodMonitor under deploy/kuberay"
    for path, doc in PODMONITORS:
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        jsonschema.validate(doc, schema)
    # The check is strict, as the API server's: a misspelt field fails.
    (_, doc), *_ = PODMONITORS
    typo = copy.deepcopy(doc)
    typo["spec"]["podMetricEndpoints"] = typo["spec"].pop("podMetricsEndpoints")
    with pytest.raises(jsonschema.ValidationError, match="podMetricEndpoints"):
        jsonschema.validate(typo, schema)


def test_declared_metrics_ports_are_the_ports_workers_bind():
    """Each local rank of a GPU worker pod binds, under the pod's env, a port the pod declares by name,
    and a PodMonitor selects the pod and names that port (gradyard.telemetry.exporter.metrics_port)."""
    from gradyard.telemetry.exporter import metrics_port
    from ray.scripts.scripts import start

    ray_defaults = {p.name: p.default for p in start.params}
    ray_worker_ports = range(ray_defaults["min_worker_port"], ray_defaults["max_worker_port"] + 1)
    workers = 0
    for where, labels, group, node_type in _kuberay_pods():
        container = group["template"]["spec"]["containers"][0]
        env = {k: e["value"] for k, e in _env(container).items() if "value" in e}
        declared = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        monitors = [d for _, d in PODMONITORS if _selects(d["spec"]["selector"], labels)]
        if node_type == "head":
            assert not monitors, f"{where}: the head runs no training worker; no PodMonitor should select it"
            continue
        workers += 1
        gpus = int(group["rayStartParams"]["num-gpus"])
        assert len(monitors) == 1, f"{where}: {len(monitors)} PodMonitors select this pod (labels {labels})"
        (monitor,) = monitors
        scraped = {e.get("port") for e in monitor["spec"]["podMetricsEndpoints"]}
        names = []
        for rank in range(gpus):
            port, ports = metrics_port(rank, 0, env)
            assert ports is not None, f"{where}: the workers do not know the pod's ports (GRADYARD_METRICS_PORTS)"
            name = next((n for n, p in declared.items() if p == port), None)
            assert name is not None, f"{where}: local rank {rank} binds {port}, which the pod does not declare"
            assert name in scraped, f"{where}: the PodMonitor does not scrape {name} (local rank {rank})"
            assert port not in ray_worker_ports, f"{where}: {port} is among Ray's worker ports"
            names.append(name)
        # IANA service names, as Kubernetes takes them: at most 15 characters, lowercase, a letter.
        for name in names:
            assert re.fullmatch(r"(?=.*[a-z])(?!.*--)[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?", name), name
        stray = {n for n in declared if n and n.startswith("gy-metrics")} - set(names)
        assert not stray, f"{where}: declares {stray}, which no local rank binds"
        assert labels.get(monitor["spec"]["jobLabel"]) == "gradyard", (
            f"{where}: job must be 'gradyard', as the shipped alerts (up{{job=\"gradyard\"}}) expect"
        )
    assert workers >= 2  # the RayCluster's and the RayJob's GPU groups


def test_podmonitor_does_not_let_a_pod_set_job_or_instance():
    """No discovery file: a worker exports its identity on its series.  honorLabels must stay false, so
    that Kubernetes' job, instance, namespace and pod win over whatever a pod's series say."""
    assert PODMONITORS, "no PodMonitor under deploy/kuberay"
    for path, doc in PODMONITORS:
        for endpoint in doc["spec"]["podMetricsEndpoints"]:
            assert endpoint.get("honorLabels") is not True, f"{path.name}: {endpoint.get('port')}: honorLabels"
            for rule in endpoint.get("relabelings", []) + endpoint.get("metricRelabelings", []):
                assert rule.get("targetLabel") not in ("job", "instance", "namespace", "pod"), (
                    f"{path.name}: {endpoint.get('port')}: relabels {rule.get('targetLabel')}"
                )


# ------------------------------------------------------------------ secrets


def _local_token() -> str | None:
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def test_no_token_is_written_in_any_file():
    local = _local_token()
    for path, text in _text_files():
        where = str(path.relative_to(REPO))
        # `ray get-auth-token --generate` makes 64 hex digits (image digests are fine).
        assert not re.search(r"(?<!sha256:)\b[0-9a-fA-F]{32,}\b", text), f"{where}: looks like a token"
        assert not re.search(r"RAY_AUTH_TOKEN=(?!\$)\S", text), f"{where}: RAY_AUTH_TOKEN set inline"
        assert not re.search(r"from-literal=auth_token", text), f"{where}: a token on a command line"
        if local and len(local) >= 16:
            assert local not in text, f"{where}: contains this machine's Ray token"
        if path.suffix in (".yaml", ".yml"):
            for doc in _yaml_docs(path):
                if doc.get("kind") == "Secret":
                    assert not doc.get("data") and not doc.get("stringData"), (
                        f"{where}: create Secrets out of band, never in a manifest"
                    )
                for env in _walk_env_vars(doc):
                    if env.get("name") == "RAY_AUTH_TOKEN":
                        assert "value" not in env, f"{where}: RAY_AUTH_TOKEN with a literal value"


def _walk_env_vars(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from (e for e in value if isinstance(e, dict))
            yield from _walk_env_vars(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_env_vars(item)
