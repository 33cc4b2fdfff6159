"""The catalogue of documented models, and the checks a job must pass against it, without torch.

Each entry says what the model consumes (``input_kind``, ``default_input_shape``),
what it predicts (``task``, ``default_num_classes``) and which ``model.params``
its builder takes, with their defaults.  The builders themselves live in
:mod:`gradyard.models` (which imports torch); a test checks that every
entry's parameters are exactly its builder's.

:func:`check_job` is what ``gradyard validate`` runs beyond the schema: the
model name, its parameters, regularisation it supports, the data kind it
takes, a ``checkpoint.best_metric`` the job reports, and sizes that fit in
the host memory of the machine validating the job.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from gradyard import sources


@dataclass(frozen=True)
class Preprocess:
    """How images must be prepared for a model whose weights expect it."""

    resize: int
    """Shorter side after resizing, before the centre crop."""
    crop: int
    """Side of the square centre crop the model sees."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    """torchvision InterpolationMode value, e.g. `bicubic`."""


@dataclass(frozen=True)
class ModelEntry:
    arch: str
    summary: str
    """One line for `gradyard jobs`."""
    input_kind: str
    """`tabular`, `image` or `text`."""
    default_input_shape: tuple[int, ...]
    """Per-sample shape the model was documented with (no batch dimension)."""
    default_num_classes: int
    """Outputs for the documented data set (1 for binary and regression)."""
    task: str
    """`binary`, `multiclass` or `regression`."""
    accepts: tuple[str, ...] = ()
    """Input kinds the model can take (models that flatten take tabular and image data)."""
    params: dict[str, Any] = field(default_factory=dict)
    """`model.params` the builder takes, with their defaults, in the builder's order."""
    preprocess: Optional[Preprocess] = None
    """Image preparation the model's pretrained weights expect, if any."""
    takes_pretrained_state: bool = False
    """The builder loads `model.pretrained` itself (keyword `state_dict`)."""


_FLAT = ("tabular", "image")
_CONV = {"dropout": 0.0, "batch_norm": False}

CATALOGUE: dict[str, ModelEntry] = {e.arch: e for e in [
    ModelEntry("alexnet", "AlexNet (torchvision), 3x224x224 images",
               "image", (3, 224, 224), 1000, "multiclass", ("image",), {"dropout": 0.5}),
    ModelEntry("efficientnet_b0_transfer",
               "EfficientNet-B0, frozen features + new classifier (transfer learning)",
               "image", (3, 224, 224), 3, "multiclass", ("image",), {"dropout": 0.2},
               # torchvision's EfficientNet_B0_Weights.IMAGENET1K_V1.transforms() (a test keeps them equal).
               preprocess=Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic"),
               takes_pretrained_state=True),
    ModelEntry("fashion_cnn", "FashionMNISTModelV2: two TinyVGG conv blocks, 1x28x28",
               "image", (1, 28, 28), 10, "multiclass", ("image",), {"hidden_units": 10, **_CONV}),
    ModelEntry("fashion_linear", "FashionMNISTModelV0: two linear layers",
               "image", (1, 28, 28), 10, "multiclass", _FLAT, {"hidden_units": 10}),
    ModelEntry("fashion_nonlinear", "FashionMNISTModelV1: linear layers with ReLU",
               "image", (1, 28, 28), 10, "multiclass", _FLAT, {"hidden_units": 10}),
    ModelEntry("lenet5", "LeNet-5 convolutional network, 1x28x28 digits",
               "image", (1, 28, 28), 10, "multiclass", ("image",), dict(_CONV)),
    ModelEntry("linear", "Single linear layer (DDP tutorial regression, 20 features)",
               "tabular", (20,), 1, "regression", _FLAT, {}),
    ModelEntry("lstm_sentiment", "Embedding + two LSTMs, IMDB review sentiment",
               "text", (256,), 1, "binary", ("text",),
               {"embed_dim": 64, "lstm_units": (128, 64), "dropout": 0.0}),
    ModelEntry("mlp", "Multilayer perceptron on flattened input (circles, blobs, MNIST...)",
               "tabular", (2,), 1, "binary", _FLAT,
               {"hidden": (64,), "activation": "relu", "dropout": 0.0, "batch_norm": False}),
    ModelEntry("tinyvgg", "TinyVGG (CNN Explainer), 3x64x64 food images",
               "image", (3, 64, 64), 3, "multiclass", ("image",), {"hidden_units": 10, **_CONV}),
]}

REGULARIZERS = ("dropout", "batch_norm")
ACTIVATIONS = ("relu", "sigmoid", "tanh")
MEMORY_SHARE = 0.8
"""A job whose data and model would need more than this share of host memory is refused."""


def model_params(spec: Any) -> dict[str, Any]:
    """`model.params` with `regularization.dropout` / `batch_norm` laid over them."""
    params = dict(spec.model.params)
    for key in REGULARIZERS:
        value = getattr(spec.regularization, key)
        if value is not None:
            params[key] = value
    return params


def host_memory_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_estimate(spec: Any, entry: ModelEntry) -> tuple[float, str]:
    """(bytes, what): the host memory the job's generated data and embedding need at least."""
    d = spec.data
    kind, shape = entry.input_kind, entry.default_input_shape
    if d.source == "synthetic":
        kind, shape, _, _ = sources.synthetic_profile(spec, entry)
    elif d.source in sources.BUILTIN:
        kind, shape = sources.BUILTIN[d.source].kind, sources.BUILTIN[d.source].shape
    else:
        shape = sources.FORMATS[d.format].shape or shape
    if kind == "image" and d.image_size:
        shape = (shape[0] if shape else 3, d.image_size, d.image_size)
    per_sample = {"image": 1, "tabular": 4, "text": 4}[kind] * (d.max_length if kind == "text"
                                                               else math.prod(shape or (1,)))
    generated = d.source in ("synthetic", "circles", "blobs")
    n = (d.num_samples or 512) if generated else 0
    parts = {f"{n:,} generated samples of {per_sample:,} bytes": n * per_sample}
    # One batch as float32 on the host, several times over (inputs, activations, gradients).
    batch_elems = d.batch_size * (d.max_length if kind == "text" else math.prod(shape or (1,)))
    parts[f"a batch of {d.batch_size:,}"] = batch_elems * 4 * 8
    params = {**entry.params, **model_params(spec)}
    if isinstance(params.get("hidden"), (list, tuple)):  # an MLP's weights, gradients and two Adam moments
        widths = [math.prod(shape or (1,)), *[int(h) for h in params["hidden"]], 16]
        weights = sum(a * b for a, b in zip(widths, widths[1:]))
        parts[f"{weights:,} MLP weights"] = weights * 4 * 4
    if entry.input_kind == "text":
        embed = int(params.get("embed_dim", 64))
        # Weights, gradients and two Adam moments.
        parts[f"a {d.vocab_size:,} x {embed} embedding"] = d.vocab_size * embed * 4 * 4
    total = float(sum(parts.values()))
    return total, ", ".join(k for k, v in parts.items() if v >= 0.25 * total)


def check_job(spec: Any) -> Optional[str]:
    """One error line if the job does not fit the catalogue or the machine, else None."""
    entry = CATALOGUE.get(spec.model.arch)
    if entry is None:
        return (f"model.arch: unknown model {spec.model.arch!r}; "
                f"allowed: {', '.join(sorted(CATALOGUE))}")
    for key, value in spec.model.params.items():
        if key not in entry.params:
            shown = ", ".join(entry.params) if entry.params else "none"
            return f"model.params.{key}: unknown parameter for {entry.arch}; allowed: {shown}"
        problem = _param_problem(key, value)
        if problem:
            return f"model.params.{key}: {problem} (got {value!r})"
    for key in REGULARIZERS:
        if getattr(spec.regularization, key) is not None and key not in entry.params:
            having = ", ".join(a for a, e in sorted(CATALOGUE.items()) if key in e.params)
            return (f"regularization.{key}: {entry.arch} has no {key} setting; "
                    f"models that have one: {having}")
    kind = sources.source_kind(spec, entry)
    if kind not in entry.accepts:
        return (f"data.source: {spec.data.source!r} gives {kind} data, but {entry.arch} "
                f"takes {' or '.join(entry.accepts)} data")
    if spec.augmentation and kind != "image":
        return (f"augmentation: only image data can be augmented; data.source {spec.data.source!r} gives "
                f"{kind} data")
    metric = spec.checkpoint.best_metric
    if metric and metric.endswith("accuracy") and sources.task_of(spec, entry) == "regression":
        return (f"checkpoint.best_metric: {metric} is not reported for a regression job; "
                "allowed: test_loss, train_loss")
    total = host_memory_bytes()
    need, what = memory_estimate(spec, entry)
    if total and need > MEMORY_SHARE * total:
        key = ("data.num_samples" if "generated" in what else "data.vocab_size" if "embedding" in what
               else "model.params.hidden" if "MLP" in what else "data.batch_size")
        return (f"{key}: this job needs about {need / 1e9:,.1f} GB of host memory ({what}); this machine has "
                f"{total / 1e9:,.1f} GB")
    return None


def _param_problem(key: str, value: Any) -> Optional[str]:
    """Bounds on the builders' parameters that keep a model buildable."""
    def count(v: Any, lo: int, hi: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    if key in ("hidden", "lstm_units"):
        if not isinstance(value, (list, tuple)) or not value or not all(count(v, 1, 1_000_000) for v in value):
            return "must be a non-empty list of sizes from 1 to 1,000,000"
        if len(value) > 64:
            return "at most 64 layers"
    elif key in ("hidden_units", "embed_dim"):
        if not count(value, 1, 100_000):
            return "must be an integer from 1 to 100,000"
    elif key == "dropout":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            return "must be a number in [0, 1)"
    elif key == "batch_norm":
        if not isinstance(value, bool):
            return "must be true or false"
    elif key == "activation":
        if value not in ACTIVATIONS:
            return f"unknown activation; allowed: {', '.join(ACTIVATIONS)}"
    return None
