"""Synthetic data made from a seed: the GradientTape example, a regression and Gaussian class blobs."""

from __future__ import annotations

import numpy as np

from trainer.data.core import Dataset, split


def tape_example(x: float, y: float, val_fraction: float, seed: int, folds: int | None, fold: int) -> Dataset:
    """The one example of TensorFlow's GradientTape introduction."""
    return split(
        np.array([[x]]),
        np.array([[y]]),
        val_fraction,
        seed,
        source="data=tape_example",
        columns=["x", "y"],
        folds=folds,
        fold=fold,
    )


def regression(
    n_samples: int,
    n_features: int,
    n_targets: int,
    noise: float,
    kind: str,
    val_fraction: float,
    seed: int,
    folds: int | None,
    fold: int,
) -> Dataset:
    """y = x @ W + b (+ a smooth nonlinearity for kind=nonlinear) + Gaussian noise; x ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_samples, n_features))
    w = rng.standard_normal((n_features, n_targets)) / np.sqrt(n_features)
    y = x @ w + rng.standard_normal(n_targets) * 0.5
    if kind == "nonlinear":
        y = np.sin(2.0 * y) + 0.5 * np.square(x[:, :1] @ np.ones((1, n_targets)))
    y = y + noise * rng.standard_normal(y.shape)
    return split(x, y, val_fraction, seed, source="data=regression", folds=folds, fold=fold)


def classification(
    n_samples: int,
    n_features: int,
    n_classes: int,
    separation: float,
    val_fraction: float,
    seed: int,
    folds: int | None,
    fold: int,
) -> Dataset:
    """Gaussian blobs around random class centres `separation` apart on average; one-hot targets."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, n_features)) * separation / np.sqrt(2.0)
    labels = rng.integers(0, n_classes, n_samples)
    x = centres[labels] + rng.standard_normal((n_samples, n_features))
    y = np.eye(n_classes)[labels]
    return split(x, y, val_fraction, seed, task="multiclass", source="data=classification", folds=folds, fold=fold)


def ring(
    n_samples: int,
    modes: int,
    radius: float,
    std: float,
    val_fraction: float,
    seed: int,
    folds: int | None,
    fold: int,
) -> Dataset:
    """Points around `modes` Gaussians evenly spaced on a circle of `radius` (a GAN's target); y: the mode."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, modes, n_samples)
    angles = 2.0 * np.pi * labels / modes
    x = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1) + std * rng.standard_normal((n_samples, 2))
    return split(x, labels, val_fraction, seed, task="multiclass", source="data=ring", folds=folds, fold=fold)


def oscillator(n_samples: int, t_max: float, omega: float, u0: float, v0: float, val_fraction: float,
               seed: int, folds: int | None, fold: int) -> Dataset:  # fmt: skip
    """Times on [0, t_max] (x) and the harmonic oscillator's solution at them (y), for a physics-informed step."""
    t = np.random.default_rng(seed).uniform(0.0, t_max, (n_samples, 1))
    y = u0 * np.cos(omega * t) + v0 / omega * np.sin(omega * t)
    return split(t, y, val_fraction, seed, task="regression", source="data=oscillator", folds=folds, fold=fold)
