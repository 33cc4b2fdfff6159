"""Small datasets in their real on-disk formats, written by tests and benchmarks.

MNIST/FashionMNIST IDX files, an ImageFolder tree, an aclImdb tree and the
UCI mammographic-masses CSV: the same bytes the real loaders read.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    magic = 0x0803 if array.ndim == 3 else 0x0801
    blob = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    blob += array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        blob = gzip.compress(blob)
    path.write_bytes(blob)


def make_mnist(folder, gz: bool, n_train=20, n_test=10):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for part, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        write_idx(folder / f"{part}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{part}-labels-idx1-ubyte", labels, gz)
        arrays[part] = (images, labels)
    return arrays


def make_imagefolder(root, splits=("train", "test"), per_class=3, size=(30, 40)):
    rng = np.random.default_rng(0)
    for split in splits:
        for cls in ("pizza", "steak", "sushi"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class if split == "train" else 1):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def make_aclimdb(root):
    reviews = {
        "train": {"neg": ["Awful. Boring plot", "boring boring and dull"],
                  "pos": ["A great, great film!<br />Loved it.", "great acting, superb"]},
        "test": {"neg": ["boring", "dull"],
                 "pos": ["great zebra", "a a a a a a a a a great"]},
    }
    for split, by_label in reviews.items():
        for label, texts in by_label.items():
            (root / "aclImdb" / split / label).mkdir(parents=True)
            for i, text in enumerate(texts):
                (root / "aclImdb" / split / label / f"{i}_7.txt").write_text(text)
    (root / "aclImdb" / "train" / "unsup").mkdir()  # unlabelled reviews are ignored


MAMMO = """5,67,3,5,3,1
4,43,1,1,?,1
5,58,4,5,3,1
4,28,1,1,3,0
5,74,1,5,?,1
4,65,1,?,3,0
4,70,?,?,3,0
5,42,1,?,3,0
5,57,1,5,3,1
5,60,?,5,1,1
5,76,1,4,3,1
3,42,2,1,3,1
4,64,1,?,3,0
4,36,3,1,2,0
4,60,2,1,2,0
4,54,1,1,3,0
3,52,3,4,3,0
4,59,2,1,3,1
4,54,1,1,3,1
4,40,1,?,?,0
"""


def make_mammographic(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(MAMMO)
    return path


def write_job_datasets(root: Path) -> None:
    """Every shipped job's data in its real format under ``root`` (see :func:`real_data_overrides`),
    and pretrained EfficientNet-B0 weights of the right shapes (random: nothing is downloaded)."""
    import torch
    import torchvision

    make_mnist(root / "FashionMNIST" / "raw", gz=True, n_train=16, n_test=8)
    make_imagefolder(root / "food", per_class=4, size=(70, 70))
    make_aclimdb(root)
    make_mammographic(root / "mammographic_masses.data")
    torch.save(torchvision.models.efficientnet_b0(weights=None).state_dict(), root / "efficientnet_b0.pth")


def real_data_overrides(job: str, root: Path) -> list[str]:
    """`--set` overrides that point ``job`` at the data :func:`write_job_datasets` wrote (built-in
    sources need none; AlexNet trains on synthetic data of its real 224x224 shape)."""
    return {
        "fashion-linear": [f"data.source={root}/FashionMNIST/raw"],
        "fashion-nonlinear": [f"data.source={root}/FashionMNIST/raw"],
        "fashion-cnn": [f"data.source={root}/FashionMNIST/raw"],
        "tinyvgg": [f"data.source={root}/food", "data.loader_workers=0"],
        "efficientnet-transfer": [f"data.source={root}/food", f"model.pretrained={root}/efficientnet_b0.pth",
                                  "data.loader_workers=0"],
        "imdb-lstm": [f"data.source={root}/aclImdb"],
        "mammogram-mlp": [f"data.source={root}/mammographic_masses.data"],
        "alexnet": ["data.source=synthetic", "data.format=null", "data.num_samples=16",
                    "data.loader_workers=0", "data.pin_memory=false", "scaling.use_gpu=false",
                    "schedule.precision=fp32"],
    }.get(job, [])
