"""Datasets for jobs: `build_datasets(spec)` gives the train and test splits and a DataInfo.

Sources (`data.source`):

- built in, no files: `circles`, `blobs`, `digits`, `breast_cancer` (scikit-learn);
- `synthetic`: data with learnable signal, shaped like the data it replaces
  (`data.like`, set by `--set data.source=synthetic`, or `data.format`), else
  like the model's documented data (gradyard.sources);
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

from typing import Optional

from torch.utils.data import Dataset

from gradyard.data import builtin, formats
from gradyard.data.augment import Augmented, build_transform
from gradyard.data.base import DataError, DataInfo, SplitDataset
from gradyard.data.staging import stage
from gradyard.sources import FORMATS

__all__ = ["DataError", "DataInfo", "SplitDataset", "build_datasets"]

_BUILTIN = {"circles": builtin.circles, "blobs": builtin.blobs, "digits": builtin.digits,
            "breast_cancer": builtin.breast_cancer}
_FORMATS = {"idx": formats.idx, "imagefolder": formats.imagefolder, "aclimdb": formats.aclimdb,
            "mammographic": formats.mammographic, "csv": formats.csv}


def build_datasets(spec, *, rank_local_cache: Optional[str] = None) -> tuple[Dataset, Dataset, DataInfo]:
    """(train, test, info) for the job.

    `rank_local_cache` is the node-local folder remote data is staged into
    (default: `data.cache_dir`, else ~/.cache/gradyard/data).
    """
    from gradyard.catalogue import CATALOGUE
    from gradyard.models import ModelError

    entry = CATALOGUE.get(spec.model.arch)
    if entry is None:
        raise ModelError(f"model.arch: unknown model {spec.model.arch!r}")
    source = spec.data.source
    if source in _BUILTIN:
        train, test, info = _BUILTIN[source](spec, entry)
    elif source == "synthetic":
        train, test, info = builtin.synthetic(spec, entry)
    else:
        path = stage(source, cache_dir=rank_local_cache or spec.data.cache_dir,
                     endpoint_url=spec.storage.endpoint_url, region=spec.storage.region,
                     expected=FORMATS[spec.data.format].expected)
        train, test, info = _FORMATS[spec.data.format](spec, entry, path)
    if info.input_kind == "image":
        train = Augmented(train, build_transform(spec.augmentation), spec.schedule.seed)
    return train, test, info
