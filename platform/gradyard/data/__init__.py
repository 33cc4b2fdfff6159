"""Datasets for jobs: `build_datasets(spec)` gives the train and test splits and a DataInfo.

Sources (`data.source`):

- built in, no files: `circles`, `blobs`, `digits`, `breast_cancer` (scikit-learn);
- `synthetic`: data with learnable signal, shaped like `data.format`'s when
  that is set (so `--set data.source=synthetic` keeps a job's shapes), else
  like the model's documented data;
- a URL (local path, file://, s3://) read by `data.format`: `idx` (MNIST and
  FashionMNIST), `imagefolder`, `aclimdb` (IMDB reviews), `mammographic`
  (UCI Mammographic Mass), `csv`.

Nothing is downloaded from the internet: missing data raises :class:`DataError`
naming `data.source`.  Remote data is copied once per node (see staging).
Every split is a pure function of the job's seed.  The training split of
image data carries the job's augmentations, random only through
(seed, epoch, index); call `set_epoch` on it at the start of every epoch.
"""

from __future__ import annotations

import os
from typing import Optional

from torch.utils.data import Dataset

from gradyard.data import builtin, formats
from gradyard.data.augment import Augmented, build_transform
from gradyard.data.base import DataError, DataInfo, SplitDataset
from gradyard.data.staging import stage
from gradyard.job import BUILTIN_SOURCES

__all__ = ["DataError", "DataInfo", "SplitDataset", "build_datasets", "source_kind"]

_BUILTIN = {"circles": builtin.circles, "blobs": builtin.blobs, "digits": builtin.digits,
            "breast_cancer": builtin.breast_cancer}
_FORMATS = {"idx": formats.idx, "imagefolder": formats.imagefolder, "aclimdb": formats.aclimdb,
            "mammographic": formats.mammographic, "csv": formats.csv}
_KINDS = {"circles": "tabular", "blobs": "tabular", "breast_cancer": "tabular",
          "digits": "image", "idx": "image", "imagefolder": "image", "aclimdb": "text",
          "mammographic": "tabular", "csv": "tabular"}
_EXPECTED = {
    "idx": "MNIST IDX files: train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
           "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]",
    "imagefolder": "image folders train/<class>/ and test/<class>/",
    "aclimdb": "aclImdb folders train/{pos,neg} and test/{pos,neg} of .txt reviews",
    "mammographic": "the UCI file mammographic_masses.data",
    "csv": "a .csv file with a header row",
}
assert set(_BUILTIN) == set(BUILTIN_SOURCES)


def source_kind(spec) -> str:
    """`tabular`, `image` or `text`: what the job's data source gives, known before loading."""
    if spec.data.source == "synthetic":
        from gradyard.models import CATALOGUE

        entry = CATALOGUE.get(spec.model.arch)
        return builtin.synthetic_profile(spec, entry)[0] if entry else "tabular"
    return _KINDS[spec.data.source if spec.data.source in BUILTIN_SOURCES else spec.data.format]


def build_datasets(spec, *, rank_local_cache: Optional[str] = None,
                   storage_options: Optional[dict] = None) -> tuple[Dataset, Dataset, DataInfo]:
    """(train, test, info) for the job.

    `rank_local_cache` is the node-local folder remote data is staged into
    (default: `data.cache_dir`, else ~/.cache/gradyard/data); `storage_options`
    go to fsspec for s3:// and other remote sources (default: from `storage`).
    """
    from gradyard.models import CATALOGUE, ModelError

    entry = CATALOGUE.get(spec.model.arch)
    if entry is None:
        raise ModelError(f"model.arch: unknown model {spec.model.arch!r}")
    kind = source_kind(spec)
    if spec.augmentation and kind != "image":
        raise DataError(f"augmentation: only image data can be augmented; data.source "
                        f"{spec.data.source!r} gives {kind} data")
    source = spec.data.source
    if source in _BUILTIN:
        train, test, info = _BUILTIN[source](spec, entry)
    elif source == "synthetic":
        train, test, info = builtin.synthetic(spec, entry)
    else:
        if storage_options is None:
            storage_options = default_storage_options(spec)
        path = stage(source, cache_dir=rank_local_cache or spec.data.cache_dir,
                     storage_options=storage_options, expected=_EXPECTED[spec.data.format])
        train, test, info = _FORMATS[spec.data.format](spec, entry, path)
    if info.input_kind == "image":
        train = Augmented(train, build_transform(spec.augmentation), spec.schedule.seed)
    return train, test, info


def default_storage_options(spec) -> dict:
    """fsspec options for an s3:// source: endpoint and region from `storage` or the environment."""
    if not spec.data.source.startswith("s3://"):
        return {}
    client = {}
    endpoint = (spec.storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL"))
    if endpoint:
        client["endpoint_url"] = endpoint
    if spec.storage.region:
        client["region_name"] = spec.storage.region
    return {"client_kwargs": client} if client else {}
