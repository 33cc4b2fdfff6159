"""The plain contenders' models and data, shared by the two plain scripts (no gradyard code).

Copies of the catalogue's models, written the tutorials' way; the benchmark
checks that their parameter counts equal gradyard's.  Imported by file name
(``from plain_models import ...``) from the scripts beside it; Ray workers get
it pickled by value (``raytrain_plain.py``), so nothing needs installing.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torch.utils.data import Dataset

WARMUP_STEPS = 7  # the same as gradyard.steptime.STEADY_AFTER_STEPS (a test checks)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))


class FashionCNN(nn.Module):
    """FashionMNISTModelV2 (learnpytorch.io): two TinyVGG conv blocks and a Linear head."""

    def __init__(self, channels: int, size: int, classes: int, hidden: int = 10):
        super().__init__()
        self.block_1 = conv_block(channels, hidden)
        self.block_2 = conv_block(hidden, hidden)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(hidden * (size // 4) ** 2, classes))

    def forward(self, x):
        return self.classifier(self.block_2(self.block_1(x)))


def build_model(name: str, shape: tuple, classes: int) -> nn.Module:
    if name == "fashion_cnn":
        return FashionCNN(shape[0], shape[-1], classes)
    if name == "alexnet":
        return torchvision.models.alexnet(weights=None, num_classes=classes)
    if name == "efficientnet_b0_transfer":  # frozen features, a new head (torchvision's transfer tutorial)
        model = torchvision.models.efficientnet_b0(weights=None)
        for p in model.features.parameters():
            p.requires_grad = False
        model.classifier = nn.Sequential(nn.Dropout(p=0.2, inplace=True), nn.Linear(1280, classes))
        return model
    raise SystemExit(f"unknown model {name}")


class SyntheticImages(Dataset):
    """uint8 images in memory, turned into floats per sample (as ToTensor does)."""

    def __init__(self, n: int, shape: tuple, classes: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, classes, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i].float() / 255.0, self.labels[i]
