"""The demo's data: scikit-learn's bundled handwritten digits, split once, batched reproducibly.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 images of the digits 0-9 (values 0..16) inside
scikit-learn itself, so nothing is downloaded. They are scaled to [0, 1] and split, stratified by
class, into a training and a test set with a fixed seed.

Batches are drawn from a generator seeded by ``(seed, epoch)``, so two training runs -- minqat's and
torch.ao's -- see exactly the same images in the same order, whatever ran before them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Digits", "MissingExtra", "load_digits_split", "epoch_batches", "INSTALL_HINT"]

INSTALL_HINT = 'pip install -c constraints.txt -e ".[demo]"'


class MissingExtra(RuntimeError):
    """An optional dependency of the demo (the ``demo`` extra) is not installed."""


@dataclass(frozen=True)
class Digits:
    x_train: torch.Tensor  # (N_train, 1, 8, 8) float32 in [0, 1]
    y_train: torch.Tensor  # (N_train,) int64 in 0..9
    x_test: torch.Tensor  # (N_test, 1, 8, 8)
    y_test: torch.Tensor  # (N_test,)

    @property
    def classes(self) -> int:
        return 10


def load_digits_split(seed: int, test_fraction: float = 0.25, train_limit: int | None = None) -> Digits:
    """The digits, scaled to [0, 1], split (stratified) with ``seed``; ``train_limit`` keeps the first
    training images only (the ``--quick`` mode).

    Raises:
        MissingExtra: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise MissingExtra(f"the demo needs scikit-learn (its bundled digits): {INSTALL_HINT}") from err
    images, labels = load_digits(return_X_y=True)  # (1797, 64) float64 0..16, (1797,)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels)

    def as_images(x) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0  # (N, 1, 8, 8)

    if train_limit is not None:
        x_train, y_train = x_train[:train_limit], y_train[:train_limit]
    return Digits(as_images(x_train), torch.as_tensor(y_train, dtype=torch.long),
                  as_images(x_test), torch.as_tensor(y_test, dtype=torch.long))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index tensors of one epoch's minibatches: a permutation of ``range(n)`` drawn from a generator
    seeded by ``(seed, epoch)`` alone, cut into ``batch_size`` pieces (the last one may be smaller).

    >>> [b.tolist() for b in epoch_batches(5, 2, seed=0, epoch=0)] == \\
    ...     [b.tolist() for b in epoch_batches(5, 2, seed=0, epoch=0)]
    True
    >>> sorted(torch.cat(epoch_batches(5, 2, seed=0, epoch=1)).tolist())
    [0, 1, 2, 3, 4]
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(torch.randperm(n, generator=gen).split(batch_size))
