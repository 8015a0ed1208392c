"""Datasets as in-memory arrays split into train and validation.

Everything here fits in memory, so the loop keeps it on the device as tensors and gathers batches by
index (see loop.py): no tf.data pipeline in the hot path. Arrays are float32 and 2-D: [n, features]
and [n, targets].
"""

from __future__ import annotations

import csv as _csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.config import TrainerError


@dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    task: str = "regression"  # regression | binary | multiclass: which validation metrics make sense

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_targets(self) -> int:
        return self.y_train.shape[1]


def split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int, task: str = "regression") -> Dataset:
    """Shuffle once with `seed`, then hold out the first `val_fraction` of examples for validation."""
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    n_val = round(len(x) * val_fraction)
    if n_val == 0:
        return Dataset(x, y, None, None, task)
    if n_val >= len(x):
        raise TrainerError(f"data.val_fraction={val_fraction} leaves no training examples out of {len(x)}")
    order = np.random.default_rng(seed).permutation(len(x))
    val, train = order[:n_val], order[n_val:]
    return Dataset(x[train], y[train], x[val], y[val], task)


def tape_example(x: float = 2.0, y: float = 3.0, val_fraction: float = 0.0, seed: int = 0) -> Dataset:
    """The one example of TensorFlow's GradientTape introduction."""
    return split(np.array([[x]]), np.array([[y]]), val_fraction, seed)


def regression(
    n_samples: int = 4096,
    n_features: int = 8,
    n_targets: int = 1,
    noise: float = 0.1,
    kind: str = "linear",
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """y = x @ W + b (+ a smooth nonlinearity for kind=nonlinear) + Gaussian noise; x ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_samples, n_features))
    w = rng.standard_normal((n_features, n_targets)) / np.sqrt(n_features)
    y = x @ w + rng.standard_normal(n_targets) * 0.5
    if kind == "nonlinear":
        y = np.sin(2.0 * y) + 0.5 * np.square(x[:, :1] @ np.ones((1, n_targets)))
    y = y + noise * rng.standard_normal(y.shape)
    return split(x, y, val_fraction, seed)


def classification(
    n_samples: int = 4096,
    n_features: int = 8,
    n_classes: int = 3,
    separation: float = 2.0,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Gaussian blobs around random class centres `separation` apart on average; one-hot targets."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, n_features)) * separation / np.sqrt(2.0)
    labels = rng.integers(0, n_classes, n_samples)
    x = centres[labels] + rng.standard_normal((n_samples, n_features))
    y = np.eye(n_classes)[labels]
    return split(x, y, val_fraction, seed, task="multiclass")


def csv(
    path: str,
    target: list[str],
    features: list[str] | None = None,
    one_hot: bool = False,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """A header-first CSV of numbers; errors name the file and the column at fault."""
    rows, header = _read_csv(Path(path))
    target = [target] if isinstance(target, str) else list(target)
    missing = [c for c in [*target, *(features or [])] if c not in header]
    if missing:
        raise TrainerError(f"{path}: no column {missing[0]!r}; columns are {', '.join(header)}")
    features = list(features) if features else [c for c in header if c not in target]
    if not features:
        raise TrainerError(f"{path}: no feature columns left once the target {target} is taken out")
    values = {c: _numeric_column(path, c, [r[header.index(c)] for r in rows]) for c in [*features, *target]}
    x = np.stack([values[c] for c in features], axis=1)
    y = np.stack([values[c] for c in target], axis=1)
    task = "regression"
    if one_hot:
        if len(target) != 1 or not np.all(y == np.round(y)) or y.min() < 0:
            raise TrainerError(f"data.one_hot=true needs one target column of class ids 0..k-1 in {path}")
        y, task = np.eye(int(y.max()) + 1)[y[:, 0].astype(int)], "multiclass"
    return split(x, y, val_fraction, seed, task)


def _read_csv(path: Path) -> tuple[list[list[str]], list[str]]:
    if not path.is_file():
        raise TrainerError(f"data.path={str(path)!r}: no such file (working directory: {Path.cwd()})")
    with path.open(newline="") as f:
        table = [row for row in _csv.reader(f) if row]
    if len(table) < 2:
        raise TrainerError(f"data.path={str(path)!r}: the file is empty; expected a header row and data rows")
    header = [h.strip() for h in table[0]]
    bad = next((i for i, r in enumerate(table[1:], start=2) if len(r) != len(header)), None)
    if bad is not None:
        raise TrainerError(f"{path}: line {bad} has {len(table[bad - 1])} fields, the header has {len(header)}")
    return table[1:], header


def _numeric_column(path: str, name: str, cells: list[str]) -> np.ndarray:
    try:
        return np.array([float(c) for c in cells], dtype=np.float64)
    except ValueError:
        bad = next(c for c in cells if not _is_float(c))
        raise TrainerError(f"{path}: column {name!r} is not numeric (found {bad!r})") from None


def _is_float(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True
