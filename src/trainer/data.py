"""Datasets as in-memory arrays split into train and validation.

Everything here fits in memory, so the loop keeps it on the device as tensors and gathers batches by
index (see loop.py): no tf.data pipeline in the hot path. Arrays are float32 and 2-D: [n, features]
and [n, targets]. Every source goes through `split`, which refuses values the float32 step cannot train on
(see `check_values`), naming the row and column, before anything is shuffled or trained.
"""

from __future__ import annotations

import csv as _csv
from collections.abc import Sequence
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


# The largest magnitude a value may have: sqrt(float32 max) = 1.84e19. A larger one squares to inf in
# float32, so a squared loss, or the gradient norms (sums of squares, see loop.py) of any weight it
# multiplies, are inf at the first step, and the run would stop blaming the learning rate. float32's own
# limit (3.4e38; 1e308 casts to inf) is above it, so this one bound also catches values the cast breaks.
MAX_ABS_VALUE = float(np.sqrt(np.finfo(np.float32).max))


def check_values(a: np.ndarray, source: str, columns: Sequence[str], lines: Sequence[int] | None = None) -> None:
    """Raise naming the first cell of `a` ([rows, columns]) that is NaN, infinite, or beyond MAX_ABS_VALUE.

    A NaN in a validation row otherwise gives a finite val/loss (the compiled evaluation predicted 0.0 for
    it), and one in a training row stops the run as if the learning rate were too high. One vectorised
    pass (|a| <= bound is false for NaN too); the Python search runs only when something is wrong.
    """
    a = np.asarray(a)
    bad = ~(np.abs(a) <= MAX_ABS_VALUE)
    if not bad.any():
        return
    row, col = (int(i) for i in np.argwhere(bad)[0])
    value = float(a[row, col])
    where = f"{source}: row {row + 1}{f' (line {lines[row]})' if lines else ''}, column {columns[col]!r}"
    if not np.isfinite(value):
        raise TrainerError(f"{where} is not finite ({value}); drop or fill such rows before training")
    raise TrainerError(
        f"{where} is {value:.3g}, beyond {MAX_ABS_VALUE:.3g} (its square overflows float32, so the loss or "
        "gradient norms would be inf); rescale the column"
    )


def _names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{j}" for j in range(n)]


def split(
    x: np.ndarray,
    y: np.ndarray,
    val_fraction: float,
    seed: int,
    task: str = "regression",
    source: str = "data",
    columns: Sequence[str] | None = None,
    lines: Sequence[int] | None = None,
) -> Dataset:
    """Check every value, shuffle once with `seed`, then hold out the first `val_fraction` for validation.

    `columns` names x's columns then y's (default x0.., y0..); `lines` the file line of each row, for errors.
    """
    x, y = np.asarray(x), np.asarray(y)
    columns = list(columns) if columns else [*_names("x", x.shape[1]), *_names("y", y.shape[1])]
    check_values(x, source, columns[: x.shape[1]], lines)
    check_values(y, source, columns[x.shape[1] :], lines)
    x, y = x.astype(np.float32), y.astype(np.float32)
    n_val = round(len(x) * val_fraction)
    if n_val == 0:
        return Dataset(x, y, None, None, task)
    if n_val >= len(x):
        raise TrainerError(f"data.val_fraction={val_fraction} leaves no training examples out of {len(x)}")
    order = np.random.default_rng(seed).permutation(len(x))
    val, train = order[:n_val], order[n_val:]
    return Dataset(x[train], y[train], x[val], y[val], task)


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


def csv(
    path: str, target: list[str], features: list[str] | None, one_hot: bool, val_fraction: float, seed: int
) -> Dataset:
    """A header-first CSV of numbers; errors name the file and the column at fault."""
    rows, header, lines = _read_csv(Path(path))
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
    task, source, columns = "regression", f"data.path={path!r}", [*features, *target]
    if one_hot:
        check_values(y, source, target, lines)  # before the class ids are read from it
        if len(target) != 1 or not np.all(y == np.round(y)) or y.min() < 0:
            raise TrainerError(f"data.one_hot=true needs one target column of class ids 0..k-1 in {path}")
        y, task = np.eye(int(y.max()) + 1)[y[:, 0].astype(int)], "multiclass"
        columns = [*features, *(f"{target[0]}={k}" for k in range(y.shape[1]))]
    return split(x, y, val_fraction, seed, task, source, columns, lines)


def _read_csv(path: Path) -> tuple[list[list[str]], list[str], list[int]]:
    """Data rows, the header, and each data row's line in the file (blank lines are skipped)."""
    if path.is_dir():
        found = ", ".join(sorted(p.name for p in path.glob("*.csv"))[:5]) or "none"
        raise TrainerError(f"data.path={str(path)!r} is a directory; expected a CSV file (CSV files in it: {found})")
    if not path.is_file():
        raise TrainerError(f"data.path={str(path)!r}: no such file (working directory: {Path.cwd()})")
    with path.open(newline="") as f:
        reader = _csv.reader(f)
        table = [(reader.line_num, row) for row in reader if row]
    if len(table) < 2:
        raise TrainerError(f"data.path={str(path)!r}: the file is empty; expected a header row and data rows")
    header = [h.strip() for h in table[0][1]]
    bad = next(((line, r) for line, r in table[1:] if len(r) != len(header)), None)
    if bad is not None:
        raise TrainerError(f"{path}: line {bad[0]} has {len(bad[1])} fields, the header has {len(header)}")
    return [r for _, r in table[1:]], header, [line for line, _ in table[1:]]


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
