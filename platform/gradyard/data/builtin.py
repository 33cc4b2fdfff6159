"""Data sets that need no files: scikit-learn's bundled and generated sets, and `synthetic`.

scikit-learn ships `digits` and `breast_cancer` inside its wheel, so none of
these reads the network.  Each is a pure function of the job's seed.  They are
made by :mod:`gradyard.data.sklearn_compat` (scikit-learn's own draws, without
the cost of importing it).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gradyard.data.base import (
    DataInfo, ImageDataset, ImageGeometry, TensorImages, TensorPairs, image_geometry,
    make_targets, split_indices, tabular_splits,
)
from gradyard.sources import synthetic_profile

SYNTHETIC_SAMPLES = 512


def circles(spec, entry):
    from gradyard.data.sklearn_compat import make_circles

    x, y = make_circles(n_samples=spec.data.num_samples or 1000, noise=0.1, factor=0.5,
                        random_state=spec.schedule.seed)
    return tabular_splits("circles", x, y, "binary", 1, spec.data.test_fraction,
                          spec.schedule.seed, standardise=False)


def blobs(spec, entry):
    from gradyard.data.sklearn_compat import make_blobs

    # 4 centres, 2 features, cluster_std 1.5 as in learnpytorch.io's classification chapter.
    x, y = make_blobs(n_samples=spec.data.num_samples or 1000, n_features=2, centers=4,
                      cluster_std=1.5, random_state=spec.schedule.seed)
    return tabular_splits("blobs", x, y, "multiclass", 4, spec.data.test_fraction,
                          spec.schedule.seed, standardise=False)


def breast_cancer(spec, entry):
    from gradyard.data.sklearn_compat import load_breast_cancer

    data, target = load_breast_cancer()
    return tabular_splits("breast_cancer", data, target, "binary", 1,
                          spec.data.test_fraction, spec.schedule.seed, standardise=True)


def digits(spec, entry):
    """sklearn's 8x8 handwritten digits (0..16) as images: 1x28x28, or the model's own size."""
    from gradyard.data.sklearn_compat import load_digits

    digit_images, target = load_digits()
    images = torch.as_tensor(np.rint(digit_images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    geometry = image_geometry(spec, entry, native_channels=1, native_size=28)
    return image_splits("digits", images, target, "multiclass", 10, geometry, spec)


def image_splits(name, images: torch.Tensor, y: np.ndarray, task: str, num_classes: int,
                 geometry: ImageGeometry, spec, synthetic: bool = False):
    tr, te = split_indices(len(y), spec.data.test_fraction, spec.schedule.seed,
                           stratify=None if task == "regression" else y)
    train = ImageDataset(TensorImages(images[tr]), make_targets(y[tr], task), geometry)
    test = ImageDataset(TensorImages(images[te]), make_targets(y[te], task), geometry)
    info = DataInfo(name, "image", geometry.shape, num_classes, task, synthetic,
                    train_size=len(train), test_size=len(test))
    return train, test, info


# ---------------------------------------------------------------- synthetic


def synthetic(spec, entry):
    """Data shaped as :func:`gradyard.sources.synthetic_profile` says, with learnable signal.

    Classes differ in their mean (tabular), in a low-frequency pattern
    (images) or in a handful of over-represented tokens (text); regression
    targets are a linear function of the input plus noise.
    """
    rng = np.random.default_rng(spec.schedule.seed)
    n = spec.data.num_samples or SYNTHETIC_SAMPLES
    kind, shape, task, num_classes = synthetic_profile(spec, entry)
    k = 2 if task == "binary" else num_classes
    # Regression: a continuous latent t in place of the class.
    latent = rng.standard_normal(n) if task == "regression" else rng.integers(0, k, n)
    y = latent.astype(np.float32) if task == "regression" else latent
    if kind == "tabular":
        d = math.prod(shape)
        if task == "regression":
            w = rng.standard_normal(d)
            x = rng.standard_normal((n, d))
            y = (x @ w / math.sqrt(d) + 0.1 * rng.standard_normal(n)).astype(np.float32)
        else:
            x = 2.0 * rng.standard_normal((k, d))[latent] + rng.standard_normal((n, d))
        return tabular_splits("synthetic", x.astype(np.float32), y, task, num_classes,
                              spec.data.test_fraction, spec.schedule.seed,
                              standardise=False, synthetic=True)
    if kind == "image":
        geometry = image_geometry(spec, entry, native_channels=shape[0], native_size=shape[-1])
        images = _synthetic_images(rng, latent, task, k, geometry.shape)
        # The images already have the model's shape: no resize or crop at load time.
        geometry = ImageGeometry(geometry.channels, geometry.size, None, geometry.interpolation,
                                 geometry.mean, geometry.std)
        return image_splits("synthetic", images, y, task, num_classes, geometry, spec,
                            synthetic=True)
    return _synthetic_text(rng, latent, y, task, num_classes, k, spec)


def _synthetic_images(rng, latent, task, k, shape) -> torch.Tensor:
    c, s, _ = shape
    coarse = torch.as_tensor(rng.standard_normal((k, c, 4, 4)), dtype=torch.float32)
    patterns = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bilinear",
                                               align_corners=False)
    out = torch.empty((len(latent), c, s, s), dtype=torch.uint8)
    for start in range(0, len(latent), 64):  # in chunks: 224x224 noise for 512 images is large
        lat = latent[start:start + 64]
        if task == "regression":
            signal = torch.as_tensor(lat, dtype=torch.float32)[:, None, None, None] * patterns[0]
        else:
            signal = patterns[torch.as_tensor(lat)]
        noise = torch.as_tensor(rng.standard_normal((len(lat), c, s, s), dtype=np.float32))
        img = 0.5 + 0.15 * signal + 0.1 * noise
        out[start:start + len(lat)] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


def _synthetic_text(rng, latent, y, task, num_classes, k, spec):
    vocab, length = spec.data.vocab_size, spec.data.max_length
    n = len(latent)
    marker_classes = 2 if task == "regression" else k
    markers = rng.choice(np.arange(2, vocab), size=(marker_classes, 20), replace=False)
    tokens = rng.integers(2, vocab, size=(n, length))
    if task == "regression":
        # The share of class-1 markers among all markers grows with the target.
        p1 = 1.0 / (1.0 + np.exp(-latent))
        cls = (rng.random((n, length)) < p1[:, None]).astype(np.int64)
    else:
        cls = np.repeat(latent[:, None], length, axis=1)
    marked = rng.random((n, length)) < 0.15
    picks = markers[cls, rng.integers(0, 20, size=(n, length))]
    tokens = np.where(marked, picks, tokens)
    # Reviews vary in length; padding (0) goes in front, as for real text.
    lengths = rng.integers(length // 2, length + 1, size=n)
    tokens[np.arange(length)[None, :] < (length - lengths)[:, None]] = 0
    tr, te = split_indices(n, spec.data.test_fraction, spec.schedule.seed,
                           stratify=None if task == "regression" else latent)
    x = torch.as_tensor(tokens, dtype=torch.int32)
    train = TensorPairs(x[tr], make_targets(y[tr], task))
    test = TensorPairs(x[te], make_targets(y[te], task))
    info = DataInfo("synthetic", "text", (length,), num_classes, task, True,
                    vocab_size=vocab, train_size=len(train), test_size=len(test))
    return train, test, info
