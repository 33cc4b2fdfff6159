"""Training-split augmentation whose randomness depends only on (seed, epoch, index).

A resumed run, or one with a different number of loader workers, must see
exactly the augmented samples the original run saw.  So no transform draws
from a shared random stream: each sample's transform runs under the global
torch RNG re-seeded from (seed, epoch, index), inside `fork_rng` so the
caller's stream is left as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from gradyard.data.base import ImageDataset, SplitDataset

if TYPE_CHECKING:
    from torchvision.transforms import v2


def build_transform(augmentations: Sequence) -> Optional["v2.Transform"]:
    """The job's `augmentation` list as one v2 transform on uint8 (C, H, W) tensors."""
    if not augmentations:
        return None
    from torchvision.transforms import v2  # only a job that augments pays for importing torchvision

    steps = []
    for a in augmentations:
        if a.name == "flip":
            steps.append(v2.RandomHorizontalFlip(p=a.p))
        elif a.name == "rotation":
            steps.append(v2.RandomRotation(degrees=a.degrees))
        elif a.name == "color_jitter":
            steps.append(v2.ColorJitter(brightness=a.brightness, contrast=a.contrast,
                                        saturation=a.saturation, hue=a.hue))
        elif a.name == "trivial_augment_wide":
            steps.append(v2.TrivialAugmentWide(num_magnitude_bins=a.num_magnitude_bins))
        elif a.name == "rand_augment":
            steps.append(v2.RandAugment(num_ops=a.num_ops, magnitude=a.magnitude))
        else:  # the schema admits no other names
            raise AssertionError(a.name)
    return v2.Compose(steps) if steps else None


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample in one epoch."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class Augmented(SplitDataset):
    """The training split of an image set, augmented as a pure function of (seed, epoch, index)."""

    def __init__(self, base: ImageDataset, transform: Optional["v2.Transform"], seed: int):
        self.base, self.transform, self.seed = base, transform, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img = self.base.raw(i)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, self.epoch, int(i)))
                img = self.transform(img)
        return self.base.finish(img), self.base.targets[i]

    def __getitems__(self, indices: list[int]) -> list:
        """A batch's samples (the DataLoader's batched fetch): without a transform, images held
        in memory at the model's shape are converted in one tensor operation per batch, not
        one per image (per image, that work was 7% of fashion-cnn's training loop).  The
        values are the ones ``__getitem__`` gives, to the bit."""
        if self.transform is None:
            batch = self.base.raw_batch(indices)
            if batch is not None:
                x = self.base.finish(batch)
                y = self.base.targets[torch.as_tensor(indices, dtype=torch.int64)]
                return list(zip(x, y))  # the loader's collate stacks them again
        return [self[i] for i in indices]
