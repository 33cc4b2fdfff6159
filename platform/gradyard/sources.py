"""What each kind of data gives, known without loading it: the one table of sources and formats.

Built-in sources (no files), the formats a URL source may have, and the
augmentations image data may take, each with what a model sees: input kind,
sample shape, task and number of outputs.  The schema, the catalogue check,
the data readers and ``synthetic`` data all read this table, so
``--set data.source=synthetic`` gives data of the shape the job's real data
has (``data.like`` remembers which).

Nothing here imports torch: validating a job needs only this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class DataShape:
    kind: str
    """`tabular`, `image` or `text`."""
    shape: Optional[tuple[int, ...]]
    """One sample as stored (None: known only from the data, e.g. a CSV's columns)."""
    task: Optional[str]
    """`binary`, `multiclass` or `regression` (None: known only from the data)."""
    outputs: Optional[int]
    """Model outputs for the documented data (1 for binary and regression)."""
    expected: str = ""
    """What a URL of this format must hold, for the error when it does not."""


BUILTIN: dict[str, DataShape] = {
    "circles": DataShape("tabular", (2,), "binary", 1),
    "blobs": DataShape("tabular", (2,), "multiclass", 4),
    "digits": DataShape("image", (1, 28, 28), "multiclass", 10),
    "breast_cancer": DataShape("tabular", (30,), "binary", 1),
}
"""scikit-learn's sets, shipped inside its wheel or generated: never read from the network."""

FORMATS: dict[str, DataShape] = {
    "idx": DataShape("image", (1, 28, 28), "multiclass", 10,
                     "MNIST IDX files: train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                     "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]"),
    "imagefolder": DataShape("image", (3, 64, 64), "multiclass", 3,
                             "image folders train/<class>/ and test/<class>/"),
    "aclimdb": DataShape("text", None, "binary", 1,
                         "aclImdb folders train/{pos,neg} and test/{pos,neg} of .txt reviews"),
    "mammographic": DataShape("tabular", (4,), "binary", 1, "the UCI file mammographic_masses.data"),
    "csv": DataShape("tabular", None, None, None, "a .csv file with a header row"),
}
"""Layouts a URL source may have (``data.format``)."""

AUGMENTATIONS = ("flip", "rotation", "color_jitter", "trivial_augment_wide", "rand_augment")

SYNTHETIC_MAX_CLASSES = 10
"""More classes than this carry too little signal in a few hundred synthetic samples."""


def mimicked(data: Any) -> Optional[DataShape]:
    """The data ``synthetic`` mimics: ``data.like``, else ``data.format``; None for the model's own default."""
    name = data.like or data.format
    return BUILTIN.get(name) or FORMATS.get(name) if name else None


def synthetic_profile(spec: Any, entry: Any) -> tuple[str, tuple, str, int]:
    """(kind, native shape, task, outputs) of the synthetic data for this job.

    The data it mimics when known (``data.like`` / ``data.format``), else the
    model's documented data; a flattening model given ``data.image_size`` gets
    images.  ``loss``, when not `auto`, sets the task.  Classes are capped so
    that a few hundred samples carry learnable signal.
    """
    like = mimicked(spec.data)
    if like is not None and like.shape is not None:
        kind, shape = like.kind, like.shape
        task, outputs = like.task or entry.task, like.outputs or entry.default_num_classes
    elif like is not None and like.kind == "text":
        kind, shape, task, outputs = "text", None, like.task, like.outputs
    else:
        kind, shape = entry.input_kind, entry.default_input_shape
        task, outputs = entry.task, entry.default_num_classes
        if kind == "tabular" and spec.data.image_size:
            kind, shape = "image", (1, spec.data.image_size, spec.data.image_size)
    task = {"bce": "binary", "mse": "regression", "cross_entropy": "multiclass"}.get(spec.loss, task)
    outputs = 1 if task != "multiclass" else min(max(outputs, 2), SYNTHETIC_MAX_CLASSES)
    return kind, shape, task, outputs


def source_kind(spec: Any, entry: Any) -> str:
    """`tabular`, `image` or `text`: what the job's data source gives, known before loading."""
    source = spec.data.source
    if source == "synthetic":
        return synthetic_profile(spec, entry)[0] if entry else "tabular"
    if source in BUILTIN:
        return BUILTIN[source].kind
    return FORMATS[spec.data.format].kind


def task_of(spec: Any, entry: Any) -> Optional[str]:
    """The task the job trains (None when only the data can tell, e.g. a CSV's target column)."""
    if spec.loss != "auto":
        return {"bce": "binary", "mse": "regression", "cross_entropy": "multiclass"}[spec.loss]
    source = spec.data.source
    if source == "synthetic":
        return synthetic_profile(spec, entry)[2]
    if source in BUILTIN:
        return BUILTIN[source].task
    return FORMATS[spec.data.format].task
