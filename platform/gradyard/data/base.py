"""What every data source produces: a DataInfo and datasets of `(x, y)` tensors.

`x` is float32 (token ids are int64); `y` is int64 for multiclass data and a
float32 tensor of shape (1,) for binary and regression data, matching the
model outputs the trainer's losses expect.

Images are kept as uint8 (C, H, W) until the last moment, so augmentations
that need uint8 (TrivialAugmentWide, RandAugment) work on every image source
and large sets stay small in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from gradyard.job import JobError


def _tv():
    """torchvision's v2 functional ops, imported on first use: importing torchvision loads its
    models, ops and torch._dynamo (about 2 s of CPU), which a job whose images are already of
    the model's shape, or a job without images, never needs."""
    from torchvision.transforms.v2 import functional

    return functional


class DataError(JobError):
    """Data that cannot be loaded as the job asks; the message names the job key."""


FALLBACK = ("Point data.source at a local or object-storage copy, "
            "or run with --set data.source=synthetic.")


@dataclass(frozen=True)
class DataInfo:
    name: str
    """`digits`, `circles`, `synthetic`, `idx`, ... (the built-in source or the URL's format)."""
    input_kind: str
    """`tabular`, `image` or `text`."""
    input_shape: tuple
    """Shape of one sample as the model consumes it."""
    num_classes: int
    """Model outputs: 1 for binary and regression data."""
    task: str
    """`binary`, `multiclass` or `regression`."""
    synthetic: bool
    vocab_size: Optional[int] = None
    """Embedding rows for text data (0 = padding, 1 = unknown)."""
    train_size: int = 0
    test_size: int = 0


# ---------------------------------------------------------------- datasets


class SplitDataset(Dataset):
    """A train or test split; `set_epoch` matters only where augmentation is random."""

    def set_epoch(self, epoch: int) -> None:
        pass


def make_targets(y: np.ndarray, task: str) -> torch.Tensor:
    if task == "multiclass":
        return torch.as_tensor(np.asarray(y), dtype=torch.int64)
    return torch.as_tensor(np.asarray(y), dtype=torch.float32).reshape(-1, 1)


class TensorPairs(SplitDataset):
    """Tabular features (float32) or token ids (stored int32, served as int64)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        assert len(x) == len(y)
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i]
        return (x.long() if not x.is_floating_point() else x), self.y[i]


@dataclass(frozen=True)
class ImageGeometry:
    """How a stored image becomes the model's input."""

    channels: int
    size: int
    """Side of the square the model sees."""
    resize: Optional[int] = None
    """Shorter side before a centre crop of `size` (None: resize straight to size x size)."""
    interpolation: str = "bilinear"
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)


class TensorImages:
    """Images held in memory as one uint8 tensor (N, C, H, W)."""

    def __init__(self, images: torch.Tensor):
        assert images.dtype == torch.uint8 and images.ndim == 4
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class ImageFiles:
    """Images decoded from files on each access (sets too large to hold decoded)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as im:
                return _tv().pil_to_tensor(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's decoders raise all three
            raise DataError(f"data.source: cannot decode image {self.paths[i]} ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from None


class ImageDataset(SplitDataset):
    """Images fitted to `geometry`; `raw` gives uint8, `finish` the model's float input."""

    def __init__(self, images, targets: torch.Tensor, geometry: ImageGeometry):
        assert len(images) == len(targets)
        self.images, self.targets, self.geometry = images, targets, geometry

    def __len__(self) -> int:
        return len(self.targets)

    def raw(self, i: int) -> torch.Tensor:
        g = self.geometry
        img = self.images[i]
        if img.shape[0] != g.channels:
            img = _tv().rgb_to_grayscale(img) if g.channels == 1 else img.expand(g.channels, -1, -1)
        if g.resize is not None:
            F = _tv()
            img = F.resize(img, [g.resize], interpolation=F.InterpolationMode(g.interpolation), antialias=True)
            img = F.center_crop(img, [g.size, g.size])
        elif tuple(img.shape[1:]) != (g.size, g.size):
            F = _tv()
            img = F.resize(img, [g.size, g.size], interpolation=F.InterpolationMode(g.interpolation),
                           antialias=True)
        return img.contiguous()

    def raw_batch(self, indices: Sequence[int]) -> Optional[torch.Tensor]:
        """``raw`` of many images as one (N, C, H, W) tensor, where no image needs work of its
        own (held in memory, already of the model's shape); None where one may."""
        held = getattr(self.images, "images", None)
        if held is None or self.geometry.resize is not None or tuple(held.shape[1:]) != self.geometry.shape:
            return None
        return held[torch.as_tensor(indices, dtype=torch.int64)]

    def finish(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 → the model's float input; one image (C, H, W) or a batch (N, C, H, W)."""
        x = img.to(torch.float32) / 255.0
        if self.geometry.mean is not None:
            # torchvision's normalize, op for op (sub, then div, per channel), without importing it
            mean = torch.as_tensor(self.geometry.mean, dtype=x.dtype).view(-1, 1, 1)
            std = torch.as_tensor(self.geometry.std, dtype=x.dtype).view(-1, 1, 1)
            x = x.sub(mean).div_(std)
        return x

    def __getitem__(self, i: int):
        return self.finish(self.raw(i)), self.targets[i]


# ---------------------------------------------------------------- splitting and scaling


def split_indices(n: int, test_fraction: float, seed: int,
                  stratify: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic (train, test) split of range(n), stratified where the classes allow."""
    from gradyard.data.sklearn_compat import train_test_split

    try:
        tr, te = train_test_split(n, test_fraction, seed, stratify)
    except ValueError:  # a class too small to stratify
        tr, te = train_test_split(n, test_fraction, seed)
    return np.sort(tr), np.sort(te)


def impute_and_standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fill NaNs with train-column medians, then scale with train mean and std (no test leakage)."""
    train, test = train.astype(np.float64).copy(), test.astype(np.float64).copy()
    with np.errstate(all="ignore"):
        med = np.nanmedian(train, axis=0)
    med = np.where(np.isnan(med), 0.0, med)
    for a in (train, test):
        rows, cols = np.where(np.isnan(a))
        a[rows, cols] = med[cols]
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def tabular_splits(name: str, x: np.ndarray, y: np.ndarray, task: str, num_classes: int,
                   test_fraction: float, seed: int, *, standardise: bool,
                   synthetic: bool = False):
    """Split, optionally impute/standardise with train statistics, and wrap as datasets."""
    tr, te = split_indices(len(x), test_fraction, seed,
                           stratify=None if task == "regression" else y)
    xtr, xte = x[tr], x[te]
    if standardise:
        xtr, xte = impute_and_standardise(xtr, xte)
    train = TensorPairs(torch.as_tensor(np.asarray(xtr, np.float32)), make_targets(y[tr], task))
    test = TensorPairs(torch.as_tensor(np.asarray(xte, np.float32)), make_targets(y[te], task))
    info = DataInfo(name, "tabular", (x.shape[1],), num_classes, task, synthetic,
                    train_size=len(train), test_size=len(test))
    return train, test, info


def image_geometry(spec, entry, *, native_channels: int, native_size: int) -> ImageGeometry:
    """Fit images to the model: its channels and side, or the weights' own preprocessing.

    `data.image_size` overrides the side.  Models that flatten (mlp, linear)
    keep the source's channels and size unless `data.image_size` is set.
    """
    size = spec.data.image_size
    if entry.preprocess is not None:
        p = entry.preprocess
        crop = size or p.crop
        return ImageGeometry(channels=3, size=crop, resize=round(crop * p.resize / p.crop),
                             interpolation=p.interpolation, mean=p.mean, std=p.std)
    if entry.input_kind == "image":
        return ImageGeometry(channels=entry.default_input_shape[0],
                             size=size or entry.default_input_shape[-1])
    return ImageGeometry(channels=native_channels, size=size or native_size)
