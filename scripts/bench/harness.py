"""What every measurement shares: the jobs, their composed config and data, fresh stores, clocks and medians."""

from __future__ import annotations

import gc
import logging
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from trainer.config import build
from trainer.data import Dataset
from trainer.optim import build_optimizer

CONF = Path(__file__).resolve().parents[2] / "conf"
EXPERIMENT = "bench"
SPE_CHOICES = (1, 10, 50, 100, 200)  # Keras steps_per_execution values tried; the best one is reported
QUICK_SPE_CHOICES = (1, 50)  # --quick: both of fit's code paths (one step per call, a while_loop of them)
STOCK = {"trainer.optim.Adam": "keras.optimizers.Adam", "trainer.optim.AdamW": "keras.optimizers.AdamW"}
# Ours as a user runs it, less what only adds fixed cost or noise: the model file and the curves plot (both
# written after training; the plot's ~1.5 s with matplotlib varied by +-0.5 s, against the ~11 s between the wide
# job's N and n runs; ~0.03 s with Pillow since) and the progress bar (drawn between chunks). All would cancel in
# the marginal rate but for their noise.
# --threads appends the thread pools' sizes here.
OURS_OVERRIDES = [
    "tracking.log_every=1",
    "tracking.log_grad_norms=per_variable",
    "tracking.log_model=false",
    "tracking.log_plots=false",
    "trainer.progress=false",
    f"tracking.experiment={EXPERIMENT}",
]


@dataclass(frozen=True)
class Job:
    name: str
    overrides: str  # Hydra overrides, space-separated, as typed after `python -m trainer`
    steps: int  # N for keras-fit, bare and ours
    naive_steps: int  # naive runs ~35 steps/s: its own, smaller N
    about: str


MLP = "model=mlp data=regression data.n_features=32 data.n_samples=81920 data.val_fraction=0.2"
WIDE = "model=mlp model.hidden=[1024,1024] data=regression data.n_features=784 data.n_samples=20480"
IMAGES_ENV = "TRAINER_BENCH_IMAGES"  # the cnn job's .npz, written once per bench run (write_images)
IMAGES = f"data=numpy data.path=${{oc.env:{IMAGES_ENV}}} loss=sparse_categorical_crossentropy"
IMAGE_SHAPE, IMAGE_CLASSES, IMAGE_ROWS = (32, 32, 3), 10, 10240  # CIFAR-10's shape; 8,192 rows to train on
JOBS = {
    "mlp": Job(
        "mlp",
        f"{MLP} trainer.batch_size=256 optimizer=adam optimizer.lr=1e-3",
        12000,
        300,
        "MLP 32-64-64-1, 65,536 rows, batch 256, Adam: overhead-bound",
    ),
    "tape": Job(
        "tape",
        "experiment=tape_example",
        20000,
        300,
        "the GradientTape example: w*x+b, one example, batch 1, SGD: pure overhead",
    ),
    "wide": Job(
        "wide",
        f"{WIDE} data.val_fraction=0.2 trainer.batch_size=512 optimizer=adam optimizer.lr=1e-3",
        300,
        60,
        "MLP 784-1024-1024-1, 16,384 rows, batch 512, Adam: compute-bound",
    ),
    "cnn": Job(
        "cnn",
        f"model=cnn {IMAGES} trainer.batch_size=128 optimizer=adam optimizer.lr=1e-3",
        300,
        60,
        "conv net (conv 32, conv 64, BatchNorm, max-pool) on 32x32x3 images, 10 classes, batch 128, Adam",
    ),
}
# (steps, naive_steps) for --quick
QUICK_STEPS = {"mlp": (200, 20), "tape": (200, 20), "wide": (20, 10), "cnn": (20, 10)}


@dataclass(frozen=True)
class Plan:
    """How one job is measured: the step counts, repeats and Keras' spe values."""

    steps: int
    naive_steps: int
    repeats: int
    spes: tuple[int, ...]
    quick: bool  # no warm-up runs, and the start-up runs alongside the rest: a smoke run, not a measure

    @property
    def warm_up(self) -> bool:
        return not self.quick

    @property
    def startup_alongside(self) -> bool:
        return self.quick

    @property
    def small(self) -> int:
        return max(self.steps // 5, 2)

    @property
    def naive_small(self) -> int:
        return max(self.naive_steps // 5, 2)


class BenchError(Exception):
    """The trainer did not do the job asked of it (a step missing from the store): not a timing problem."""


def quiet_libraries() -> None:
    """Store creation's and tf.function's retrace notices, and fit's shuffle warning (moot for a dataset)."""
    for name in ("mlflow", "alembic", "absl", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*shuffle=True.*")


def use_threads(intra: int, inter: int) -> None:
    """TensorFlow's thread pools for every competitor, ours through its config; before TensorFlow starts."""
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    OURS_OVERRIDES.extend([f"trainer.intra_op_threads={intra}", f"trainer.inter_op_threads={inter}"])


def machine() -> dict[str, object]:
    """What the numbers were measured on, for the JSON."""
    return {
        "cpus": os.cpu_count(),
        "versions": {m.__name__: m.__version__ for m in (tf, keras, mlflow, np)},
        "peak_rss_mb": peak_rss_mb(),
        "threads": {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        },
    }


# --- stores ------------------------------------------------------------------------------------------
@dataclass
class Store:
    """A fresh SQLite MLflow store in its own temp dir, holding the bench experiment."""

    uri: str
    experiment_id: str
    dir: Path


def write_images(workdir: Path) -> Path:
    """The cnn job's images as an .npz of float32 in [0, 1] (so every competitor feeds the model the same
    arrays, no per-batch cast), each class a fixed random pattern under noise; the path goes in IMAGES_ENV."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, IMAGE_CLASSES, IMAGE_ROWS)
    patterns = rng.random((IMAGE_CLASSES, *IMAGE_SHAPE), dtype=np.float32)
    noise = rng.random((IMAGE_ROWS, *IMAGE_SHAPE), dtype=np.float32)
    path = workdir / "images.npz"
    np.savez(path, x=0.5 * patterns[labels] + 0.5 * noise, y=labels)
    os.environ[IMAGES_ENV] = str(path)  # children (the CLI start-up runs) inherit it
    return path


def template_store(workdir: Path) -> Path:
    """An empty store with MLflow's schema: its migrations take seconds, a copy of the file a blink."""
    db = workdir / "template.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


def new_store(workdir: Path) -> Store:
    """A fresh store per run, made before any clock starts (as a user's mlflow.db exists after one run)."""
    where = Path(tempfile.mkdtemp(dir=workdir))
    shutil.copyfile(workdir / "template.db", where / "mlflow.db")
    uri = f"sqlite:///{where / 'mlflow.db'}"
    artifacts = (where / "artifacts").as_uri()
    return Store(uri, MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=artifacts), where)


# --- the job, shared by every competitor -------------------------------------------------------------
@dataclass
class JobContext:
    """What every competitor of one job shares: the composed config and the data, built once."""

    job: Job
    cfg: DictConfig
    data: Dataset
    workdir: Path
    logged: dict[int, list[dict[str, float]]] = field(default_factory=dict)  # ours: steps -> store readings

    @property
    def seed(self) -> int:
        return int(self.cfg.trainer.seed)

    @property
    def batch(self) -> int:
        return int(self.cfg.trainer.batch_size)


def compose(job: Job, steps: int, uri: str, extra: Sequence[str] = ()) -> DictConfig:
    """The config exactly as the CLI composes it from these overrides."""
    overrides = [*job.overrides.split(), *OURS_OVERRIDES, f"trainer.max_steps={steps}", f"tracking.uri={uri}", *extra]
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="bench"):
        return hydra.compose(config_name="config", overrides=overrides)


def fresh_model(ctx: JobContext) -> keras.Model:
    """The trainer's model for the job, with the weights train() starts from: same seed, built alike."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(ctx.seed)
    from trainer.train import _from_data

    model = build(ctx.cfg.model, **_from_data(ctx.cfg.model, ctx.data))  # units from the data, as train() does
    model(ctx.data.x_train[: ctx.batch])
    return model


def fresh_optimizer(ctx: JobContext, steps: int, stock: bool = False) -> keras.Optimizer:
    """The job's optimizer; `stock`: Keras' own class (what `compile(optimizer="adam")` users get), not
    trainer.optim's fused subclass of it. Same arithmetic, same numbers: only the op count differs."""
    kwargs = OmegaConf.to_container(ctx.cfg.optimizer)
    if stock and kwargs["_target_"] in STOCK:
        kwargs["_target_"] = STOCK[kwargs.pop("_target_")]
        kwargs.pop("fused")
    return build_optimizer(OmegaConf.create(kwargs), ctx.cfg.schedule, steps)


# --- timing ------------------------------------------------------------------------------------------
@dataclass
class Competitor:
    name: str
    run: Callable[[JobContext, int], float]  # (context, steps) -> wall seconds of the whole job
    big: int  # N
    small: int  # n: the run subtracted so that start-up cancels
    seconds: dict[int, list[float]] = field(init=False)  # steps -> wall seconds of each run

    def __post_init__(self) -> None:
        self.seconds = {self.big: [], self.small: []}

    def rates(self) -> list[float]:
        """Marginal steps/s of each repeat, pairing its N and n runs."""
        pairs = zip(self.seconds[self.big], self.seconds[self.small], strict=True)
        return [marginal_rate(self.big, self.small, t_big, t_small) for t_big, t_small in pairs]

    def median(self) -> float:
        return finite_median(self.rates())


def finite_median(values: Sequence[float]) -> float:
    """The median of the finite values; NaN when there are none (every repeat swamped by noise)."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def marginal_rate(big: int, small: int, t_big: float, t_small: float) -> float:
    """Steps/s of the steps the big run has beyond the small one; NaN when noise swamps the difference."""
    dt = t_big - t_small
    return (big - small) / dt if dt > 0 else math.nan


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of fn(); collects first so one run's garbage is not freed on the next one's clock."""
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rotated(items: list[Competitor], r: int) -> list[Competitor]:
    """Another competitor goes first each repeat, so none always runs right after the same neighbour."""
    r %= len(items)
    return items[r:] + items[:r]


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, of this process and its children) since boot / start.

    Their difference over a stretch of time is what other programs took: the load average cannot tell
    our own threads (TF's pool, the sink's writer) from someone else's test suite.
    """
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return busy, sum(u.ru_utime + u.ru_stime for u in usages)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --- progress lines and numbers ----------------------------------------------------------------------
def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if math.isfinite(x) else "n/a"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if math.isfinite(x) else "n/a"
