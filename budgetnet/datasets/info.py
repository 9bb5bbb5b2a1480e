"""What a dataset is, known without reading it: shape, classes, normalisation; and its one error."""

from __future__ import annotations

from dataclasses import dataclass

from budgetnet.config import Shape


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset, known without reading it (what the budget guard needs)."""

    name: str
    channels: int
    num_classes: int
    image_size: int
    train_size: int  # images in the official training split
    default_val: int  # default validation hold-out
    mean: tuple[float, ...]  # per-channel mean of the training split, in [0, 1]
    std: tuple[float, ...]

    @property
    def shape(self) -> Shape:
        return Shape(self.channels, self.num_classes, self.image_size)


DATASET_INFO: dict[str, DatasetInfo] = {
    "cifar100": DatasetInfo("cifar100", 3, 100, 32, 50_000, 5_000,
                            (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "cifar10": DatasetInfo("cifar10", 3, 10, 32, 50_000, 5_000,
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "fashion_mnist": DatasetInfo("fashion_mnist", 1, 10, 28, 60_000, 5_000, (0.2860,), (0.3530,)),
    "synthetic": DatasetInfo("synthetic", 3, 10, 32, 2_400, 400, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class DatasetNotFound(Exception):
    """The dataset's files are not where they should be (a user mistake: one clear line)."""


def unknown_dataset(name: str) -> DatasetNotFound:
    """The error for a name that is neither built in nor ``folder:PATH``."""
    return DatasetNotFound(f"unknown dataset {name!r} (choose from {', '.join(DATASET_INFO)} or folder:PATH)")
