"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Each YAML option under `conf/<group>/` starts from one of these schemas (its defaults list names
`/schema/<group>/<name>`), so Hydra itself rejects unknown keys and wrong types while composing,
before TensorFlow is imported. Range checks that a type cannot express live in `__post_init__`
and run in `check()`, still before any TensorFlow work.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class TrainerError(Exception):
    """A problem the user can fix (config, data, numerics): shown as one line, never a traceback."""


def first_line(error: BaseException | None) -> str:
    """An error as the one line a user sees: its message's first line, else its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def causes(error: BaseException | None) -> Iterator[BaseException]:
    """`error` and what it wraps (__cause__, else __context__), outermost first. A chain can loop (a raise
    from a wrapper of itself, as Hydra's instantiate errors did): each error comes once."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def close_names(name: str, names: Iterable[str]) -> str:
    """`did you mean A, B?` for a mistyped name (case-insensitive difflib matches), else every name there is."""
    import difflib

    lower = {n.lower(): n for n in names}
    close = [lower[n] for n in difflib.get_close_matches(name.lower(), list(lower), n=5, cutoff=0.6)]
    return f"did you mean {', '.join(close)}?" if close else f"one of {', '.join(sorted(lower.values()))}"


def _require(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise TrainerError(f"{key}={value!r} is invalid: expected {valid}")


# --- model -------------------------------------------------------------------------------------
# Every value lives in the YAML option (conf/<group>/<name>.yaml) a user reads and overrides; the schemas
# below hold only types and ranges, each field MISSING, so a value stated twice cannot drift apart
# (tests/test_defaults.py). `_partial_` is no setting: it is how the trainer calls the object.
def _check_units(units: int | None) -> None:
    _require(units is None or units >= 1, "model.units", units, "null (from the data) or an integer >= 1")


@dataclass
class LinearModel:
    _target_: str = MISSING
    units: int | None = MISSING  # None: from the data (classes, 1 for binary, targets)
    w_init: float | None = MISSING  # None: Glorot uniform; a number: every weight starts there
    b_init: float = MISSING

    def __post_init__(self) -> None:
        _check_units(self.units)


NO_HIDDEN_LAYER = "at least one hidden layer; for none use model=linear"  # MLP([]) would be a linear model


@dataclass
class MLPModel:
    _target_: str = MISSING
    freeze: list[str] | None = MISSING  # layers kept as they are (finetune.py): names, patterns, backbone
    hidden: list[int] = MISSING
    units: int | None = MISSING  # None: from the data
    activation: str = MISSING
    dropout: float = MISSING

    def __post_init__(self) -> None:
        _require(len(self.hidden) >= 1, "model.hidden", list(self.hidden), NO_HIDDEN_LAYER)
        _require(all(h >= 1 for h in self.hidden), "model.hidden", list(self.hidden), "widths >= 1")
        _check_units(self.units)
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a value in [0, 1)")


@dataclass
class CNNModel:
    _target_: str = MISSING
    freeze: list[str] | None = MISSING  # layers kept as they are (finetune.py): names, patterns, backbone
    filters: list[int] = MISSING  # one conv block per entry: its number of filters
    kernel_size: int = MISSING
    pool: int | None = MISSING  # max-pool size after each block; None: no pooling
    batch_norm: bool = MISSING
    dropout: float = MISSING  # after each block and each hidden dense layer; 0: none
    hidden: list[int] = MISSING  # dense layers between the blocks and the head; []: none
    activation: str = MISSING
    units: int | None = MISSING  # outputs; None: from the data (classes, 1 for binary, targets)

    def __post_init__(self) -> None:
        ok = len(self.filters) >= 1 and all(f >= 1 for f in self.filters)
        _require(ok, "model.filters", list(self.filters), "at least one block, each with >= 1 filters")
        _require(self.kernel_size >= 1, "model.kernel_size", self.kernel_size, "an integer >= 1")
        _require(self.pool is None or self.pool >= 1, "model.pool", self.pool, "null (no pooling) or an integer >= 1")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a value in [0, 1)")
        _require(all(h >= 1 for h in self.hidden), "model.hidden", list(self.hidden), "widths >= 1")
        _check_units(self.units)


@dataclass
class SequentialModel:
    _target_: str = MISSING
    freeze: list[str] | None = MISSING  # layers kept as they are (finetune.py): names, patterns, backbone
    _recursive_: bool = MISSING  # false: the model builds its layers itself, so an error names model.layers[i]
    layers: list[Any] = MISSING  # Keras layers in order, each {_target_: keras.layers.Conv2D, filters: 32, ...}
    units: int | None = MISSING  # outputs of the dense head after them; None: from the data

    def __post_init__(self) -> None:
        for i, layer in enumerate(self.layers):
            ok = isinstance(layer, dict) and isinstance(layer.get("_target_"), str)
            _require(ok, f"model.layers[{i}]", layer, "a layer such as {_target_: keras.layers.Dense, units: 64}")
        _check_units(self.units)


@dataclass
class KerasAppModel:
    _target_: str = MISSING
    freeze: list[str] | None = MISSING  # layers kept as they are (finetune.py): names, patterns, backbone
    name: str = MISSING  # a keras.applications model: MobileNetV3Small, ResNet50, EfficientNetB0, ...
    weights: str | None = MISSING  # None: random (no download); imagenet: pretrained (needs the network)
    pooling: str = MISSING  # avg | max: the backbone's feature map to one vector per example
    units: int | None = MISSING  # outputs of the dense head; None: from the data
    input_shape: list[int] | None = MISSING  # [H, W, C] of one example; None: from the data

    def __post_init__(self) -> None:
        _require(self.pooling in ("avg", "max"), "model.pooling", self.pooling, "avg | max")
        shape = self.input_shape
        ok = shape is None or (len(shape) in (2, 3) and all(d >= 1 for d in shape))
        _require(ok, "model.input_shape", None if shape is None else list(shape), "null (from the data) or [H, W, C]")
        _check_units(self.units)


# --- loss --------------------------------------------------------------------------------------
@dataclass
class Loss:
    _target_: str = MISSING
    _partial_: bool = True  # the loop calls loss(y_true, y_pred); the option's keys are bound at build time


@dataclass
class HuberLoss(Loss):
    delta: float = MISSING

    def __post_init__(self) -> None:
        _require(self.delta > 0, "loss.delta", self.delta, "a positive number")


@dataclass
class CrossEntropyLoss(Loss):
    from_logits: bool = MISSING


@dataclass
class KerasLoss(Loss):
    _partial_: bool = False  # keras_loss returns the keras.losses object, itself the (y_true, y_pred) callable
    name: str = MISSING  # a keras.losses class or function name: Huber, huber, MeanSquaredError, mse, ...
    settings: dict[str, Any] = MISSING  # its keyword arguments, e.g. {delta: 2.0}


# --- data --------------------------------------------------------------------------------------
@dataclass
class Data:
    """Settings every data option shares (values: conf/data_defaults.yaml); trainer/data/prepare.py reads them."""

    _target_: str = MISSING
    val_fraction: float = MISSING
    seed: int = MISSING
    folds: int | None = MISSING  # K-fold cross-validation: validate on part `fold` of K (core.val_mask)
    fold: int = MISSING
    task: str = MISSING  # auto | regression | binary | multiclass: auto infers it (data/prepare.infer_task)
    normalize: str = MISSING  # standard | minmax | none: numeric features, training-split statistics
    in_memory: str = MISSING  # auto | true | false: held on the device, or streamed with tf.data
    memory_limit_mb: float = MISSING  # auto: data up to this size is held in memory
    shuffle: bool = MISSING  # false: the file's order, every epoch
    shuffle_buffer: int = MISSING  # streamed data: rows shuffled together, a window at a time (inputs.shuffled)
    cache: str | None = MISSING  # streamed data: None | memory | a file path prefix (tf.data.Dataset.cache)
    class_weight: Any = MISSING  # None | balanced | {label: weight}: each class's weight in the loss (data/weights.py)
    target_scale: str = MISSING  # auto | standard | none: regression targets standardized for the loss (scaling.py)

    def __post_init__(self) -> None:
        check_data_settings(self)


def check_data_settings(d: Any) -> None:
    """The shared data settings' ranges: for the built-in options (schemas) and your own (prepare.py)."""
    _require(0.0 <= d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "a value in [0, 1)")
    _require(d.folds is None or d.folds >= 2, "data.folds", d.folds, "null or an integer >= 2")
    _require(d.folds is None or 0 <= d.fold < d.folds, "data.fold", d.fold, f"an integer in [0, data.folds={d.folds})")
    _require(d.normalize in NORMALIZE, "data.normalize", d.normalize, " | ".join(NORMALIZE))
    _require(d.task in DATA_TASKS, "data.task", d.task, " | ".join(DATA_TASKS))
    _require(str(d.in_memory).lower() in IN_MEMORY, "data.in_memory", d.in_memory, " | ".join(IN_MEMORY))
    _require(d.memory_limit_mb > 0, "data.memory_limit_mb", d.memory_limit_mb, "a positive number")
    _require(d.shuffle_buffer >= 1, "data.shuffle_buffer", d.shuffle_buffer, "an integer >= 1")


NORMALIZE = ("standard", "minmax", "none")
DATA_TASKS = ("auto", "regression", "binary", "multiclass")
IN_MEMORY = ("auto", "true", "false")


@dataclass
class TapeExampleData(Data):
    x: float = MISSING
    y: float = MISSING


@dataclass
class RegressionData(Data):
    n_samples: int = MISSING
    n_features: int = MISSING
    n_targets: int = MISSING
    noise: float = MISSING
    kind: str = MISSING  # linear | nonlinear

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.n_samples >= 2, "data.n_samples", self.n_samples, "an integer >= 2")
        _require(self.n_features >= 1, "data.n_features", self.n_features, "an integer >= 1")
        _require(self.n_targets >= 1, "data.n_targets", self.n_targets, "an integer >= 1")
        _require(self.noise >= 0, "data.noise", self.noise, "a number >= 0")
        _require(self.kind in ("linear", "nonlinear"), "data.kind", self.kind, "'linear' or 'nonlinear'")


@dataclass
class ClassificationData(Data):
    n_samples: int = MISSING
    n_features: int = MISSING
    n_classes: int = MISSING
    separation: float = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.n_samples >= 2, "data.n_samples", self.n_samples, "an integer >= 2")
        _require(self.n_features >= 1, "data.n_features", self.n_features, "an integer >= 1")
        _require(self.n_classes >= 2, "data.n_classes", self.n_classes, "an integer >= 2")


@dataclass
class RingData(Data):
    n_samples: int = MISSING
    modes: int = MISSING
    radius: float = MISSING
    std: float = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.n_samples >= 2, "data.n_samples", self.n_samples, "an integer >= 2")
        _require(self.modes >= 1, "data.modes", self.modes, "an integer >= 1")
        _require(self.radius > 0, "data.radius", self.radius, "a number > 0")
        _require(self.std >= 0, "data.std", self.std, "a number >= 0")


@dataclass
class OscillatorData(Data):
    n_samples: int = MISSING
    t_max: float = MISSING
    omega: float = MISSING
    u0: float = MISSING
    v0: float = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.n_samples >= 2, "data.n_samples", self.n_samples, "an integer >= 2")
        _require(self.t_max > 0, "data.t_max", self.t_max, "a number > 0")
        _require(self.omega > 0, "data.omega", self.omega, "a number > 0")


MISSING_CELLS = ("auto", "drop", "mean", "error")  # tables: what an empty or non-finite cell does


@dataclass
class CsvData(Data):
    path: str = MISSING
    target: Any = MISSING  # a column name, or a list of them
    features: list[str] | None = MISSING  # None: every column that is not a target
    missing: str = MISSING  # auto | drop | mean | error: empty or non-finite cells (data/columns.py)
    one_hot: bool = MISSING  # one class column (ids or names) -> one-hot targets for categorical_crossentropy
    columns: Any = MISSING  # None | {name: numeric | categorical | text | ignore} (data/columns.py)
    schema: str | None = MISSING  # None | a run's table_schema.json, fitted types to read the file with
    sample_weight: str | None = MISSING  # None | a column of per-row weights in the loss (not a feature)

    def __post_init__(self) -> None:
        super().__post_init__()
        names = [self.target] if isinstance(self.target, str) else self.target
        ok = isinstance(names, list | tuple) and len(names) >= 1 and all(isinstance(t, str) for t in names)
        _require(ok, "data.target", self.target, "a column name or a list of them")
        _require(self.missing in MISSING_CELLS, "data.missing", self.missing, " | ".join(MISSING_CELLS))


@dataclass
class ParquetData(CsvData):
    """One file, a directory of *.parquet files or a glob; columns chosen as for CSV."""


@dataclass
class TFRecordData(Data):
    path: Any = MISSING  # a file, a glob, or a list of them
    features: Any = MISSING  # a mapping, name: {shape: [...], dtype: uint8 | int64 | float32, encoding: raw | image}
    inputs: Any = MISSING  # a feature name, or a list of them (concatenated)
    target: str = MISSING
    compression: str = MISSING  # auto | none | GZIP | ZLIB
    rescale: float | None = MISSING  # a constant factor for x (1/255 for uint8 pixels), inside the logged model

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.compression in TFRECORD_COMPRESSION, "data.compression", self.compression,
                 " | ".join(TFRECORD_COMPRESSION))  # fmt: skip


TFRECORD_COMPRESSION = ("auto", "none", "GZIP", "ZLIB")
COLOR_MODES = {"grayscale": 1, "rgb": 3, "rgba": 4}  # image_folder: channels per color mode
FLIPS = ("horizontal", "vertical", "horizontal_and_vertical")  # keras.layers.RandomFlip's modes
AUGMENTATIONS = ("flip", "rotation", "zoom", "crop")


@dataclass
class ImageFolderData(Data):
    path: str = MISSING
    image_size: list[int] | None = MISSING  # [height, width]; None: every image must have the same size
    color_mode: str = MISSING  # grayscale | rgb | rgba
    rescale: float | None = MISSING
    augment: Any = MISSING  # None, or a mapping (training split only): flip, rotation, zoom, crop

    def __post_init__(self) -> None:
        super().__post_init__()
        size = self.image_size
        ok = size is None or (len(size) == 2 and all(s >= 1 for s in size))
        _require(ok, "data.image_size", size, "null or [height, width] of positive integers")
        _require(self.color_mode in COLOR_MODES, "data.color_mode", self.color_mode, " | ".join(COLOR_MODES))
        check_augment(self.augment)


def check_augment(augment: dict[str, Any] | None) -> None:
    """data.augment's keys and values, before TensorFlow starts (files.augmentation_layers builds them)."""
    _require(augment is None or isinstance(augment, Mapping), "data.augment", augment, "null or a mapping")
    for key, value in (augment or {}).items():
        _require(key in AUGMENTATIONS, f"data.augment.{key}", value, f"a key of {' | '.join(AUGMENTATIONS)}")
        if key == "flip":
            _require(value in FLIPS, "data.augment.flip", value, " | ".join(FLIPS))
        elif key == "crop":
            ok = isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) and v >= 1 for v in value)
            _require(ok, "data.augment.crop", value, "[height, width] of positive integers")
        else:
            ok = isinstance(value, int | float) and 0 < value < 1
            _require(ok, f"data.augment.{key}", value, "a fraction in (0, 1)")


@dataclass
class NumpyData(Data):
    path: str = MISSING  # an .npz file holding x and y, or the .npy file of x (memory-mapped)
    y: str | None = MISSING  # the .npy file of y, when path is an .npy file
    x_key: str = MISSING  # the .npz keys
    y_key: str = MISSING
    rescale: float | None = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        npz = self.path.lower().endswith(".npz")
        _require(npz == (self.y is None), "data.y", self.y, "null with an .npz data.path, else the .npy file of y")


# --- optimizer and schedule --------------------------------------------------------------------
@dataclass
class Optimizer:
    _target_: str = MISSING
    _partial_: bool = True  # the learning rate (or its schedule) is handed over by the trainer
    # a number or `auto`: the LR finder's suggestion (trainer/lr_find.py). Any, checked below: OmegaConf's
    # `float | str` refuses an int (optimizer.lr=100 "is incompatible with type hint Union[float, str]")
    lr: Any = MISSING
    weight_decay: float | None = MISSING
    use_ema: bool = MISSING  # a moving average of the weights, which the final evaluation and the model use
    ema_momentum: float = MISSING

    def __post_init__(self) -> None:
        number = isinstance(self.lr, int | float) and not isinstance(self.lr, bool)
        ok = self.lr == "auto" or (number and math.isfinite(self.lr) and self.lr > 0)
        _require(ok, "optimizer.lr", self.lr, "a positive number, or auto (the LR finder's suggestion)")
        _require(0.0 <= self.ema_momentum < 1.0, "optimizer.ema_momentum", self.ema_momentum, "a value in [0, 1)")


@dataclass
class SGDOptimizer(Optimizer):
    momentum: float = MISSING
    nesterov: bool = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0.0 <= self.momentum < 1.0, "optimizer.momentum", self.momentum, "a value in [0, 1)")


@dataclass
class AdamOptimizer(Optimizer):
    beta_1: float = MISSING
    beta_2: float = MISSING
    epsilon: float = MISSING
    amsgrad: bool = MISSING
    fused: bool | None = MISSING  # None or true: the fused update (trainer.optim); false: Keras' per-variable one


@dataclass
class AdamWOptimizer(AdamOptimizer):
    pass


@dataclass
class RMSpropOptimizer(Optimizer):
    rho: float = MISSING
    momentum: float = MISSING
    epsilon: float = MISSING
    centered: bool = MISSING


@dataclass
class Schedule:
    """How the learning rate moves with the step; `name` picks the pure function in `optim.py`.

    Each option states every key; the keys its schedule does not read are null (SCHEDULE_KEYS_USED_BY).
    """

    name: str = MISSING  # constant | cosine | exponential | warmup_cosine
    warmup_steps: int | None = MISSING
    decay_steps: int | None = MISSING  # None: the run's total steps (less the warm-up)
    decay_rate: float | None = MISSING  # exponential: lr * decay_rate ** (step / decay_steps)
    final_lr_fraction: float | None = MISSING  # cosine: the lr it ends at, as a fraction of optimizer.lr

    def __post_init__(self) -> None:
        names = ("constant", "cosine", "exponential", "warmup_cosine")
        _require(self.name in names, "schedule.name", self.name, " | ".join(names))
        for key, users in SCHEDULE_KEYS_USED_BY.items():
            value = getattr(self, key)
            if value is not None and self.name not in users:
                raise TrainerError(
                    f"schedule.{key}={value!r} has no effect with schedule={self.name} (it is read by "
                    f"{' | '.join(users)}); drop it or pick schedule={users[0]}"
                )
        read = {key for key, users in SCHEDULE_KEYS_USED_BY.items() if self.name in users}
        if "warmup_steps" in read:
            ok = self.warmup_steps is not None and self.warmup_steps >= 0
            _require(ok, "schedule.warmup_steps", self.warmup_steps, "an integer >= 0")
        ok = self.decay_steps is None or self.decay_steps >= 1
        _require(ok, "schedule.decay_steps", self.decay_steps, "null or an integer >= 1")
        if "decay_rate" in read:
            ok = self.decay_rate is not None and 0 < self.decay_rate <= 1
            _require(ok, "schedule.decay_rate", self.decay_rate, "a value in (0, 1]")
        if "final_lr_fraction" in read:
            ok = self.final_lr_fraction is not None and 0.0 <= self.final_lr_fraction <= 1.0
            _require(ok, "schedule.final_lr_fraction", self.final_lr_fraction, "a value in [0, 1]")


# Which schedules read each key: set (not null) for any other, it would be silently ignored
# (cosine ignored warmup_steps but still shortened its decay by it, so its lr was 0 from step 1).
SCHEDULE_KEYS_USED_BY: dict[str, tuple[str, ...]] = {
    "warmup_steps": ("warmup_cosine",),
    "decay_steps": ("cosine", "exponential", "warmup_cosine"),
    "decay_rate": ("exponential",),
    "final_lr_fraction": ("cosine", "warmup_cosine"),
}


@dataclass
class LRFinder:
    """The LR range test's settings (trainer/lr_find.py): lr_find=true runs it, optimizer.lr=auto before training."""

    min_lr: float = MISSING  # the first step's learning rate
    max_lr: float = MISSING  # the last step's: the rate rises exponentially between the two
    steps: int = MISSING
    divergence: float = MISSING  # stop once the smoothed loss exceeds this times its best so far

    def __post_init__(self) -> None:
        _require(self.min_lr > 0, "lr_finder.min_lr", self.min_lr, "a positive number")
        ok = self.max_lr > self.min_lr
        _require(ok, "lr_finder.max_lr", self.max_lr, f"a number above lr_finder.min_lr={self.min_lr}")
        _require(self.steps >= 20, "lr_finder.steps", self.steps, "an integer >= 20")
        _require(self.divergence > 1, "lr_finder.divergence", self.divergence, "a number > 1, e.g. 4")


# --- trainer and tracking ----------------------------------------------------------------------
@dataclass
class EarlyStopping:
    patience: int | None = MISSING  # evaluations without improvement before stopping; None: off
    monitor: str = MISSING  # a val/ metric; accuracy-like names are maximised, the rest minimised
    min_delta: float = MISSING  # an improvement smaller than this does not count
    restore_best: bool = MISSING  # end with the weights of the best evaluation

    def __post_init__(self) -> None:
        ok = self.patience is None or self.patience >= 1
        _require(ok, "trainer.early_stopping.patience", self.patience, "null (off) or an integer >= 1")
        _require(self.min_delta >= 0, "trainer.early_stopping.min_delta", self.min_delta, "a number >= 0")
        ok = self.monitor.startswith("val/")
        _require(ok, "trainer.early_stopping.monitor", self.monitor, "a validation metric such as val/loss")


@dataclass
class Unfreeze:
    at_step: int | None = MISSING  # the step the second phase begins at (a chunk ends there); None: no second phase
    layers: list[str] | None = MISSING  # names or patterns to unfreeze; None: every layer model.freeze froze
    lr_multiplier: float = MISSING  # the new optimizer's learning rate: optimizer.lr (and its schedule) times this

    def __post_init__(self) -> None:
        ok = self.at_step is None or self.at_step >= 1
        _require(ok, "trainer.unfreeze.at_step", self.at_step, "null (off) or an integer >= 1")
        _require(self.lr_multiplier > 0, "trainer.unfreeze.lr_multiplier", self.lr_multiplier, "a number > 0")


@dataclass
class TrainerSettings:
    max_steps: int = MISSING
    epochs: int | None = MISSING  # when set, wins over max_steps: epochs * (train examples // batch_size)
    batch_size: int = MISSING
    steps_per_loop: int | None = MISSING  # steps per compiled call; None: chosen from the run (see loop.py)
    eval_every: int | None = MISSING  # None: only at the end
    clip_norm: float | None = MISSING  # clip gradients to this global norm
    seed: int = MISSING
    init_from: str | None = MISSING  # a run id, run directory or models:/name/version: its weights, then train anew
    unfreeze: Unfreeze = MISSING  # a second phase within the run: layers unfrozen, a new optimizer
    jit: bool = MISSING  # XLA-compile the step; measure it per job, it is slower on most CPUs
    device: str = MISSING  # auto | cpu | gpu | a TF device string such as /GPU:1
    print_gradients: bool = MISSING  # print each variable's gradient at the first step (a host sync, once)
    progress: bool = MISSING
    checkpoint_every: int | None = MISSING  # None: at the end (and on Ctrl-C / SIGTERM) only
    max_to_keep: int = MISSING
    deterministic: bool = MISSING  # op determinism: a resumed run ends bitwise equal to an uninterrupted one
    on_nonfinite: str = MISSING  # stop: fail at the first NaN/Inf; skip_step: leave the weights, count it
    max_skipped_fraction: float = MISSING  # skip_step: fail once more than this fraction of the run's steps is skipped
    early_stopping: EarlyStopping = MISSING
    val_metrics: list[str] | None = MISSING  # None: accuracy for classification data (metrics.default_metrics)
    accumulate_steps: int = MISSING  # micro-batches of batch_size whose mean gradient makes one update
    precision: str = MISSING  # float32 | mixed_float16 (with loss scaling) | mixed_bfloat16
    strategy: str = MISSING  # auto | default | mirrored | multi_worker (tf.distribute)
    cluster_timeout: float | None = MISSING  # multi_worker: seconds to wait for every worker; None: no limit
    slurm_port: int | None = MISSING  # multi_worker under srun: the first worker port on each node; None: 8888
    logical_cpus: int | None = MISSING  # split the CPU into this many devices (try mirrored without GPUs)
    intra_op_threads: int | None = MISSING  # threads inside one op (a matmul); None: TensorFlow's default
    inter_op_threads: int | None = MISSING  # ops run side by side; None: TensorFlow's default
    callbacks: list[Any] = MISSING  # your own actions between chunks: nodes with a _target_ (trainer.callbacks)
    profile: list[int] | None = MISSING  # [START, STOP]: a tf.profiler trace of those steps (trainer/profile.py)

    def __post_init__(self) -> None:
        _require(self.max_steps >= 1, "trainer.max_steps", self.max_steps, "an integer >= 1")
        _require(self.epochs is None or self.epochs >= 1, "trainer.epochs", self.epochs, "null or >= 1")
        _require(self.batch_size >= 1, "trainer.batch_size", self.batch_size, "an integer >= 1")
        ok = self.steps_per_loop is None or self.steps_per_loop >= 1
        _require(ok, "trainer.steps_per_loop", self.steps_per_loop, "null (auto) or an integer >= 1")
        ok = self.eval_every is None or self.eval_every >= 1
        _require(ok, "trainer.eval_every", self.eval_every, "null or an integer >= 1")
        ok = self.clip_norm is None or self.clip_norm > 0
        _require(ok, "trainer.clip_norm", self.clip_norm, "null or a positive number")
        ok = self.checkpoint_every is None or self.checkpoint_every >= 1
        _require(ok, "trainer.checkpoint_every", self.checkpoint_every, "null or an integer >= 1")
        _require(self.max_to_keep >= 1, "trainer.max_to_keep", self.max_to_keep, "an integer >= 1")
        _require(self.accumulate_steps >= 1, "trainer.accumulate_steps", self.accumulate_steps, "an integer >= 1")
        strategies = ("auto", "default", "mirrored", "multi_worker")
        _require(self.strategy in strategies, "trainer.strategy", self.strategy, " | ".join(strategies))
        ok = self.cluster_timeout is None or self.cluster_timeout > 0
        _require(ok, "trainer.cluster_timeout", self.cluster_timeout, "a number of seconds > 0, or null (no limit)")
        port = self.slurm_port
        _require(port is None or 1 <= port <= 65535, "trainer.slurm_port", port, "a port in 1-65535, or null")
        ok = port is None or self.strategy == "multi_worker"
        _require(ok, "trainer.slurm_port", port, "null unless trainer.strategy=multi_worker (nothing else reads it)")
        ok = self.logical_cpus is None or self.logical_cpus >= 1
        _require(ok, "trainer.logical_cpus", self.logical_cpus, "null or an integer >= 1")
        for key in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, key)
            _require(value is None or value >= 1, f"trainer.{key}", value, "null or an integer >= 1")
        policies = ("float32", "mixed_float16", "mixed_bfloat16")
        _require(self.precision in policies, "trainer.precision", self.precision, " | ".join(policies))
        modes = ("stop", "skip_step")
        _require(self.on_nonfinite in modes, "trainer.on_nonfinite", self.on_nonfinite, " | ".join(modes))
        ok = 0.0 <= self.max_skipped_fraction <= 1.0
        _require(ok, "trainer.max_skipped_fraction", self.max_skipped_fraction, "a value in [0, 1]")
        ok = self.device in ("auto", "cpu", "gpu") or self.device.startswith("/")
        _require(ok, "trainer.device", self.device, "auto | cpu | gpu | a device string like /GPU:0")
        p = self.profile
        ok = p is None or (len(p) == 2 and 0 <= p[0] < p[1])
        _require(ok, "trainer.profile", p, "null or [START,STOP] with 0 <= START < STOP, e.g. [10,20]")


@dataclass
class Tracking:
    uri: str | None = MISSING  # None: MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db here)
    experiment: str = MISSING  # conf/tracking/default.yaml: the one home of the name
    run_name: str | None = MISSING
    log_every: int = MISSING  # log every n-th step's metrics (1: every step)
    log_grad_norms: str = MISSING  # per_variable | global | off
    log_model: bool = MISSING
    register_model: str | None = MISSING  # a registered model's name: the logged model becomes its new version
    queue_chunks: int = MISSING  # bound on chunks waiting for the writer thread (back-pressure past it)
    # Per-variable gradient norms at steps >= per_variable_after only every per_variable_every-th step (None:
    # every step of any run); loss, lr and the global norm stay at every step. The MLflow UI ranks every point
    # of a metric for each chart request (~2 us a point): on a 1M-step MLP run a per-variable chart took 2.7 s,
    # at these defaults (190k points) 0.41 s, and the store shrank from 2.76 to 1.28 GB (README: Performance).
    per_variable_every: int = MISSING
    per_variable_after: int | None = MISSING
    # MLflow's own sampler (a thread of its own, never the training loop's): CPU, memory, disk, network and GPU
    # under system/, one sample every system_metrics_interval seconds (README: What lands in MLflow).
    system_metrics: bool = MISSING
    system_metrics_interval: float = MISSING
    # Long curves (tracking/curves.py, README: Long curves): plots/curves.png at the end of each run, every step's
    # min/max per pixel column; window_extremes=N also logs each N-step window's min and max (train/loss_max, ...).
    log_plots: bool = MISSING
    window_extremes: int | None = MISSING
    # TensorBoard event files of the points the store took, written by the sink's writer thread (never the training
    # loop's; tracking/tensorboard.py, README: In TensorBoard); None: <the run's directory>/tensorboard.
    tensorboard: bool = MISSING
    tensorboard_dir: str | None = MISSING

    def __post_init__(self) -> None:
        _require(self.system_metrics_interval > 0, "tracking.system_metrics_interval", self.system_metrics_interval,
                 "a number of seconds > 0")  # fmt: skip
        _require(self.log_every >= 1, "tracking.log_every", self.log_every, "an integer >= 1")
        every, after = self.per_variable_every, self.per_variable_after
        _require(every >= 1, "tracking.per_variable_every", every, "an integer >= 1")
        _require(after is None or after >= 0, "tracking.per_variable_after", after, "an integer >= 0, or null")
        modes = ("per_variable", "global", "off")
        _require(self.log_grad_norms in modes, "tracking.log_grad_norms", self.log_grad_norms, " | ".join(modes))
        _require(self.queue_chunks >= 1, "tracking.queue_chunks", self.queue_chunks, "an integer >= 1")
        n = self.window_extremes
        _require(n is None or n >= 2, "tracking.window_extremes", n, "null (off) or a window of N >= 2 steps")
        name = self.register_model
        _require(name is None or bool(name.strip()), "tracking.register_model", name, "a model name, or null")
        _require(name is None or self.log_model, "tracking.register_model", name, "null unless tracking.log_model=true")
        where = self.tensorboard_dir
        _require(where is None or bool(where.strip()), "tracking.tensorboard_dir", where, "a directory, or null")
        ok = where is None or self.tensorboard
        _require(ok, "tracking.tensorboard_dir", where, "null unless tracking.tensorboard=true")


# --- steps (trainer/steps): what each built-in takes beside the model, loss and optimizer groups ---------
@dataclass
class SupervisedStep:
    _target_: str = MISSING


@dataclass
class SAMStep(SupervisedStep):
    rho: float = MISSING  # the perturbation's radius
    adaptive: bool = MISSING  # ASAM: the perturbation scaled by |w|

    def __post_init__(self) -> None:
        _require(self.rho > 0, "step.rho", self.rho, "a number > 0 (0.05 for SAM, ~0.5 to 2 for adaptive)")


@dataclass
class AdversarialStep(SupervisedStep):
    epsilon: float = MISSING
    steps: int = MISSING  # 1: FGSM; more: PGD
    step_size: float | None = MISSING
    adversarial_weight: float = MISSING
    clip: list[float] | None = MISSING

    def __post_init__(self) -> None:
        _require(self.epsilon > 0, "step.epsilon", self.epsilon, "a number > 0, in the model's input units")
        _require(1 <= self.steps <= 100, "step.steps", self.steps, "an integer from 1 (FGSM) to 100")
        ok = self.step_size is None or self.step_size > 0
        _require(ok, "step.step_size", self.step_size, "null or a number > 0")
        w = self.adversarial_weight
        _require(0 <= w <= 1, "step.adversarial_weight", w, "a number in [0, 1]")
        ok = self.clip is None or (len(self.clip) == 2 and self.clip[0] < self.clip[1])
        _require(ok, "step.clip", self.clip, "null or [lo, hi] with lo < hi")


@dataclass
class GANStep:
    _target_: str = MISSING
    latent_dim: int = MISSING
    generator: Any = MISSING  # a model node with _partial_: true (its units: the data's features)
    discriminator: Any = MISSING  # a model node giving one logit
    generator_optimizer: Any = MISSING
    discriminator_optimizer: Any = MISSING

    def __post_init__(self) -> None:
        _require(self.latent_dim >= 1, "step.latent_dim", self.latent_dim, "an integer >= 1")


@dataclass
class OscillatorStep:
    _target_: str = MISSING
    omega: float = MISSING
    u0: float = MISSING
    v0: float = MISSING
    initial_weight: float = MISSING

    def __post_init__(self) -> None:
        _require(self.omega > 0, "step.omega", self.omega, "a number > 0")
        _require(self.initial_weight > 0, "step.initial_weight", self.initial_weight, "a number > 0")


@dataclass
class Config:
    model: Any = MISSING
    loss: Any = MISSING
    data: Any = MISSING
    optimizer: Any = MISSING
    schedule: Schedule = MISSING
    step: Any = MISSING  # trainer.steps.Supervised by default; any trainer.steps.Step subclass by _target_
    trainer: TrainerSettings = MISSING
    tracking: Tracking = MISSING
    experiment: Any = None
    hparams_search: Any = None
    launcher: Any = None
    resume: str | None = MISSING  # a run's output dir or MLflow run id: continue from its last checkpoint
    # `_target_`s a resumed run's run.json may build beyond the built-ins and what your own config names:
    # exact names or patterns (my_models.*). Run data is never trusted by itself (see trusted_config).
    trusted_targets: list[str] = MISSING
    accept_changed_data: bool = MISSING  # resume: train on though the data's digest changed (a new dataset input)
    verbose: bool = MISSING  # the libraries' start-up lines as they print them (trainer/startup.py)
    lr_find: bool = MISSING  # run the LR range test instead of training (trainer/lr_find.py)
    lr_finder: LRFinder = MISSING


SCHEMAS: dict[str, dict[str, type]] = {
    "model": {
        "linear": LinearModel,
        "mlp": MLPModel,
        "cnn": CNNModel,
        "sequential": SequentialModel,
        "keras_app": KerasAppModel,
    },
    "loss": {"loss": Loss, "huber": HuberLoss, "cross_entropy": CrossEntropyLoss, "keras": KerasLoss},
    "data": {
        "tape_example": TapeExampleData,
        "regression": RegressionData,
        "classification": ClassificationData,
        "csv": CsvData,
        "parquet": ParquetData,
        "tfrecord": TFRecordData,
        "image_folder": ImageFolderData,
        "numpy": NumpyData,
        "ring": RingData,
        "oscillator": OscillatorData,
    },
    "optimizer": {
        "sgd": SGDOptimizer,
        "adam": AdamOptimizer,
        "adamw": AdamWOptimizer,
        "rmsprop": RMSpropOptimizer,
    },
    "schedule": {"schedule": Schedule},
    "step": {
        "supervised": SupervisedStep,
        "sam": SAMStep,
        "adversarial": AdversarialStep,
        "gan": GANStep,
        "oscillator": OscillatorStep,
    },
    "trainer": {"trainer": TrainerSettings},
    "tracking": {"tracking": Tracking},
}


def register() -> None:
    """Put every schema where the YAML files' defaults lists look for them: `/schema/<group>/<name>`."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


def build(node: DictConfig, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, letting our own errors through unwrapped so the user sees one line."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if not kwargs.get("_partial_"):  # a partial (a data option) takes its keys, the shared settings go elsewhere
        _check_takes(node, kwargs)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        error = e
    # Raised outside the except block: inside it, Python would set our error's __context__ to Hydra's
    # wrapper, whose __cause__ is our error, a cycle that hangs anything walking the chain.
    cause = error.__cause__
    if isinstance(cause, TrainerError):
        raise cause
    from trainer.compat import full_key  # OmegaConf's private Node._get_full_key, fenced

    unimportable = unimportable_target(error, full_key(node))
    if unimportable:
        raise TrainerError(unimportable) from error
    target = node.get("_target_", "?")
    raise TrainerError(f"cannot build {target}: {str(cause or error).splitlines()[0]}") from error


def _check_takes(node: DictConfig, kwargs: Mapping[str, Any]) -> None:
    """Every key of a `_target_` node is a parameter of the target, as its signature says (unless it takes
    **kwargs): a key your own model or loss does not take was passed to nothing and read by nothing. Targets
    that do not import are left to instantiate, which says why in one line."""
    import inspect

    from hydra.utils import get_object

    target = node.get("_target_")
    if not isinstance(target, str):
        return
    try:
        params = inspect.signature(get_object(target)).parameters
    except Exception:  # not importable, or no signature to read (a builtin): instantiate tells
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    given = [str(k) for k in node if not str(k).startswith("_")] + [k for k in kwargs if not k.startswith("_")]
    if unknown := [k for k in given if k not in params]:
        from trainer.compat import full_key  # OmegaConf's private Node._get_full_key, fenced

        where = full_key(node)
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        takes = ", ".join(p for p in params if p not in ("self", "args")) or "nothing"
        raise TrainerError(f"{key} is no parameter of {target} (it takes {takes}); remove it")


def unimportable_target(error: BaseException, key: str = "") -> str | None:
    """Hydra's "Error locating target" as one line ending in the reason, or None for other errors.

    Hydra's first line stops before the reason ("Error loading 'nosuch.Model':"); the reason is the last
    exception of the chain: `model._target_='nosuch.Model' cannot be imported: No module named 'nosuch'`.
    Hydra's `full_key` line names the node's place in the whole config; `key` stands in when it has none.
    """
    import re

    text = str(error)
    located = re.match(r"Error locating target '(.*)', set env var", text)
    if located is None:
        return None
    full_key = re.search(r"^full_key: (.+)$", text, re.MULTILINE)
    name = ".".join(k for k in (full_key.group(1) if full_key else key, "_target_") if k)
    reason = error
    while reason.__cause__ is not None:
        reason = reason.__cause__
    why = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
    return f"{name}={located.group(1)!r} cannot be imported: {why}"


def _check_interpolations(cfg: DictConfig, prefix: str = "") -> None:
    """`${data.n_classes}` with data that has no classes: name the key that refers to it."""
    from omegaconf.errors import InterpolationResolutionError

    for key in cfg:
        path = f"{prefix}{key}"
        if OmegaConf.is_interpolation(cfg, key):
            try:
                cfg[key]
            except InterpolationResolutionError as e:
                raise TrainerError(
                    f"{path}={OmegaConf.to_container(cfg)[key]}: {str(e).splitlines()[0]} (does the chosen option "
                    "provide it? e.g. model=classifier needs data=classification)"
                ) from None
        elif not OmegaConf.is_missing(cfg, key) and isinstance(cfg[key], DictConfig):
            _check_interpolations(cfg[key], f"{path}.")


def _check_finite(value: Any, key: str) -> None:
    """`optimizer.lr=1e400` is inf and passes `lr > 0`; no key of any group means anything as NaN or inf."""
    if isinstance(value, float) and not math.isfinite(value):
        raise TrainerError(f"{key}={value} is invalid: expected a finite number")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        _check_finite(v, f"{key}.{k}" if isinstance(k, str) else f"{key}[{k}]")


OPTIONAL_GROUPS = ("model", "loss", "optimizer")  # null where the step takes none (steps.build_step checks)


GROUPS = ("model", "loss", "data", "optimizer", "schedule", "step", "trainer", "tracking")


def check(cfg: DictConfig) -> None:
    """Run the range checks of every typed group; raises TrainerError naming the first bad key."""
    _check_interpolations(cfg)
    for group in GROUPS:
        node = cfg.get(group)
        if node is None and group in OPTIONAL_GROUPS:  # a step that builds its own (trainer/steps: GAN)
            continue
        missing = sorted(OmegaConf.missing_keys(node))
        if missing:
            key = missing[0] if missing[0].startswith(f"{group}.") else f"{group}.{missing[0]}"
            raise TrainerError(f"{key} must be set (e.g. {key}=...)")
        _check_finite(OmegaConf.to_container(node, resolve=True), group)
        _check_known_keys(cfg, node, group)
        if OmegaConf.get_type(node) not in (dict, None):
            OmegaConf.to_object(node)  # builds the dataclass, so its __post_init__ checks run
    if OmegaConf.get_type(cfg.get("lr_finder")) is LRFinder:  # absent from a run.json older than it
        _check_known_keys(cfg, cfg.lr_finder, "lr_finder")
        OmegaConf.to_object(cfg.lr_finder)
    known = {f.name for f in dataclasses.fields(Config)}
    if unknown := [str(k) for k in cfg if str(k) not in known and not str(k).startswith("_")]:
        raise TrainerError(f"{unknown[0]} is no setting ({close_names(unknown[0], sorted(known))}); remove it")
    _check_callbacks(cfg.trainer.get("callbacks") or [])


def _check_known_keys(cfg: DictConfig, node: DictConfig, key: str) -> None:
    """Every key of a typed group (and its typed sub-nodes) is one its schema has. Hydra's `+` adds any key to a
    typed node, and `+trainer.class_weight=...` was logged as a param and read by nothing: bitwise the same run.
    A key another group has is named there (`did you mean data.class_weight?`)."""
    kind = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(kind):
        return
    fields = [f.name for f in dataclasses.fields(kind) if not f.name.startswith("_")]
    for key_ in node:
        name = str(key_)
        if name.startswith("_"):
            continue
        if name not in fields:
            elsewhere = [g for g in GROUPS if g != key.split(".")[0] and isinstance(cfg.get(g), DictConfig)
                         and name in cfg[g]]  # fmt: skip
            hint = f"did you mean {elsewhere[0]}.{name}?" if elsewhere else close_names(name, fields)
            raise TrainerError(f"{key}.{name} is no setting of {key} ({hint}); remove it")
        value = node.get(name)
        if isinstance(value, DictConfig):
            _check_known_keys(cfg, value, f"{key}.{name}")


def _check_callbacks(nodes: Sequence[Any]) -> None:
    """trainer.callbacks: each a node whose `_target_` imports, checked before TensorFlow is imported. Only ever
    run on the user's own config or on run data that trusted_config passed: importing runs the module's code."""
    for i, node in enumerate(nodes):
        key = f"trainer.callbacks[{i}]"
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        if not isinstance(target, str):
            raise TrainerError(f"{key}={node!r} is invalid: expected a node with a _target_, such as "
                               "{_target_: my_pkg.MyCallback}")  # fmt: skip
        reason = _import_error(target)
        if reason:
            raise TrainerError(f"{key}._target_={target!r} cannot be imported: {reason}")


def _import_error(target: str) -> str | None:
    """Why the dotted name `target` cannot be imported, or None: its module is the longest prefix that imports."""
    import importlib

    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:i])
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and (module == e.name or module.startswith(f"{e.name}.")):
                continue  # this prefix is no module: perhaps a shorter one is, with attributes after it
            return first_line(e)
        except Exception as e:  # the module itself fails to import: its own error
            return f"{type(e).__name__}: {first_line(e)}"
        for name in parts[i:]:
            if not hasattr(found, name):
                return f"module {module!r} has no attribute {name!r}"
            found = getattr(found, name)
        return None
    return f"No module named {parts[0]!r}" if len(parts) > 1 else "expected a dotted path such as my_pkg.MyCallback"


# --- run data: what a resumed or evaluated run may build --------------------------------------
TRUST_KEY = "trusted_targets"
ACCEPT_KEY = "accept_changed_data"  # resume: the user's own say that changed data may be trained on


def conf_dir() -> Path:
    """Installed wheels carry conf/ inside the package; an editable install reads the repo's conf/."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return packaged if packaged.is_dir() else here.parents[1] / "conf"


@functools.cache
def builtin_targets() -> frozenset[str]:
    """Every `_target_` the trainer ships: those of every option under conf/ (~20 ms, once)."""
    import yaml

    found: set[str] = set()
    for path in sorted(conf_dir().rglob("*.yaml")):
        found.update(target for _, target in targets(yaml.safe_load(path.read_text())))
    return frozenset(found)


def option(group: str, name: str) -> DictConfig:
    """The values conf/<group>/<name>.yaml states, its defaults list left out: each default's one home."""
    node = OmegaConf.load(conf_dir() / group / f"{name}.yaml")
    node.pop("defaults", None)
    return node


def check_option(group: str, node: DictConfig) -> None:
    """A built-in option's values from elsewhere than composition (a logged config with `trainer evaluate`'s
    overrides applied) checked as training checks them: the schema of the option whose `_target_` it has, so a
    wrong type, a deleted key or a value out of range is the same one line (`data.n_samples=-5 is invalid: ...`).
    A `_target_` that no built-in option has (the user's own) is the user's to check."""
    from omegaconf.errors import OmegaConfBaseException

    schema = _schema_of(group, node.get("_target_"))
    if schema is None:
        return
    try:
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))  # types, then __post_init__
    except OmegaConfBaseException as e:
        key = f"{group}.{e.full_key}" if getattr(e, "full_key", None) else group
        if "missing mandatory value" in str(e).lower():
            raise TrainerError(f"{key} must be set (e.g. {key}=...)") from None
        raise TrainerError(f"{key}: {first_line(e)}") from None


def _schema_of(group: str, target: Any) -> type | None:
    """The schema named in the defaults list of the conf/<group>/ option whose _target_ is `target`."""
    path = _option_path(group, target)
    for entry in (OmegaConf.load(path).get("defaults") or []) if path else []:
        if isinstance(entry, str) and entry.startswith(f"/schema/{group}/"):
            return SCHEMAS[group].get(entry.removeprefix(f"/schema/{group}/").partition("@")[0])
    return None


def _option_path(group: str, target: Any) -> Path | None:
    """conf/<group>/<name>.yaml of the built-in option whose `_target_` is `target`, or None (your own)."""
    for path in sorted((conf_dir() / group).glob("*.yaml")):
        if OmegaConf.load(path).get("_target_") == target:
            return path
    return None


def with_current_defaults(stored: DictConfig) -> DictConfig:
    """A run's stored config, with the trainer keys it lacks (its run.json predates them) from conf/trainer/.

    A resumed run is the same run, so its own values win; a key added since (trainer.max_skipped_fraction
    once was) takes the value a new run gets from the YAML option rather than a second copy of it in code.
    Tracking keys stay as stored: there an absent key means the run logs on as it began (tracking/run.py).
    """
    if "trainer" in stored and (
        OmegaConf.is_interpolation(stored, "trainer") or not isinstance(stored.trainer, DictConfig)
    ):
        return stored  # not a mapping of settings: left for trusted_config and check() to refuse
    merged = OmegaConf.merge(
        stored, {"trainer": OmegaConf.merge(option("trainer", "default"), stored.get("trainer", {}))}
    )
    if "step" not in merged:  # a run from before steps: it trained with the supervised one
        merged.step = option("step", "supervised")
    return with_option_defaults(merged)


OPTION_GROUPS = ("data", "optimizer", "loss", "model")  # the groups whose options grew keys runs may predate


def with_option_defaults(stored: DictConfig, groups: Sequence[str] = OPTION_GROUPS) -> DictConfig:
    """Each of `groups` whose `_target_` a built-in option has, with the keys it lacks from that option's YAML (a
    run logged before `data.class_weight`, `optimizer.use_ema` or `model.freeze` existed): its own values win.
    Nodes of your own `_target_`s, and anything not a mapping, stay as stored."""
    for group in groups:
        node = stored.get(group) if group in stored and not OmegaConf.is_interpolation(stored, group) else None
        if not isinstance(node, DictConfig) or not isinstance(node.get("_target_"), str):
            continue
        defaults = _option_of(group, node._target_)
        if defaults is not None:
            stored[group] = OmegaConf.merge(defaults, node)
    return stored


def _option_of(group: str, target: str) -> DictConfig | None:
    """The values of the conf/<group>/ option whose `_target_` is `target` (data: over the shared settings)."""
    path = _option_path(group, target)
    if path is None:
        return None
    node = option(group, path.stem)
    return OmegaConf.merge(OmegaConf.load(conf_dir() / "data_defaults.yaml"), node) if group == "data" else node


def targets(tree: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(key, target) for every `_target_` in a plain container, at any depth: nested nodes, lists and
    `_args_` too, which Hydra's instantiate builds recursively."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        where = f"{path}.{key}" if path else str(key)
        if key == "_target_":
            yield where, value if isinstance(value, str) else repr(value)
        yield from targets(value, where)


def named_targets(cfg: DictConfig) -> set[str]:
    """What the user's own composed config (its options, overrides and `trusted_targets`) lets be built."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    return {target for _, target in targets(plain)} | set(plain.get(TRUST_KEY) or ())


def trusted_config(
    cfg: DictConfig, trusted: Iterable[str], source: str, keys: Sequence[str] | None = None
) -> DictConfig:
    """`cfg` read from run data (a run directory's run.json, a run's config.yaml), safe to instantiate.

    Run directories and tracking stores are shared, and Hydra's instantiate imports and calls whatever a
    `_target_` names: anyone who can write there could run code as whoever reads the run. So every
    `_target_` must be built in or match `trusted` (the user's own config and command line), checked on
    the resolved values, which are what instantiate would see. OmegaConf's resolution itself runs only
    registered resolvers (oc.env, oc.select, ...: none runs code; an unknown one is an error), but it
    unescapes `\\${...}` into a live interpolation, so a resolved config that still holds one is refused
    rather than resolved a second time. Returns the resolved, interpolation-free copy of `cfg`, or of its
    `keys` only (what the caller will build; the rest is neither resolved nor checked).
    """
    from omegaconf.errors import OmegaConfBaseException

    raw = OmegaConf.to_container(cfg, resolve=False)
    reads = next(((k, v) for k, v in _strings(raw if keys is None else {k: raw.get(k) for k in keys})
                  if "${" in v and "oc.env" in v), None)  # fmt: skip
    if reads is not None:
        raise TrainerError(f"{source}: {reads[0]}={reads[1]} reads this machine's environment; run data is data and "
                           "is not resolved from it: set the value yourself")  # fmt: skip
    try:
        plain = OmegaConf.to_container(cfg, resolve=True) if keys is None else {k: _plain(cfg, k) for k in keys}
    except OmegaConfBaseException as e:
        raise TrainerError(f"{source}: {str(e).splitlines()[0]}") from None
    patterns = list(trusted)
    for key, target in targets(plain):
        if not (is_trusted(target, patterns) or is_layer_of(plain, key, target)):
            raise TrainerError(
                f"{source}: {key}={target!r} is not built in and not named by your own config or command line; "
                f"if you trust where it comes from, allow it with {TRUST_KEY}=[{target}]"
            )
    live = next(_interpolations(plain), None)
    if live is not None:
        raise TrainerError(f"{source}: {live} is still an interpolation once resolved (an escaped one); refusing it")
    return OmegaConf.create(plain)


# model=sequential's layers: any keras.layers class is as safe in a run's model.layers as a built-in (it computes on
# its input and makes variables), except the layers whose arguments name code or a graph to run. Their own nested
# nodes (Bidirectional's `layer`) count as layers too; any other target inside them is checked as usual.
LAYER_LISTS = frozenset({"trainer.models.Sequential"})
LAYER_KEY = r"model\.layers\.\d+(\.\w+)*\._target_"
LAYER_TARGET = r"keras\.layers\.[A-Z]\w*"
RUNS_CODE = frozenset(
    f"keras.layers.{n}" for n in ("Lambda", "TFSMLayer", "JaxLayer", "FlaxLayer", "TorchModuleWrapper")
)


def is_layer_of(plain: dict, key: str, target: str) -> bool:
    """`target` at `key` is a Keras layer in the layer list of a built-in model (model.layers.2._target_)."""
    import re

    model = plain.get("model")
    return (
        isinstance(model, dict)
        and model.get("_target_") in LAYER_LISTS
        and re.fullmatch(LAYER_KEY, key) is not None
        and re.fullmatch(LAYER_TARGET, target) is not None
        and target not in RUNS_CODE
    )


def _plain(cfg: DictConfig, key: str) -> Any:
    """cfg[key] resolved, as a plain container (a missing key: None)."""
    from omegaconf import ListConfig

    value = cfg.get(key)  # an interpolated node resolves here, the rest just below
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value


def is_trusted(target: str, patterns: Iterable[str]) -> bool:
    """Built in, or matched by one of `patterns` (exact names, or fnmatch patterns such as my_models.*)."""
    return target in builtin_targets() or any(fnmatch.fnmatchcase(target, p) for p in patterns)


def _strings(tree: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(key, value) for every string of a plain container, at any depth."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        where = f"{path}.{key}" if path else str(key)
        if isinstance(value, str):
            yield where, value
        yield from _strings(value, where)


def _interpolations(tree: Any) -> Iterator[str]:
    """Keys of a plain container whose values OmegaConf would take for interpolations, at any depth."""
    return (key for key, value in _strings(tree) if "${" in value)
