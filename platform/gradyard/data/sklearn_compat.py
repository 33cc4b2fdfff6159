"""scikit-learn's generated and bundled data sets and its train/test split, without importing it.

Why not call scikit-learn: importing any part of it runs ``sklearn/__init__``, which
loads ``sklearn.base``, its validation utilities and ``scipy.stats``: about 2.4 s of
CPU in every worker process, paid again at every restart of a worker group (a
SIGKILLed worker's group resumes that much later), for jobs whose data takes
milliseconds to make.  What gradyard uses of it is small and stable: two
generators, two CSV files in its wheel and ``train_test_split``.  These functions
reproduce them draw for draw on numpy's ``RandomState`` (scikit-learn 1.9's code),
so every split and every sample is the one scikit-learn gives; ``tests/test_data.py``
checks that against scikit-learn itself for many seeds, sizes and class mixes.
scikit-learn stays a dependency: its wheel holds the two data files.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import math
from pathlib import Path
from typing import Optional

import numpy as np


def _shuffled(rng: np.random.RandomState, *arrays: np.ndarray) -> list[np.ndarray]:
    """``sklearn.utils.shuffle``: one permutation of the rows of every array."""
    indices = np.arange(len(arrays[0]))
    rng.shuffle(indices)
    return [a[indices] for a in arrays]


def make_circles(n_samples: int, *, noise: Optional[float], factor: float,
                 random_state: int) -> tuple[np.ndarray, np.ndarray]:
    """``sklearn.datasets.make_circles(n_samples, shuffle=True, noise=, factor=, random_state=)``."""
    rng = np.random.RandomState(random_state)
    n_out = n_samples // 2
    n_in = n_samples - n_out
    out = np.linspace(0, 2 * np.pi, n_out, endpoint=False)
    inner = np.linspace(0, 2 * np.pi, n_in, endpoint=False)
    x = np.vstack([np.append(np.cos(out), np.cos(inner) * factor),
                   np.append(np.sin(out), np.sin(inner) * factor)]).T
    y = np.hstack([np.zeros(n_out, dtype=np.intp), np.ones(n_in, dtype=np.intp)])
    x, y = _shuffled(rng, x, y)
    if noise is not None:
        x += rng.normal(scale=noise, size=x.shape)
    return x, y


def make_blobs(n_samples: int, *, n_features: int, centers: int, cluster_std: float,
               random_state: int, center_box: tuple[float, float] = (-10.0, 10.0)) -> tuple[np.ndarray, np.ndarray]:
    """``sklearn.datasets.make_blobs`` with an int ``n_samples``, an int ``centers`` and one std."""
    rng = np.random.RandomState(random_state)
    means = rng.uniform(center_box[0], center_box[1], size=(centers, n_features))
    per_center = [n_samples // centers] * centers
    for i in range(n_samples % centers):
        per_center[i] += 1
    x = np.empty((n_samples, n_features), dtype=np.float64)
    y = np.empty((n_samples,), dtype=int)
    start = 0
    for i, n in enumerate(per_center):
        x[start:start + n] = rng.normal(loc=means[i], scale=cluster_std, size=(n, n_features))
        y[start:start + n] = i
        start += n
    x, y = _shuffled(rng, x, y)
    return x, y


def _bundled(name: str) -> Path:
    """A data file in scikit-learn's wheel, found without importing the package."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"scikit-learn is not installed: its {name} is gradyard's copy of that data")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name


def load_breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    """(data (569, 30) float64, target (569,) int): ``sklearn.datasets.load_breast_cancer``."""
    with open(_bundled("breast_cancer.csv"), encoding="utf-8") as f:
        rows = csv.reader(f)
        head = next(rows)
        data = np.empty((int(head[0]), int(head[1])))
        target = np.empty((int(head[0]),), dtype=int)
        for i, row in enumerate(rows):
            data[i] = np.asarray(row[:-1], dtype=np.float64)
            target[i] = np.asarray(row[-1], dtype=int)
    return data, target


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float64, target (1797,) int): ``sklearn.datasets.load_digits``."""
    with gzip.open(_bundled("digits.csv.gz"), "rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False)


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """``sklearn.utils.extmath._approximate_mode``: draws per class, ties broken by ``rng``."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            inds = rng.choice(inds, size=add_now, replace=False)
            floored[inds] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def train_test_split(n: int, test_size: float, random_state: int,
                     stratify: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """``sklearn.model_selection.train_test_split(np.arange(n), test_size=, random_state=, stratify=)``
    for a float ``test_size``: (train, test) indices, in scikit-learn's order; a ValueError where
    scikit-learn raises one (a class of one member, fewer samples on a side than classes)."""
    n_test = math.ceil(test_size * n)
    n_train = n - n_test
    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"test_size={test_size} leaves an empty split of {n} samples")
    rng = np.random.RandomState(random_state)
    if stratify is None:
        permutation = rng.permutation(n)
        return permutation[n_test:n_test + n_train], permutation[:n_test]
    classes, y_indices, class_counts = np.unique(stratify, return_inverse=True, return_counts=True)
    if class_counts.min() < 2 or n_train < len(classes) or n_test < len(classes):
        raise ValueError("a class too small to stratify")
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list = []
    test: list = []
    for i in range(len(classes)):
        perm = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(perm[:n_i[i]])
        test.extend(perm[n_i[i]:n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)
