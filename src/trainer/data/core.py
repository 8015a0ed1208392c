"""What every source hands the trainer: examples, then a split into training and validation.

A source returns `Examples` (rows in a fixed order, as arrays or as a `tf.data` reader), and `prepare.py`
splits them, decides whether they are held on the device or streamed, and fits the preprocessing on the
training split. The split is one rule for both paths: example i is a validation example when it is among the
first round(n * val_fraction) entries of a seeded permutation of range(n); both sides keep the file order,
so with shuffling off the first batch is the file's first training rows whatever the format or the path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import TrainerError

# The largest magnitude a value may have: sqrt(float32 max) = 1.84e19. A larger one squares to inf in
# float32, so a squared loss, or the gradient norms (sums of squares, see loop.py) of any weight it
# multiplies, are inf at the first step, and the run would stop blaming the learning rate. float32's own
# limit (3.4e38; 1e308 casts to inf) is above it, so this one bound also catches values the cast breaks.
MAX_ABS_VALUE = float(np.sqrt(np.finfo(np.float32).max))

TASKS = ("regression", "binary", "multiclass")


BLOCK = 4096  # rows a streamed source is read, split and shuffled in, and the batch of its statistics passes


def _derive(read: Callable[[], Any] | None, blocks: Callable[[], Any] | None) -> tuple[Callable, Callable] | None:
    """Both readers from the one a source gives: rows one at a time, or in blocks of any size (the same rows)."""
    if read is None and blocks is None:
        return None
    return read or (lambda: blocks().unbatch()), blocks or (lambda: read().batch(BLOCK))


@dataclass
class Stream:
    """One split, streamed, always in the same order: `read()` gives its examples (x, y) one at a time,
    `blocks()` the same rows in batches of any size. Give either; the training input takes blocks, because
    tf.data's per-row ops cost ~1 us a row each (measured: 1 GiB .npy, 807 us of CPU a batch of 256 with a
    per-row split, shuffle and batch; 95 us in blocks, `inputs.StreamInput.dataset`)."""

    read: Callable[[], Any] | None  # () -> tf.data.Dataset of rows
    count: int
    diagnose: Callable[[], Any] | None = None  # () -> the TrainerError naming a file it cannot read, or None
    blocks: Callable[[], Any] | None = None  # () -> tf.data.Dataset of (x, y) batches

    def __post_init__(self) -> None:
        self.read, self.blocks = _derive(self.read, self.blocks)

    def mapped(self, fn: Callable[[Any, Any], tuple[Any, Any]]) -> Stream:
        """The same rows through `fn(x, y)`, a function that takes a block of rows as it takes one row."""
        blocks = self.blocks
        return Stream(None, self.count, self.diagnose, blocks=lambda: blocks().map(fn))


@dataclass
class Examples:
    """One source's examples before the split, row i being example i in the source's own order.

    Give `arrays` (in memory, or memory-mapped: only the rows used are read) or `read` (a `tf.data.Dataset` of
    unbatched (x, y) pairs) or `blocks` (the same as batches of any size: a file read in chunks gives these,
    so no per-row op comes before the split); `count` is the number of examples (a reader that cannot know it
    cheaply counts).
    `labels` names the classes of integer class ids in y; `val` is an explicit validation set.
    """

    count: int
    x_shape: tuple[int, ...]  # per example
    y_shape: tuple[int, ...]
    x_dtype: str = "float32"
    y_dtype: str = "float32"
    arrays: tuple[np.ndarray, np.ndarray] | Callable[[], tuple[np.ndarray, np.ndarray]] | None = None  # or () -> them
    read: Callable[[], Any] | None = None
    source: str = "data"  # how errors name it: "data.path='houses.csv'"
    columns: Sequence[str] | None = None  # feature names then target names, for errors
    labels: Sequence[str] | None = None
    task: str | None = None  # None: inferred from the targets (prepare.infer_task)
    numeric: bool = True  # features that `data.normalize` may scale (tables); images rescale instead
    rescale: float | None = None  # a constant factor (1/255 for images), inside the logged model
    augment: dict[str, Any] | None = None  # image augmentation for the training split (files.augmentation_layers)
    table: bool = False  # read from a table file (csv, parquet): data.target_scale=auto standardizes its targets
    scaled: np.ndarray | None = None  # typed tables: per feature, whether data.normalize scales it (numbers only)
    schema: Any = None  # typed tables: the fitted columns.TableSchema the logged model applies to raw rows
    raw_example: Any = None  # typed tables: two raw rows (a pandas DataFrame), the logged model's input example
    weights: np.ndarray | None = None  # data.sample_weight: each row's weight in the loss (float32), rows as arrays
    val: Examples | None = None
    diagnose: Callable[[], Any] | None = None  # () -> a TrainerError naming the bad file, or None (after a read error)
    blocks: Callable[[], Any] | None = None  # or () -> a tf.data.Dataset of (x, y) batches of any size

    def __post_init__(self) -> None:
        derived = _derive(self.read, self.blocks)
        if derived is not None:
            self.read, self.blocks = derived

    @property
    def nbytes(self) -> int:
        per_example = np.prod(self.x_shape, dtype=np.int64) * np.dtype(self.x_dtype).itemsize
        return int(self.count * (per_example + np.prod(self.y_shape, dtype=np.int64) * np.dtype(self.y_dtype).itemsize))


@dataclass
class Dataset:
    """Training and validation data, ready for the loop: arrays held on the device, or streams.

    Arrays are the raw values (images as read, tables unscaled); `preprocess` is what the input side applies
    before the model and what the logged model carries in front of it (prepare.preprocessing).
    """

    x_train: np.ndarray | None
    y_train: np.ndarray | None
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    task: str = "regression"  # regression | binary | multiclass: which validation metrics make sense
    train: Stream | None = None  # streamed data: the training split
    val: Stream | None = None
    n_classes: int | None = None  # multiclass: the number of classes
    labels: list[str] | None = None  # class names, by class id (string labels in a table)
    preprocess: dict[str, Any] = field(default_factory=dict)  # mean/variance (or min/max), rescale
    class_weight: np.ndarray | None = None  # data.class_weight: each class id's weight in the loss (weights.py)
    target_scale: tuple[np.ndarray, np.ndarray] | None = None  # data.target_scale: (mean, std) (scaling.py)
    sample_weight: np.ndarray | None = None  # data.sample_weight: the training split's row weights (float32)
    schema: Any = None  # typed tables: the columns.TableSchema (Examples.schema)
    raw_example: Any = None  # typed tables: two raw rows, the logged model's input example
    feature_names: list[str] | None = None  # a table's feature columns, in training order (what predict selects)
    x_shape: tuple[int, ...] = ()
    y_shape: tuple[int, ...] = ()
    y_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.x_train is not None:
            self.x_shape = self.x_shape or tuple(self.x_train.shape[1:])
            self.y_shape = self.y_shape or tuple(self.y_train.shape[1:])
            self.y_dtype = str(self.y_train.dtype)
        if self.task == "multiclass" and self.n_classes is None and self.y_train is not None:
            self.n_classes = int(self.y_train.shape[1]) if self.one_hot else int(self.y_train.max()) + 1

    @property
    def streamed(self) -> bool:
        return self.x_train is None

    @property
    def one_hot(self) -> bool:
        """Multiclass targets given as one-hot rows (categorical_crossentropy) rather than class ids."""
        return self.task == "multiclass" and len(self.y_shape) == 1 and self.y_shape[0] > 1

    @property
    def n_train(self) -> int:
        return self.train.count if self.streamed else len(self.x_train)

    @property
    def has_val(self) -> bool:
        return self.val is not None if self.streamed else self.x_val is not None

    @property
    def n_features(self) -> int:
        return int(np.prod(self.x_shape))

    @property
    def n_targets(self) -> int:
        return int(np.prod(self.y_shape)) if self.y_shape else 1

    @property
    def n_outputs(self) -> int:
        """What a model's head must give: a logit per class, one logit for binary, a value per target."""
        if self.task == "multiclass":
            return self.n_classes
        return self.n_targets


def check_values(
    a: np.ndarray, source: str, columns: Sequence[str], lines: Sequence[int] | None = None, first_row: int = 0
) -> None:
    """Raise naming the first cell of `a` ([rows, columns]) that is NaN, infinite, or beyond MAX_ABS_VALUE.

    `a` may be one batch of a stream: `first_row` is its first row's index in the source, `lines[i]` the file
    line of its row i.

    A NaN in a validation row otherwise gives a finite val/loss (the compiled evaluation predicted 0.0 for
    it), and one in a training row stops the run as if the learning rate were too high. One vectorised
    pass (|a| <= bound is false for NaN too); the Python search runs only when something is wrong.
    """
    a = np.asarray(a)
    if a.dtype.kind in "iub":
        return
    flat = a.reshape(len(a), -1) if a.ndim != 2 else a
    bad = ~(np.abs(flat) <= MAX_ABS_VALUE)
    if not bad.any():
        return
    row, col = (int(i) for i in np.argwhere(bad)[0])
    value = float(flat[row, col])
    name = columns[col] if a.ndim == 2 and col < len(columns) else f"value {col}"
    where = f"{source}: row {first_row + row + 1}{place(lines, row)}, column {name!r}"
    if not np.isfinite(value):
        raise TrainerError(
            f"{where} is not finite ({value}); set data.missing=drop or mean, or fill such cells before training"
        )
    raise TrainerError(
        f"{where} is {value:.3g}, beyond {MAX_ABS_VALUE:.3g} (its square overflows float32, so the loss or "
        "gradient norms would be inf); rescale the column"
    )


def place(lines: Any, row: int) -> str:
    """Where row `row` of a batch is in its files: ` (line 12)` of a CSV, ` (part-6.parquet, its row 3)` of a
    glob of shards (a row number counted across the files says nothing of which one), or nothing."""
    if not lines:
        return ""
    at = lines[row]
    return f" (line {at})" if isinstance(at, int) else f" ({at})"


def regular_files(paths: Sequence[str | Path], source: str) -> list[str]:
    """`paths`, each a regular file; a FIFO, socket or device among them is one line naming it, before anything
    opens it (a FIFO blocks its reader forever: the loading hung with no output). `os.stat` never blocks."""
    import os
    import stat

    kinds = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISDIR: "a directory"}  # fmt: skip
    for path in paths:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue  # missing: the caller's own "no such file" says so
        kind = next((name for test, name in kinds.items() if test(mode)), None)
        if kind is not None:
            raise TrainerError(f"{source}: {path} is {kind}, not a regular file; point the setting at data files")
    return [str(p) for p in paths]


def check_numbers(x: np.ndarray, y: np.ndarray, where: str) -> None:
    """x and y of numbers: text reached the value check as a numpy ufunc traceback ("ufunc 'absolute' did not
    contain a loop with signature matching types StrDType")."""
    for a, what in ((x, "x"), (y, "y")):
        if a.dtype.kind not in "biuf":
            raise TrainerError(f"{where} {what} of dtype {a.dtype}; x and y must be numbers (class names: map them "
                               "to ids 0..k-1, or write a CSV and use data=csv, which does)")  # fmt: skip


def _names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{j}" for j in range(n)]


def val_mask(n: int, val_fraction: float, seed: int, folds: int | None = None, fold: int = 0) -> np.ndarray:
    """True for the validation examples: the first round(n * val_fraction) of a seeded permutation; with `folds`,
    part `fold` of that permutation cut into `folds` near-equal parts (np.array_split), so the K folds' validation
    rows are disjoint and every row is validated exactly once across them."""
    if folds:
        if n < folds:
            raise TrainerError(f"data.folds={folds} needs at least {folds} examples; there are {n}")
        mask = np.zeros(n, dtype=bool)
        mask[np.array_split(np.random.default_rng(seed).permutation(n), folds)[fold]] = True
        return mask
    n_val = round(n * val_fraction)
    if n_val and n_val >= n:
        raise TrainerError(f"data.val_fraction={val_fraction} leaves no training examples out of {n}")
    mask = np.zeros(n, dtype=bool)
    # int32 indices where they fit: the same permutation (numpy shuffles alike whatever the dtype) at half the
    # memory, 4 bytes a row, the largest share of a streamed split's heap (scripts/bench --stream)
    rows = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    mask[np.random.default_rng(seed).permutation(rows)[:n_val]] = True
    return mask


def split(
    x: np.ndarray,
    y: np.ndarray,
    val_fraction: float,
    seed: int,
    task: str = "regression",
    source: str = "data",
    columns: Sequence[str] | None = None,
    lines: Sequence[int] | None = None,
    folds: int | None = None,
    fold: int = 0,
) -> Dataset:
    """Check every value, then hold out the `val_fraction` of rows `val_mask` picks; both sides keep file order.

    `columns` names x's columns then y's (default x0.., y0..); `lines` the file line of each row, for errors.
    Float targets become float32; integer class ids stay integers.
    """
    x, y = np.asarray(x), np.asarray(y)
    n_x = int(np.prod(x.shape[1:]))
    columns = list(columns) if columns else [*_names("x", n_x), *_names("y", int(np.prod(y.shape[1:])))]
    check_values(x, source, columns[:n_x], lines)
    check_values(y, source, columns[n_x:], lines)
    x = x.astype(np.float32) if x.dtype.kind == "f" or (x.dtype.kind in "iub" and x.ndim == 2) else x
    y = y if y.dtype.kind in "iu" and task == "multiclass" else y.astype(np.float32)
    mask = val_mask(len(x), val_fraction, seed, folds, fold)
    if not mask.any():
        return Dataset(x, y, None, None, task)
    return Dataset(x[~mask], y[~mask], x[mask], y[mask], task)
