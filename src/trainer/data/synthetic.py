"""Synthetic data made from a seed: the GradientTape example, a regression and Gaussian class blobs."""

from __future__ import annotations

import numpy as np

from trainer.data.core import Dataset, split


def tape_example(x: float, y: float, val_fraction: float, seed: int) -> Dataset:
    """The one example of TensorFlow's GradientTape introduction."""
    return split(np.array([[x]]), np.array([[y]]), val_fraction, seed, source="data=tape_example", columns=["x", "y"])


def regression(
    n_samples: int, n_features: int, n_targets: int, noise: float, kind: str, val_fraction: float, seed: int
) -> Dataset:
    """y = x @ W + b (+ a smooth nonlinearity for kind=nonlinear) + Gaussian noise; x ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_samples, n_features))
    w = rng.standard_normal((n_features, n_targets)) / np.sqrt(n_features)
    y = x @ w + rng.standard_normal(n_targets) * 0.5
    if kind == "nonlinear":
        y = np.sin(2.0 * y) + 0.5 * np.square(x[:, :1] @ np.ones((1, n_targets)))
    y = y + noise * rng.standard_normal(y.shape)
    return split(x, y, val_fraction, seed, source="data=regression")


def classification(
    n_samples: int, n_features: int, n_classes: int, separation: float, val_fraction: float, seed: int
) -> Dataset:
    """Gaussian blobs around random class centres `separation` apart on average; one-hot targets."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, n_features)) * separation / np.sqrt(2.0)
    labels = rng.integers(0, n_classes, n_samples)
    x = centres[labels] + rng.standard_normal((n_samples, n_features))
    y = np.eye(n_classes)[labels]
    return split(x, y, val_fraction, seed, task="multiclass", source="data=classification")
