"""The deployment files agree with each other, with Ray's schema and with the package.

The image name, the Ray version, the token-auth settings, the metrics port and
the GPU resource names are repeated in cluster/*.yaml (Ray cluster launcher),
deploy/kuberay/*.yaml (KubeRay) and deploy/docker/Dockerfile.  These tests keep
the copies in step.  They only read files; no Ray cluster is started.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from pathlib import Path

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

ENTRYPOINT = re.compile(r"python -m gradyard\.launch (jobs/[a-z0-9][a-z0-9._-]*\.ya?ml)")


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
        assert ENTRYPOINT.fullmatch(spec["entrypoint"]), (
            f"{path.name}: entrypoint must be `python -m gradyard.launch jobs/<name>.yaml`"
        )
        assert spec.get("shutdownAfterJobFinishes") is True, f"{path.name}: shutdownAfterJobFinishes"
        assert spec.get("rayClusterSpec") or spec.get("clusterSelector"), f"{path.name}: no cluster"
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
        working_dir = runtime_env.get("working_dir")
        if working_dir and "://" not in working_dir:
            # A local path is read in the submitter pod, i.e. inside the image.
            assert working_dir == workdir, f"{path.name}: working_dir is not the image's WORKDIR"


def test_rayjob_job_file_exists():
    for path, doc in _rayjobs():
        job = ENTRYPOINT.fullmatch(doc["spec"]["entrypoint"])[1]
        assert (REPO / job).is_file(), f"{path.name} runs {job}, which is not in the repository"


def test_rayjob_cluster_fits_its_job():
    """The driver's own check (gradyard.capacity), on the nodes the RayJob's cluster starts with and
    the worker groups its autoscaler, if any, may grow."""
    from gradyard.capacity import Demand, assess

    for path, doc in _rayjobs():
        job_path = REPO / ENTRYPOINT.fullmatch(doc["spec"]["entrypoint"])[1]
        if not job_path.is_file():
            pytest.skip(f"{job_path.relative_to(REPO)} is not written yet")
        spec = doc["spec"].get("rayClusterSpec")
        if spec is None:
            continue  # clusterSelector: the cluster is not described here

        def node(group: dict) -> dict:
            gpus = float(group.get("rayStartParams", {}).get("num-gpus", "0"))
            cpus = _cpu_quantity(_cpus(group["template"]["spec"]["containers"][0]))
            return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}

        workers = spec.get("workerGroupSpecs", [])
        nodes = [node(spec["headGroupSpec"])] + [node(g) for g in workers for _ in range(g.get("replicas", 0))]
        grows = spec.get("enableInTreeAutoscaling") is True
        addable = [node(g) for g in workers if grows and g.get("maxReplicas", 0) > g.get("replicas", 0)]
        verdict = assess(Demand.of(load_job(job_path).scaling), nodes, addable)
        assert verdict.state != "never", f"{path.name}: {job_path.name}: {verdict.message}"


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
