"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Each YAML option under `conf/<group>/` starts from one of these schemas (its defaults list names
`/schema/<group>/<name>`), so Hydra itself rejects unknown keys and wrong types while composing,
before TensorFlow is imported. Range checks that a type cannot express live in `__post_init__`
and run in `check()`, still before any TensorFlow work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class TrainerError(Exception):
    """A problem the user can fix (config, data, numerics): shown as one line, never a traceback."""


def _require(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise TrainerError(f"{key}={value!r} is invalid: expected {valid}")


# --- model -------------------------------------------------------------------------------------
@dataclass
class LinearModel:
    _target_: str = "trainer.models.Linear"
    units: int = 1
    w_init: float | None = None  # None: Glorot uniform; a number: every weight starts there
    b_init: float = 0.0

    def __post_init__(self) -> None:
        _require(self.units >= 1, "model.units", self.units, "an integer >= 1")


@dataclass
class MLPModel:
    _target_: str = "trainer.models.MLP"
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    units: int = 1
    activation: str = "relu"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _require(all(h >= 1 for h in self.hidden), "model.hidden", list(self.hidden), "widths >= 1")
        _require(self.units >= 1, "model.units", self.units, "an integer >= 1")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a value in [0, 1)")


# --- loss --------------------------------------------------------------------------------------
@dataclass
class Loss:
    _target_: str = MISSING
    _partial_: bool = True


@dataclass
class HuberLoss(Loss):
    _target_: str = "trainer.losses.huber"
    delta: float = 1.0

    def __post_init__(self) -> None:
        _require(self.delta > 0, "loss.delta", self.delta, "a positive number")


@dataclass
class CrossEntropyLoss(Loss):
    from_logits: bool = True


# --- data --------------------------------------------------------------------------------------
@dataclass
class Data:
    _target_: str = MISSING
    val_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        _require(0.0 <= self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "a value in [0, 1)")


@dataclass
class TapeExampleData(Data):
    _target_: str = "trainer.data.tape_example"
    x: float = 2.0
    y: float = 3.0
    val_fraction: float = 0.0


@dataclass
class RegressionData(Data):
    _target_: str = "trainer.data.regression"
    n_samples: int = 4096
    n_features: int = 8
    n_targets: int = 1
    noise: float = 0.1
    kind: str = "linear"  # linear | nonlinear

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.n_samples >= 2, "data.n_samples", self.n_samples, "an integer >= 2")
        _require(self.n_features >= 1, "data.n_features", self.n_features, "an integer >= 1")
        _require(self.n_targets >= 1, "data.n_targets", self.n_targets, "an integer >= 1")
        _require(self.noise >= 0, "data.noise", self.noise, "a number >= 0")
        _require(self.kind in ("linear", "nonlinear"), "data.kind", self.kind, "'linear' or 'nonlinear'")


@dataclass
class ClassificationData(Data):
    _target_: str = "trainer.data.classification"
    n_samples: int = 4096
    n_features: int = 8
    n_classes: int = 3
    separation: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.n_samples >= 2, "data.n_samples", self.n_samples, "an integer >= 2")
        _require(self.n_features >= 1, "data.n_features", self.n_features, "an integer >= 1")
        _require(self.n_classes >= 2, "data.n_classes", self.n_classes, "an integer >= 2")


@dataclass
class CsvData(Data):
    _target_: str = "trainer.data.csv"
    path: str = MISSING
    target: list[str] = MISSING
    features: list[str] | None = None  # None: every column that is not a target
    one_hot: bool = False  # one integer class column -> one-hot targets for categorical_crossentropy


# --- optimizer and schedule --------------------------------------------------------------------
@dataclass
class Optimizer:
    _target_: str = MISSING
    _partial_: bool = True  # the learning rate (or its schedule) is handed over by the trainer
    lr: float = 1e-3
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optimizer.lr", self.lr, "a positive number")


@dataclass
class SGDOptimizer(Optimizer):
    _target_: str = "keras.optimizers.SGD"
    lr: float = 1e-2
    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0.0 <= self.momentum < 1.0, "optimizer.momentum", self.momentum, "a value in [0, 1)")


@dataclass
class AdamOptimizer(Optimizer):
    _target_: str = "trainer.optim.Adam"
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    amsgrad: bool = False
    fused: bool | None = None  # one flat update for all variables (trainer.optim); None: for small variables


@dataclass
class AdamWOptimizer(AdamOptimizer):
    _target_: str = "trainer.optim.AdamW"
    weight_decay: float | None = 0.004


@dataclass
class RMSpropOptimizer(Optimizer):
    _target_: str = "keras.optimizers.RMSprop"
    rho: float = 0.9
    momentum: float = 0.0
    epsilon: float = 1e-7
    centered: bool = False


@dataclass
class Schedule:
    """How the learning rate moves with the step; `name` picks the pure function in `optim.py`."""

    name: str = "constant"  # constant | cosine | exponential | warmup_cosine
    warmup_steps: int = 0
    decay_steps: int | None = None  # None: the run's total steps
    decay_rate: float = 0.96  # exponential: lr * decay_rate ** (step / decay_steps)
    final_lr_fraction: float = 0.0  # cosine: the lr it ends at, as a fraction of optimizer.lr

    def __post_init__(self) -> None:
        names = ("constant", "cosine", "exponential", "warmup_cosine")
        _require(self.name in names, "schedule.name", self.name, " | ".join(names))
        _require(self.warmup_steps >= 0, "schedule.warmup_steps", self.warmup_steps, "an integer >= 0")
        ok = self.decay_steps is None or self.decay_steps >= 1
        _require(ok, "schedule.decay_steps", self.decay_steps, "null or an integer >= 1")
        _require(0 < self.decay_rate <= 1, "schedule.decay_rate", self.decay_rate, "a value in (0, 1]")
        ok = 0.0 <= self.final_lr_fraction <= 1.0
        _require(ok, "schedule.final_lr_fraction", self.final_lr_fraction, "a value in [0, 1]")


# --- trainer and tracking ----------------------------------------------------------------------
@dataclass
class EarlyStopping:
    patience: int | None = None  # evaluations without improvement before stopping; None: off
    monitor: str = "val/loss"  # a val/ metric; accuracy-like names are maximised, the rest minimised
    min_delta: float = 0.0  # an improvement smaller than this does not count
    restore_best: bool = True  # end with the weights of the best evaluation

    def __post_init__(self) -> None:
        ok = self.patience is None or self.patience >= 1
        _require(ok, "trainer.early_stopping.patience", self.patience, "null (off) or an integer >= 1")
        _require(self.min_delta >= 0, "trainer.early_stopping.min_delta", self.min_delta, "a number >= 0")
        ok = self.monitor.startswith("val/")
        _require(ok, "trainer.early_stopping.monitor", self.monitor, "a validation metric such as val/loss")


@dataclass
class TrainerSettings:
    max_steps: int = 1000
    epochs: int | None = None  # when set, wins over max_steps: epochs * (train examples // batch_size)
    batch_size: int = 32
    steps_per_loop: int | None = None  # steps per compiled call; None: chosen from the run (see loop.py)
    eval_every: int | None = None  # None: only at the end
    clip_norm: float | None = None  # clip gradients to this global norm
    seed: int = 0
    jit: bool = False  # XLA-compile the step; measure it per job, it is slower on most CPUs
    device: str = "auto"  # auto | cpu | gpu | a TF device string such as /GPU:1
    print_gradients: bool = False  # print each variable's gradient at the first step (a host sync, once)
    progress: bool = True
    checkpoint_every: int | None = None  # None: at the end (and on Ctrl-C / SIGTERM) only
    max_to_keep: int = 3
    deterministic: bool = False  # op determinism: a resumed run ends bitwise equal to an uninterrupted one
    on_nonfinite: str = "stop"  # stop: fail at the first NaN/Inf; skip_step: leave the weights, count it
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    accumulate_steps: int = 1  # micro-batches of batch_size whose mean gradient makes one update
    precision: str = "float32"  # float32 | mixed_float16 (with loss scaling) | mixed_bfloat16
    strategy: str = "auto"  # auto | default | mirrored | multi_worker (tf.distribute)
    logical_cpus: int | None = None  # split the CPU into this many devices (try mirrored without GPUs)
    intra_op_threads: int | None = None  # threads inside one op (a matmul); None: TensorFlow's default
    inter_op_threads: int | None = None  # ops run side by side; None: TensorFlow's default

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
        ok = self.logical_cpus is None or self.logical_cpus >= 1
        _require(ok, "trainer.logical_cpus", self.logical_cpus, "null or an integer >= 1")
        for key in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, key)
            _require(value is None or value >= 1, f"trainer.{key}", value, "null or an integer >= 1")
        policies = ("float32", "mixed_float16", "mixed_bfloat16")
        _require(self.precision in policies, "trainer.precision", self.precision, " | ".join(policies))
        modes = ("stop", "skip_step")
        _require(self.on_nonfinite in modes, "trainer.on_nonfinite", self.on_nonfinite, " | ".join(modes))
        ok = self.device in ("auto", "cpu", "gpu") or self.device.startswith("/")
        _require(ok, "trainer.device", self.device, "auto | cpu | gpu | a device string like /GPU:0")


@dataclass
class Tracking:
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db here)
    experiment: str = "tape-trainer"
    run_name: str | None = None
    log_every: int = 1  # log every n-th step's metrics (1: every step)
    log_grad_norms: str = "per_variable"  # per_variable | global | off
    log_model: bool = True
    queue_chunks: int = 64  # bound on chunks waiting for the writer thread (back-pressure past it)

    def __post_init__(self) -> None:
        _require(self.log_every >= 1, "tracking.log_every", self.log_every, "an integer >= 1")
        modes = ("per_variable", "global", "off")
        _require(self.log_grad_norms in modes, "tracking.log_grad_norms", self.log_grad_norms, " | ".join(modes))
        _require(self.queue_chunks >= 1, "tracking.queue_chunks", self.queue_chunks, "an integer >= 1")


@dataclass
class Config:
    model: Any = MISSING
    loss: Any = MISSING
    data: Any = MISSING
    optimizer: Any = MISSING
    schedule: Schedule = field(default_factory=Schedule)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    tracking: Tracking = field(default_factory=Tracking)
    experiment: Any = None
    hparams_search: Any = None
    launcher: Any = None
    resume: str | None = None  # a run's output dir or MLflow run id: continue from its last checkpoint


SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"linear": LinearModel, "mlp": MLPModel},
    "loss": {"loss": Loss, "huber": HuberLoss, "cross_entropy": CrossEntropyLoss},
    "data": {
        "tape_example": TapeExampleData,
        "regression": RegressionData,
        "classification": ClassificationData,
        "csv": CsvData,
    },
    "optimizer": {
        "sgd": SGDOptimizer,
        "adam": AdamOptimizer,
        "adamw": AdamWOptimizer,
        "rmsprop": RMSpropOptimizer,
    },
    "schedule": {"schedule": Schedule},
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

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, TrainerError):
            raise cause from None
        target = node.get("_target_", "?")
        raise TrainerError(f"cannot build {target}: {str(cause or e).splitlines()[0]}") from e


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


def check(cfg: DictConfig) -> None:
    """Run the range checks of every typed group; raises TrainerError naming the first bad key."""
    _check_interpolations(cfg)
    for group in ("model", "loss", "data", "optimizer", "schedule", "trainer", "tracking"):
        node = cfg[group]
        missing = sorted(OmegaConf.missing_keys(node))
        if missing:
            key = missing[0] if missing[0].startswith(f"{group}.") else f"{group}.{missing[0]}"
            raise TrainerError(f"{key} must be set (e.g. {key}=...)")
        if OmegaConf.get_type(node) not in (dict, None):
            OmegaConf.to_object(node)  # builds the dataclass, so its __post_init__ checks run
