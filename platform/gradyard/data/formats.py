"""Readers for data at a URL, by `data.format`; each gets a local path (see staging).

Data comes from outside, so every reader turns what it cannot use into a
:class:`DataError` that names the file (and the row and column of a bad
cell), never another exception; and no reader follows a symbolic link out of
the dataset's root (:func:`inside`).
"""

from __future__ import annotations

import csv as _csv
import functools
import gzip
import math
import os
import re
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from gradyard.data.base import (
    FALLBACK, DataError, DataInfo, ImageDataset, ImageFiles, TensorImages, TensorPairs,
    image_geometry, make_targets, split_indices, tabular_splits,
)

MISSING = ("?", "", "NA", "nan", "NaN", "N/A", "null", "None")
"""Cells that mean "no value": imputed in a feature column, an error in the target column."""


def inside(root: Path, path: Path) -> Path:
    """``path`` if it resolves inside ``root`` (links within the dataset are fine); DataError otherwise."""
    real_root, real = root.resolve(), path.resolve()
    if real != real_root and os.path.commonpath([real_root, real]) != str(real_root):
        raise DataError(f"data.source: {path} is a symbolic link out of the dataset ({real}); gradyard "
                        f"reads nothing outside {root}")
    return path


def _reader(fn):
    """Any failure to read a file that is not already a DataError becomes one, naming the source."""
    @functools.wraps(fn)
    def wrapper(spec, entry, root: Path):
        try:
            return fn(spec, entry, root)
        except DataError:
            raise
        except (OSError, ValueError, EOFError, UnicodeError, zlib.error, _csv.Error, IndexError,
                KeyError, MemoryError, OverflowError, RuntimeError) as exc:
            from gradyard.storage import redact

            raise DataError(f"data.source: cannot read {spec.data.format} data at {redact(spec.data.source)} "
                            f"({type(exc).__name__}: {redact(str(exc))[:300]})") from None
    return wrapper

# ---------------------------------------------------------------- MNIST / FashionMNIST IDX

_IDX_FILES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
_IDX_MAGIC = {3: 2051, 1: 2049}  # 0x00000803 images, 0x00000801 labels (unsigned bytes)


def _find_idx(root: Path, names: tuple[str, ...]) -> Path | None:
    # torchvision keeps them under <root>/<MNIST|FashionMNIST>/raw.
    for folder in (root, root / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"):
        for name in names:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return inside(root, candidate)
    return None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX array of unsigned bytes with `ndim` dimensions, checking the magic number."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        blob = f.read()
    magic = int.from_bytes(blob[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise DataError(f"data.source: {path} is not an IDX file of {ndim}-d unsigned bytes "
                        f"(magic {magic:#010x}, expected {_IDX_MAGIC[ndim]:#010x})")
    if len(blob) < 4 + 4 * ndim:
        raise DataError(f"data.source: {path} is truncated (its {ndim}-d IDX header needs {4 + 4 * ndim} bytes)")
    dims = [int.from_bytes(blob[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(blob, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims) or (ndim == 3 and 0 in dims):
        raise DataError(f"data.source: {path} is truncated ({data.size} bytes of data for "
                        f"dimensions {dims})")
    return data.reshape(dims)


@_reader
def idx(spec, entry, root: Path):
    paths = {k: _find_idx(root, names) for k, names in _IDX_FILES.items()}
    if any(p is None for p in paths.values()):
        expected = ", ".join(f"{names[0]}[.gz]" for names in _IDX_FILES.values())
        raise DataError(f"data.source: no MNIST IDX files at {spec.data.source} (expected "
                        f"{expected}). {FALLBACK[:-1]} (or data.source=digits).")
    splits = []
    for part in ("train", "test"):
        images = read_idx(paths[f"{part}_images"], 3)
        labels = read_idx(paths[f"{part}_labels"], 1).astype(np.int64)
        if len(images) != len(labels):
            raise DataError(f"data.source: {part} split has {len(images)} images but "
                            f"{len(labels)} labels")
        splits.append((torch.from_numpy(images.copy()).unsqueeze(1), labels))
    num_classes = int(max(splits[0][1].max(), splits[1][1].max())) + 1
    geometry = image_geometry(spec, entry, native_channels=1, native_size=splits[0][0].shape[-1])
    train, test = (ImageDataset(TensorImages(x), make_targets(y, "multiclass"), geometry)
                   for x, y in splits)
    info = DataInfo("idx", "image", geometry.shape, num_classes, "multiclass", False,
                    train_size=len(train), test_size=len(test))
    return train, test, info


# ---------------------------------------------------------------- ImageFolder

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _image_tree(root: Path, folder: Path) -> dict[str, list[Path]]:
    tree = {}
    for d in sorted(folder.iterdir()):
        if not d.is_dir():
            continue
        inside(root, d)
        tree[d.name] = sorted(inside(root, p) for p in d.rglob("*")
                              if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return tree


@_reader
def imagefolder(spec, entry, root: Path):
    """`root/train/<class>/*` and `root/test/<class>/*`; without test/, a split of train/."""
    train_tree = _image_tree(root, inside(root, root / "train")) if (root / "train").is_dir() else {}
    if not any(train_tree.values()):
        raise DataError(f"data.source: no images at {spec.data.source}/train/<class>/ "
                        f"(ImageFolder layout: train/<class>/*.jpg and test/<class>/*.jpg). "
                        f"{FALLBACK}")
    classes = sorted(train_tree)
    geometry = image_geometry(spec, entry, native_channels=3, native_size=64)

    def flatten(tree):
        pairs = [(p, classes.index(c)) for c in sorted(tree) for p in tree[c]]
        return [p for p, _ in pairs], np.array([y for _, y in pairs], dtype=np.int64)

    train_paths, train_y = flatten(train_tree)
    if (root / "test").is_dir():
        test_tree = _image_tree(root, inside(root, root / "test"))
        unknown = sorted(set(test_tree) - set(classes))
        if unknown:
            raise DataError(f"data.source: test/ has classes that train/ lacks: "
                            f"{', '.join(unknown)}")
        test_paths, test_y = flatten(test_tree)
    else:
        tr, te = split_indices(len(train_y), spec.data.test_fraction, spec.schedule.seed, train_y)
        test_paths, test_y = [train_paths[i] for i in te], train_y[te]
        train_paths, train_y = [train_paths[i] for i in tr], train_y[tr]
    train = ImageDataset(ImageFiles(train_paths), make_targets(train_y, "multiclass"), geometry)
    test = ImageDataset(ImageFiles(test_paths), make_targets(test_y, "multiclass"), geometry)
    info = DataInfo("imagefolder", "image", geometry.shape, len(classes), "multiclass", False,
                    train_size=len(train), test_size=len(test))
    return train, test, info


# ---------------------------------------------------------------- IMDB (aclImdb)

_TOKEN = re.compile(r"[a-z0-9']+")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower().replace("<br />", " "))


def _reviews(root: Path, folder: Path) -> tuple[list[list[str]], np.ndarray]:
    docs, labels = [], []
    for label, name in ((0, "neg"), (1, "pos")):
        for p in sorted(inside(root, folder / name).glob("*.txt")):
            docs.append(tokenize(inside(root, p).read_text(encoding="utf-8", errors="replace")))
            labels.append(label)
    return docs, np.array(labels, dtype=np.float32)


def encode(docs: list[list[str]], vocab: dict[str, int], length: int) -> torch.Tensor:
    """Token ids, padded with 0 in front and cut to the last `length` tokens.

    Padding goes in front because the LSTM head reads the last time step.
    """
    out = np.zeros((len(docs), length), dtype=np.int32)
    for i, doc in enumerate(docs):
        ids = [vocab.get(t, 1) for t in doc[-length:]]
        if ids:
            out[i, length - len(ids):] = ids
    return torch.from_numpy(out)


@_reader
def aclimdb(spec, entry, root: Path):
    if not (root / "train").is_dir() and (root / "aclImdb" / "train").is_dir():
        root = root / "aclImdb"
    if not all((root / s / c).is_dir() for s in ("train", "test") for c in ("pos", "neg")):
        raise DataError(f"data.source: no aclImdb reviews at {spec.data.source} (expected "
                        f"train/pos, train/neg, test/pos, test/neg folders of .txt files). "
                        f"{FALLBACK}")
    train_docs, train_y = _reviews(root, root / "train")
    test_docs, test_y = _reviews(root, root / "test")
    if not train_docs:
        raise DataError(f"data.source: {root}/train/pos and train/neg hold no .txt files")
    counts = Counter(t for doc in train_docs for t in doc)
    # Ties broken alphabetically so the vocabulary is the same on every worker.
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: spec.data.vocab_size - 2]
    vocab = {tok: i + 2 for i, (tok, _) in enumerate(top)}  # 0 = padding, 1 = unknown
    length = spec.data.max_length
    train = TensorPairs(encode(train_docs, vocab, length), make_targets(train_y, "binary"))
    test = TensorPairs(encode(test_docs, vocab, length), make_targets(test_y, "binary"))
    info = DataInfo("aclimdb", "text", (length,), 1, "binary", False,
                    vocab_size=spec.data.vocab_size, train_size=len(train), test_size=len(test))
    return train, test, info


# ---------------------------------------------------------------- CSV tables

MAMMOGRAPHIC_FILE = "mammographic_masses.data"
MAMMOGRAPHIC_COLUMNS = ("bi_rads", "age", "shape", "margin", "density", "severity")


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [[c.strip() for c in row] for row in _csv.reader(f) if any(c.strip() for c in row)]
    if not rows:
        raise DataError(f"data.source: {path} is empty")
    return rows


def _check_width(rows: list[list[str]], path: Path, columns: list[str] | tuple[str, ...]) -> None:
    bad = next((i for i, r in enumerate(rows) if len(r) != len(columns)), None)
    if bad is not None:
        raise DataError(f"data.source: {path} data row {bad + 1} has {len(rows[bad])} columns, "
                        f"expected {len(columns)} ({', '.join(columns)})")


def _numbers(rows: list[list[str]], path: Path, columns, first_row: int = 1) -> np.ndarray:
    """Finite floats, with the :data:`MISSING` markers as NaN; DataError naming row and column otherwise."""
    out = np.empty((len(rows), len(rows[0]) if rows else 0), dtype=np.float64)
    for i, r in enumerate(rows):
        for j, c in enumerate(r):
            if c in MISSING:
                out[i, j] = np.nan
                continue
            try:
                v = float(c)
            except ValueError:
                v = math.nan if c.lower() in ("nan", "inf", "-inf") else None
            if v is None or not math.isfinite(v):
                raise DataError(f"data.source: {path} row {i + first_row}, column {columns[j]!r}: {c[:40]!r} "
                                "is not a number (features must be numbers, or ? / empty for missing)")
            out[i, j] = v
    return out


def _target_problem(path: Path, row: int, column: str, cell: str, allowed: str) -> DataError:
    return DataError(f"data.source: {path} row {row}, column {column!r}: target {cell[:40]!r} is not "
                     f"{allowed}; a row's target cannot be missing")


@_reader
def mammographic(spec, entry, path: Path):
    """UCI Mammographic Mass: age, shape, margin, density → severity (benign 0 / malignant 1).

    BI-RADS is read but not used: the data set's description marks it
    non-predictive (it is the radiologist's own assessment).
    """
    root = path
    if path.is_dir():
        path = inside(root, path / MAMMOGRAPHIC_FILE)
    if not path.is_file():
        raise DataError(f"data.source: no {MAMMOGRAPHIC_FILE} at {spec.data.source}. {FALLBACK}")
    rows = _rows(path)
    _check_width(rows, path, MAMMOGRAPHIC_COLUMNS)
    for i, r in enumerate(rows):
        if r[5] not in ("0", "1"):
            raise _target_problem(path, i + 1, "severity", r[5], "0 (benign) or 1 (malignant)")
    table = _numbers([r[:5] for r in rows], path, MAMMOGRAPHIC_COLUMNS)
    x, y = table[:, 1:5], np.array([int(r[5]) for r in rows], dtype=np.int64)
    if len(set(y.tolist())) < 2 or len(y) < 4:
        raise DataError(f"data.source: {path} needs rows of both severities (0 and 1), at least 4 rows")
    train, test, info = tabular_splits("mammographic", x, y, "binary", 1, spec.data.test_fraction,
                                       spec.schedule.seed, standardise=True)
    return train, test, info


TARGET_NAMES = ("target", "label", "y", "class")


@_reader
def csv(spec, entry, path: Path):
    """A CSV with a header row: numeric features, target in a column named target/label/y/class
    (else the last column).  Integer or text targets with few values are classes; other
    numbers are a regression target.  Missing features are imputed, all are standardised.
    """
    if path.is_dir():
        found = sorted(path.glob("*.csv"))
        if len(found) != 1:
            raise DataError(f"data.source: expected one .csv file in {spec.data.source}, "
                            f"found {len(found)}. {FALLBACK}")
        path = inside(path, found[0])
    rows = _rows(path)
    if len(rows) < 3:
        raise DataError(f"data.source: {path} needs a header row and data rows")
    header, body = [h.lower() for h in rows[0]], rows[1:]
    if len(header) < 2:
        raise DataError(f"data.source: {path} needs at least two columns (features and a target)")
    _check_width(body, path, header)
    t = next((header.index(n) for n in TARGET_NAMES if n in header), len(header) - 1)
    target = [r[t] for r in body]
    for i, cell in enumerate(target):
        if cell in MISSING or cell.lower() in ("inf", "-inf", "+inf"):
            raise _target_problem(path, i + 2, header[t], cell, "a class name or a finite number")
    x = _numbers([r[:t] + r[t + 1:] for r in body], path, header[:t] + header[t + 1:], first_row=2)
    try:
        values = np.array([float(v) for v in target])
        numeric = bool(np.all(np.isfinite(values)))
    except ValueError:
        numeric = False
    if numeric and not (np.all(values == np.round(values)) and len(set(values)) <= 50):
        y, task, k = values.astype(np.float32), "regression", 1
    else:
        raw = values if numeric else target
        index = {v: i for i, v in enumerate(sorted(set(raw)))}
        y = np.array([index[v] for v in raw], dtype=np.int64)
        if len(index) < 2:
            raise DataError(f"data.source: {path} column {header[t]!r} holds one class only; a classifier "
                            "needs two or more")
        task, k = ("binary", 1) if len(index) == 2 else ("multiclass", len(index))
    return tabular_splits("csv", x, y, task, k, spec.data.test_fraction, spec.schedule.seed,
                          standardise=True)
