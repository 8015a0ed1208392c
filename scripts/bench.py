"""Side-by-side training speed of one job run four ways, in one process, interleaved.

    python scripts/bench.py                      # jobs mlp, tape, wide; 3 repeats
    python scripts/bench.py --jobs mlp --json bench.json
    python scripts/bench.py --quick --jobs tape  # a smoke run: tiny step counts, numbers not meaningful

Every competitor gets the same model (built from the job's config with the trainer's seed), data, batch order
(the trainer's per-epoch shuffle), loss and optimizer:
  naive      the hand-written eager GradientTape loop; `mlflow.log_metric` for loss and grad norm every step
  keras-fit  `model.compile(...)` + `model.fit(...)`, no callbacks, verbose=0, each steps_per_execution
  bare       a tf.function running K steps per call, no metrics at all: the limit for our loop
  ours       `trainer.train.train(cfg)` on a Hydra-composed config, every step logged to a SQLite store

Two races: the sweep runs everyone (Keras at each steps_per_execution); the final race runs only the best
spe, bare and ours, so the best spe's rate is not the luckiest of five noisy medians (the winner's curse).
The ratios to keras-fit best and bare come from the final race. Rates are marginal: (N - n) / (T(N) - T(n)),
T the wall time of the whole call (model build, tracing and opening the store included), so fixed costs
cancel and what is left is the cost of one more step. Keras runs its own optimizer class; bare and ours
run trainer.optim's (the same arithmetic, fused): `keras-fit+fused` shows Keras with ours.
`--sink` measures instead what writing every step's points to the store adds to a 20,000-step run.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")  # MLflow's git probe, silent in a temp dir

import argparse
import contextlib
import gc
import io
import json
import logging
import math
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

import trainer.config
from trainer.config import build
from trainer.data import Dataset
from trainer.loop import MIN_EPOCH_FOR_CUTS
from trainer.optim import build_optimizer
from trainer.train import train

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENT = "bench"
SPE_CHOICES = (1, 10, 50, 100, 200)  # Keras steps_per_execution values tried; the best one is reported
QUICK_SPE_CHOICES = (1, 50)  # --quick: both of fit's code paths (one step per call, a while_loop of them)
STOCK = {"trainer.optim.Adam": "keras.optimizers.Adam", "trainer.optim.AdamW": "keras.optimizers.AdamW"}
FUSED_FIT_SPE = 100  # keras-fit with our fused optimizer, at one spe: how much of ours' lead is the optimizer
FUSED_FIT = f"keras-fit+fused spe={FUSED_FIT_SPE}"
BARE_STEPS_PER_CALL = 1000  # large enough that the one Python call per chunk is noise
CLI_STEPS = 3
SINK_STEPS = 20_000  # --sink: the "100,000 points into a 20,000-step run of (a)"
SINK_POINTS, SINK_TARGET = 100_000, 0.05
OTHERS_CPU_WARN = 0.1  # above this share of the CPUs taken by other programs the rates are not comparable
# Ours as a user runs it, less what only adds fixed cost or noise: the model file (written after training)
# and the progress bar (drawn between chunks). Both would cancel in the marginal rate anyway.
OURS_OVERRIDES = [
    "tracking.log_every=1",
    "tracking.log_grad_norms=per_variable",
    "tracking.log_model=false",
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
}
QUICK_STEPS = {"mlp": (200, 20), "tape": (200, 20), "wide": (20, 10)}  # (steps, naive_steps) for --quick

# (job, competitor, minimum of ours / competitor): what the issue asks of the trainer.
TARGETS = (
    ("mlp", "keras-fit best", 1.5),
    ("mlp", "bare", 0.9),
    ("wide", "keras-fit best", 0.97),
    ("mlp", "naive", 50.0),
)


class BenchError(Exception):
    """The trainer did not do the job asked of it (a step missing from the store): not a timing problem."""


@dataclass
class Store:
    """A fresh SQLite MLflow store in its own temp dir, holding the bench experiment."""

    uri: str
    experiment_id: str
    dir: Path


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


@dataclass
class Competitor:
    name: str
    run: Callable[[JobContext, int], float]  # (context, steps) -> wall seconds of the whole job
    big: int  # N
    small: int  # n: the run subtracted so that start-up cancels
    seconds: dict[int, list[float]] = field(default_factory=dict)

    def rates(self) -> list[float]:
        """Marginal steps/s of each repeat, pairing its N and n runs."""
        pairs = zip(self.seconds[self.big], self.seconds[self.small], strict=True)
        return [marginal_rate(self.big, self.small, t_big, t_small) for t_big, t_small in pairs]

    def median(self) -> float:
        rates = [r for r in self.rates() if math.isfinite(r)]
        return statistics.median(rates) if rates else math.nan


@dataclass
class JobResult:
    job: str
    about: str
    plan: dict[str, Any]  # the Plan, with its n (small) and naive n
    rates: dict[str, float]  # competitor -> median marginal steps/s (keras-fit best, bare, ours: final race)
    sweep_rates: dict[str, float]  # every competitor in the first race, the spe sweep
    repeats: dict[str, list[float]]  # competitor -> marginal steps/s of each repeat
    seconds: dict[str, dict[str, list[float]]]  # competitor -> steps -> wall seconds of each run
    best_spe: int
    ratios: dict[str, float]  # competitor -> ours / competitor
    ours_loop_rate: float  # ours' own perf/steps_per_sec: the loop only, not waiting for the sink
    ours_tail_s: dict[str, float]  # N and n: median seconds from ours' last step to train() returning
    first_loss: dict[str, float]  # step-0 loss of bare and ours: equal when the job really is the same
    cli: dict[str, float]  # `python -m trainer`: launch -> step 0 done, its peak RSS
    others_cpu: float  # share of the machine's CPU time other programs took during the repeats (0..1)


# --- timing ------------------------------------------------------------------------------------------
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


# --- the job, shared by every competitor -------------------------------------------------------------
def compose(job: Job, steps: int, uri: str, extra: Sequence[str] = ()) -> DictConfig:
    """The config exactly as the CLI composes it from these overrides."""
    overrides = [*job.overrides.split(), *OURS_OVERRIDES, f"trainer.max_steps={steps}", f"tracking.uri={uri}", *extra]
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="bench"):
        return hydra.compose(config_name="config", overrides=overrides)


def fresh_model(ctx: JobContext) -> keras.Model:
    """The trainer's model for the job, with the weights train() starts from: same seed, built alike."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(ctx.seed)
    model = build(ctx.cfg.model)
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


def epoch_order(n: int, seed: int, epoch: tf.Tensor | int) -> tf.Tensor:
    """The trainer's shuffle (loop.py), a stateless shuffle seeded by (seed, epoch): one order for all."""
    pair = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.experimental.stateless_shuffle(tf.range(n), seed=pair)


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


# --- the competitors ---------------------------------------------------------------------------------
def run_naive(ctx: JobContext, steps: int) -> float:
    """A first GradientTape loop as people write it: eager steps, two `log_metric` calls (commits) each."""
    store = new_store(ctx.workdir)
    mlflow.set_tracking_uri(store.uri)
    return timed(lambda: naive_loop(ctx, steps, store.experiment_id))


def naive_loop(ctx: JobContext, steps: int, experiment_id: str) -> None:
    model, loss_fn = fresh_model(ctx), build(ctx.cfg.loss)
    optimizer = fresh_optimizer(ctx, steps, stock=True)
    x, y = tf.constant(ctx.data.x_train), tf.constant(ctx.data.y_train)
    n, b = len(ctx.data.x_train), ctx.batch
    per_epoch = n // b
    with mlflow.start_run(experiment_id=experiment_id):
        for step in range(steps):
            epoch, pos = divmod(step, per_epoch)
            if pos == 0:
                order = epoch_order(n, ctx.seed, epoch)
            idx = order[pos * b : (pos + 1) * b]
            xb, yb = tf.gather(x, idx), tf.gather(y, idx)
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            mlflow.log_metric("train/loss", float(loss), step=step)
            mlflow.log_metric("train/grad_norm", float(tf.linalg.global_norm(grads)), step=step)


def keras_fit(spe: int, stock: bool = True) -> Callable[[JobContext, int], float]:
    """Keras fit at one steps_per_execution; everything else left at its defaults, Keras' own optimizer."""

    def run(ctx: JobContext, steps: int) -> float:
        def job() -> None:
            model = fresh_model(ctx)
            optimizer, loss_fn = fresh_optimizer(ctx, steps, stock), build(ctx.cfg.loss)
            model.compile(optimizer=optimizer, loss=loss_fn, steps_per_execution=spe)
            model.fit(shuffled_batches(ctx, steps), epochs=1, steps_per_epoch=steps, verbose=0)

        return timed(job)

    return run


def shuffled_batches(ctx: JobContext, steps: int) -> tf.data.Dataset:
    """Exactly `steps` batches in the trainer's order, gathered by index as Keras' array adapter does.

    A dataset, not `fit(x, y, epochs=...)`: with arrays a Keras epoch is one pass over the data, so the
    one-example tape job would pay fit's per-epoch overhead every step, and no N is a whole number of
    epochs for every job. The arrays ride along via `from_tensors(...).repeat()`, not baked into a graph.
    """
    n, b = len(ctx.data.x_train), ctx.batch
    per_epoch = n // b

    def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
        order = epoch_order(n, ctx.seed, epoch)[: per_epoch * b]
        return tf.data.Dataset.from_tensor_slices(tf.reshape(order, [per_epoch, b]))

    indices = tf.data.Dataset.range(-(-steps // per_epoch)).flat_map(epoch_batches).take(steps)
    arrays = tf.data.Dataset.from_tensors((ctx.data.x_train, ctx.data.y_train)).repeat()
    pairs = tf.data.Dataset.zip(indices, arrays)
    return pairs.map(lambda i, xy: (tf.gather(xy[0], i), tf.gather(xy[1], i))).prefetch(tf.data.AUTOTUNE)


def run_bare(ctx: JobContext, steps: int) -> float:
    """Our loop with nothing of ours around it: no metrics, no sink, no store; the last loss comes back."""
    return timed(lambda: bare_loop(ctx, steps))


def bare_loop(ctx: JobContext, steps: int) -> float:
    model, loss_fn = fresh_model(ctx), build(ctx.cfg.loss)
    optimizer = fresh_optimizer(ctx, steps)
    variables = model.trainable_variables
    optimizer.build(variables)
    x, y = tf.constant(ctx.data.x_train), tf.constant(ctx.data.y_train)
    n, b, seed = len(ctx.data.x_train), ctx.batch, ctx.seed
    per_epoch = n // b
    step = tf.Variable(0, dtype=tf.int32, trainable=False)
    order = tf.Variable(epoch_order(n, seed, 0), trainable=False)

    cut = per_epoch >= MIN_EPOCH_FOR_CUTS  # as ours: calls end at epoch boundaries, the shuffle before the loop

    def new_epoch_order() -> None:
        if step % per_epoch == 0:
            order.assign(epoch_order(n, seed, step // per_epoch))

    @tf.function
    def chunk(k: tf.Tensor) -> tf.Tensor:
        loss = tf.constant(0.0)
        if cut:
            new_epoch_order()
        for _ in tf.range(k):
            if not cut:
                new_epoch_order()
            pos = step % per_epoch
            idx = order[pos * b : pos * b + b]
            with tf.GradientTape() as tape:
                loss = loss_fn(tf.gather(y, idx), model(tf.gather(x, idx), training=True))
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
            step.assign_add(1)
        return loss

    done, last = 0, tf.constant(0.0)
    while done < steps:
        k = min(BARE_STEPS_PER_CALL, steps - done, per_epoch - done % per_epoch if cut else steps)
        last = chunk(tf.constant(k, tf.int32))  # a tensor count: one trace serves the short last chunk too
        done += k
    return float(last)  # the one host sync; it also waits for the last chunk


def bare_first_loss(ctx: JobContext) -> float:
    """Loss of the fresh model on the trainer's first batch: what ours must have logged at step 0."""
    model, loss_fn = fresh_model(ctx), build(ctx.cfg.loss)
    idx = epoch_order(len(ctx.data.x_train), ctx.seed, 0)[: ctx.batch]
    x, y = tf.gather(ctx.data.x_train, idx), tf.gather(ctx.data.y_train, idx)
    return float(loss_fn(y, model(x, training=True)))


def run_ours(ctx: JobContext, steps: int) -> float:
    """train(cfg) as the CLI calls it; then the store is read back: every step's loss must be there."""
    store = new_store(ctx.workdir)
    cfg = compose(ctx.job, steps, store.uri)
    keras.backend.clear_session()
    out = io.StringIO()  # its summary line each run (and the tape example's gradient printout)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            seconds = timed(lambda: train(cfg, output_dir=store.dir))
            ended = time.time()
    except Exception:
        sys.stderr.write(out.getvalue())
        raise
    ctx.logged.setdefault(steps, []).append(check_store(store, steps, ended))
    return seconds


def check_store(store: Store, steps: int, ended: float) -> dict[str, float]:
    """Every step's train/loss arrived once, in a FINISHED run; returns what the run says of itself.

    `tail_s`, from the last step's timestamp (its chunk's end) to train() returning, holds the final
    evaluation, checkpoint and the sink writing what it still had: if it grows with N, the sink lags.
    """
    client = MlflowClient(store.uri)
    runs = client.search_runs([store.experiment_id])
    if len(runs) != 1 or runs[0].info.status != "FINISHED":
        raise BenchError(f"expected one FINISHED run in {store.uri}, found {[r.info.status for r in runs]}")
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    got = sorted(m.step for m in history)
    if got != list(range(steps)):
        raise BenchError(f"{store.uri}: {len(history)} train/loss points for {steps} steps")
    return {
        "first_loss": next(m.value for m in history if m.step == 0),
        "steps_per_sec": runs[0].data.metrics.get("perf/steps_per_sec", math.nan),
        "tail_s": ended - max(m.timestamp for m in history) / 1000,
    }


# --- start-up, as a user meets it --------------------------------------------------------------------
@dataclass
class CliRun:
    """`python -m trainer` in a fresh process, for the seconds from launch until step 0 is done.

    Step 0's time is read from the store: with one step per chunk the sink stamps it with the time its
    compiled call returned (tracing included). The store exists already, as it does after a first run.
    """

    store: Store
    proc: subprocess.Popen
    t0: float

    @classmethod
    def start(cls, ctx: JobContext) -> CliRun:
        store = new_store(ctx.workdir)
        overrides = [*ctx.job.overrides.split(), *OURS_OVERRIDES, f"tracking.uri={store.uri}"]
        overrides += [f"hydra.run.dir={store.dir / 'hydra'}", f"trainer.max_steps={CLI_STEPS}"]
        command = [sys.executable, "-m", "trainer", *overrides, "trainer.steps_per_loop=1"]
        env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
        with (store.dir / "cli.log").open("w") as log:
            t0 = time.time()
            proc = subprocess.Popen(command, cwd=store.dir, stdout=log, stderr=log, env=env)
        return cls(store, proc, t0)

    def result(self) -> dict[str, float]:
        """Waits for it; its own peak RSS (wait4: this child's rusage, not the max over all children)."""
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        if self.proc.returncode != 0:
            tail = (self.store.dir / "cli.log").read_text()[-3000:]
            raise BenchError(f"python -m trainer failed ({self.proc.returncode}):\n{tail}")
        client = MlflowClient(self.store.uri)
        (run,) = client.search_runs([self.store.experiment_id])
        step0 = min(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
        return {"first_step_s": step0.timestamp / 1000 - self.t0, "peak_rss_mb": usage.ru_maxrss / 1024}


# --- one job -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How one job is measured: the step counts, repeats and Keras' spe values."""

    steps: int
    naive_steps: int
    repeats: int
    spes: tuple[int, ...]
    quick: bool  # no warm-up runs, and the CLI start-up runs alongside the rest: a smoke run, not a measure

    @property
    def warm_up(self) -> bool:
        return not self.quick

    @property
    def cli_alongside(self) -> bool:
        return self.quick

    @property
    def small(self) -> int:
        return max(self.steps // 5, 2)

    @property
    def naive_small(self) -> int:
        return max(self.naive_steps // 5, 2)


def competitors(plan: Plan) -> list[Competitor]:
    fits = [Competitor(f"keras-fit spe={spe}", keras_fit(spe), plan.steps, plan.small) for spe in plan.spes]
    fits.append(Competitor(FUSED_FIT, keras_fit(FUSED_FIT_SPE, stock=False), plan.steps, plan.small))
    return [
        Competitor("naive", run_naive, plan.naive_steps, plan.naive_small),
        *fits,
        Competitor("bare", run_bare, plan.steps, plan.small),
        Competitor("ours", run_ours, plan.steps, plan.small),
    ]


def rotated(items: list[Competitor], r: int) -> list[Competitor]:
    """Another competitor goes first each repeat, so none always runs right after the same neighbour."""
    r %= len(items)
    return items[r:] + items[:r]


def measure_job(job: Job, plan: Plan, workdir: Path) -> JobResult:
    """Warm each kind of run up once, then A B C ... `repeats` times, each one's N and n back to back."""
    cfg = compose(job, plan.steps, "sqlite:///unused.db")  # the others take model, data, loss, optimizer
    trainer.config.check(cfg)
    ctx = JobContext(job, cfg, build(cfg.data), workdir)
    log(f"{job.name}: {job.about}; N={plan.steps} (naive {plan.naive_steps}), {plan.repeats} repeat(s)")
    cli = CliRun.start(ctx)
    if not plan.cli_alongside:
        cli_result = cli.result()  # alone: nothing else on the CPU while it starts up
    entrants = competitors(plan)
    for c in entrants:
        c.seconds = {c.big: [], c.small: []}
        if plan.warm_up and c.name in ("naive", "keras-fit spe=1", "bare", "ours"):  # one per kind of run
            c.run(ctx, c.small)  # first-call costs (imports, kernels, store engines) land on no clock
    ctx.logged.clear()
    busy0, own0, t0 = *cpu_seconds(), time.perf_counter()
    race(ctx, entrants, plan.repeats, "sweep")
    # The best of five noisy medians is biased upwards (the winner's curse): the spe is picked on the
    # sweep, and its rate, bare's and ours' come from a second race of just those three.
    best_spe = pick_spe({c.name: c.median() for c in entrants}, plan)
    finalists = [
        Competitor("keras-fit best", keras_fit(best_spe), plan.steps, plan.small),
        Competitor("bare", run_bare, plan.steps, plan.small),
        Competitor("ours", run_ours, plan.steps, plan.small),
    ]
    for c in finalists:
        c.seconds = {c.big: [], c.small: []}
    race(ctx, finalists, plan.repeats, f"final (keras-fit spe={best_spe})")
    if plan.cli_alongside:
        cli_result = cli.result()  # waited for first, so its CPU time counts as ours, not as others'
    busy, own = cpu_seconds()
    others = max(busy - busy0 - (own - own0), 0.0) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))
    return summarize(ctx, plan, entrants, finalists, best_spe, cli_result, others)


def race(ctx: JobContext, entrants: list[Competitor], repeats: int, label: str) -> None:
    """A B C ... `repeats` times, each one's N and n back to back, their order alternating."""
    for r in range(repeats):
        for c in rotated(entrants, r):
            for s in (c.big, c.small) if r % 2 == 0 else (c.small, c.big):
                c.seconds[s].append(c.run(ctx, s))
        log(f"  {label} {r + 1}: " + ", ".join(f"{c.name} {fmt_rate(c.rates()[-1])}" for c in entrants))


def pick_spe(rates: dict[str, float], plan: Plan) -> int:
    fits = {spe: rates[f"keras-fit spe={spe}"] for spe in plan.spes}
    return max(fits, key=lambda spe: fits[spe] if math.isfinite(fits[spe]) else -1.0)


def summarize(
    ctx: JobContext,
    plan: Plan,
    entrants: list[Competitor],
    finalists: list[Competitor],
    best_spe: int,
    cli: dict[str, float],
    others_cpu: float,
) -> JobResult:
    """Ratios to keras-fit best and bare from the final race; to the rest from the sweep (ours' sweep rate)."""
    sweep = {c.name: c.median() for c in entrants}
    final = {c.name: c.median() for c in finalists}
    rates = {**sweep, **final}
    ratios = {name: sweep["ours"] / sweep[name] for name in ("keras-fit spe=1", FUSED_FIT, "naive")}
    ratios |= {name: final["ours"] / final[name] for name in ("keras-fit best", "bare")}
    logged = ctx.logged[plan.steps]
    return JobResult(
        job=ctx.job.name,
        about=ctx.job.about,
        plan={**asdict(plan), "small": plan.small, "naive_small": plan.naive_small},
        rates=rates,
        sweep_rates=sweep,
        repeats={c.name: c.rates() for c in [*entrants, *finalists]},  # finalists' names win
        seconds={c.name: {str(k): v for k, v in c.seconds.items()} for c in [*entrants, *finalists]},
        best_spe=best_spe,
        ratios=ratios,
        ours_loop_rate=statistics.median(x["steps_per_sec"] for x in logged),
        ours_tail_s={str(k): statistics.median(x["tail_s"] for x in v) for k, v in ctx.logged.items()},
        first_loss={"bare": bare_first_loss(ctx), "ours": logged[0]["first_loss"]},
        cli=cli,
        others_cpu=others_cpu,
    )


# --- what the store costs ----------------------------------------------------------------------------
@dataclass
class SinkResult:
    """ours on one job, writing every step's points vs (almost) none; paired per repeat."""

    job: str
    steps: int
    repeats: int
    arms: dict[str, dict[str, Any]]  # grad-norm mode -> points written, seconds of each arm, overhead per pair


def measure_sink(job: Job, steps: int, repeats: int, workdir: Path) -> SinkResult:
    """What writing the points adds to a run: the same train(cfg) with log_every=1 and log_every=steps.

    Both arms compute every metric on the device and hand every chunk to the sink; log_every=steps keeps
    one step of them, so the difference is the store's share: rows built, SQLite inserts and index
    upkeep, the writer threads' CPU. Each repeat runs the arms back to back (order alternating); the
    overhead is the median over repeats of T(every step) / T(one step) - 1.
    """
    arms = {(norms, every) for norms in ("global", "per_variable") for every in (1, steps)}
    order = sorted(arms)
    seconds: dict[tuple[str, int], list[float]] = {arm: [] for arm in order}
    points: dict[tuple[str, int], int] = {}
    log(f"sink: {job.name}, {steps} steps, {repeats} repeat(s), arms {order}")
    sink_run(job, max(steps // 20, 10), ("global", 1), workdir)  # first-call costs land on no clock
    for r in range(repeats):
        for arm in order if r % 2 == 0 else order[::-1]:
            seconds[arm].append(sink_run(job, steps, arm, workdir, points))
        log(f"  repeat {r + 1}: " + ", ".join(f"{n} every {e}: {seconds[n, e][-1]:.2f} s" for n, e in order))
    result = {}
    for norms in ("global", "per_variable"):
        on, off = seconds[norms, 1], seconds[norms, steps]
        pairs = [a / b - 1 for a, b in zip(on, off, strict=True)]
        result[norms] = {
            "points": points[norms, 1],
            "points_quiet": points[norms, steps],
            "seconds_every_step": on,
            "seconds_one_step": off,
            "overhead": pairs,
            "median_overhead": statistics.median(pairs),
        }
    return SinkResult(job.name, steps, repeats, result)


def sink_run(
    job: Job, steps: int, arm: tuple[str, int], workdir: Path, points: dict[tuple[str, int], int] | None = None
) -> float:
    """One train(cfg) on a fresh store; the seconds it took, and (into `points`) the rows the store holds."""
    norms, every = arm
    store = new_store(workdir)
    cfg = compose(job, steps, store.uri, [f"tracking.log_grad_norms={norms}", f"tracking.log_every={every}"])
    keras.backend.clear_session()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        seconds = timed(lambda: train(cfg, output_dir=store.dir))
    if points is not None:
        points[arm] = count_points(store, steps, every)
    return seconds


def count_points(store: Store, steps: int, every: int) -> int:
    """Metric rows of the store's one run; every logged step must have its train/loss point."""
    client = MlflowClient(store.uri)
    (run,) = client.search_runs([store.experiment_id])
    logged = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    if logged != set(range(0, steps, every)):
        raise BenchError(f"{store.uri}: train/loss at {len(logged)} steps, expected every {every}-th of {steps}")
    with contextlib.closing(sqlite3.connect(store.dir / "mlflow.db")) as db:
        return db.execute("SELECT COUNT(*) FROM metrics WHERE run_uuid = ?", (run.info.run_id,)).fetchone()[0]


def sink_report(result: SinkResult) -> list[tuple[bool, str]]:
    out = Console(width=None if sys.stdout.isatty() else 200)
    t = Table(title=f"what the store adds to a {result.steps:,}-step run of {result.job}", title_justify="left")
    for col in ("grad norms", "points written", "s, every step logged", "s, one step logged", "overhead (median)"):
        t.add_column(col, justify="right")
    for norms, arm in result.arms.items():
        t.add_row(
            norms,
            f"{arm['points']:,} (vs {arm['points_quiet']:,})",
            ", ".join(f"{x:.2f}" for x in arm["seconds_every_step"]),
            ", ".join(f"{x:.2f}" for x in arm["seconds_one_step"]),
            f"{arm['median_overhead']:+.1%}",
        )
    out.print(t)
    checks = []
    for norms, arm in result.arms.items():
        if arm["points"] >= SINK_POINTS:
            ok = arm["median_overhead"] < SINK_TARGET
            got = arm["median_overhead"]
            line = f"{result.job}: {arm['points']:,} points ({norms}) add < {SINK_TARGET:.0%}: {got:+.1%}"
            checks.append((ok, line))
            out.print(f"{'PASS' if ok else 'MISS'} {line}", highlight=False)
    return checks


# --- report ------------------------------------------------------------------------------------------
def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if math.isfinite(x) else "n/a"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if math.isfinite(x) else "n/a"


def table(results: list[JobResult]) -> Table:
    title = "steps/s, marginal: (N - n) / (T(N) - T(n)), median over repeats; best, bare, ours: the final race"
    t = Table(title=title, title_justify="left")
    t.add_column("job")
    for col in ("naive", "keras-fit spe=1", "keras-fit best", "bare", "ours", "ours/keras best"):
        t.add_column(col, justify="right")
    for col in ("ours/bare", "ours/naive", "CLI launch->step 0 (s)", "CLI peak RSS (MB)"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(
            r.job,
            fmt_rate(r.rates["naive"]),
            fmt_rate(r.rates["keras-fit spe=1"]),
            f"{fmt_rate(r.rates['keras-fit best'])} (spe={r.best_spe})",
            fmt_rate(r.rates["bare"]),
            fmt_rate(r.rates["ours"]),
            fmt_ratio(r.ratios["keras-fit best"]),
            fmt_ratio(r.ratios["bare"]),
            fmt_ratio(r.ratios["naive"]),
            f"{r.cli['first_step_s']:.1f}",
            f"{r.cli['peak_rss_mb']:,.0f}",
        )
    return t


def notes(results: list[JobResult]) -> Iterator[str]:
    """Per job: the Keras spe sweep, ours' self-reported loop rate, and whether bare and ours start alike."""
    for r in results:
        p = r.plan
        sweep = ", ".join(f"{spe}: {fmt_rate(r.rates[f'keras-fit spe={spe}'])}" for spe in p["spes"])
        bare, ours = r.first_loss["bare"], r.first_loss["ours"]
        same = "same" if math.isclose(bare, ours, rel_tol=1e-4, abs_tol=1e-6) else "DIFFERENT"
        counts = f"N={p['steps']}, n={p['small']} (naive {p['naive_steps']}, {p['naive_small']})"
        yield f"{r.job}: {counts}, {p['repeats']} repeat(s); keras-fit by spe: {sweep}"
        fused = f"{fmt_rate(r.rates[FUSED_FIT])} (ours / it: {fmt_ratio(r.ratios[FUSED_FIT])})"
        yield f"  keras-fit with trainer.optim's fused optimizer (not Keras' own), spe={FUSED_FIT_SPE}: {fused}"
        loop = fmt_rate(r.ours_loop_rate)
        tails = ", ".join(f"{t:.2f} s at {k} steps" for k, t in r.ours_tail_s.items())
        yield f"  ours' own perf/steps_per_sec (its loop alone, not waiting for the sink): {loop}"
        yield f"  ours from its last step to train() returning (eval, checkpoint, sink flush): {tails}"
        yield f"  step-0 loss: bare {bare:.6g}, ours (read from the store) {ours:.6g}: {same}"
        spread = "; ".join(f"{k} {', '.join(map(fmt_rate, r.repeats[k]))}" for k in ("keras-fit best", "bare", "ours"))
        yield f"  final race, per repeat: {spread}"
        sw = r.sweep_rates
        yield f"  the sweep's own medians: bare {fmt_rate(sw['bare'])}, ours {fmt_rate(sw['ours'])}"
        busy = r.others_cpu > OTHERS_CPU_WARN
        warn = "; WARNING: they competed with every run, the rates are noisy" if busy else ""
        yield f"  other programs took {r.others_cpu:.0%} of the CPUs during the repeats{warn}"


def targets(results: list[JobResult]) -> Iterator[tuple[bool, str]]:
    by_job = {r.job: r for r in results}
    for job, other, minimum in TARGETS:
        if job in by_job:
            got = by_job[job].ratios[other]
            yield got >= minimum, f"{job}: ours >= {minimum:g}x {other}: {fmt_ratio(got)}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", default="mlp,tape,wide", help=f"comma-separated, of {', '.join(JOBS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, help="N for keras-fit, bare and ours (default: per job)")
    p.add_argument("--naive-steps", type=int, help="N for naive (default: per job)")
    p.add_argument("--quick", action="store_true", help="tiny N, one repeat: a smoke run, not a measurement")
    p.add_argument("--json", type=Path, help="write every measurement here")
    p.add_argument(
        "--sink",
        action="store_true",
        help=f"instead: what writing every step's points adds to a run (first job; --steps, default {SINK_STEPS})",
    )
    p.add_argument(
        "--threads",
        metavar="INTRA,INTER",
        help="TensorFlow's thread pools for every competitor (ours via trainer.intra_op/inter_op_threads)",
    )
    args = p.parse_args(argv)
    args.jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    unknown = [j for j in args.jobs if j not in JOBS]
    if unknown:
        p.error(f"unknown job {unknown[0]!r}: choose from {', '.join(JOBS)}")
    if args.quick:
        args.repeats = 1
    if args.threads:
        try:
            args.threads = tuple(int(n) for n in args.threads.split(","))
            assert len(args.threads) == 2 and min(args.threads) >= 1
        except (ValueError, AssertionError):
            p.error(f"--threads {args.threads!r}: give two integers >= 1, INTRA,INTER, e.g. 1,2")
    return args


def plan_for(name: str, args: argparse.Namespace) -> Plan:
    job = JOBS[name]
    steps, naive_steps = QUICK_STEPS[name] if args.quick else (job.steps, job.naive_steps)
    spes = QUICK_SPE_CHOICES if args.quick else SPE_CHOICES
    return Plan(args.steps or steps, args.naive_steps or naive_steps, args.repeats, spes, args.quick)


def report(results: list[JobResult], args: argparse.Namespace) -> list[tuple[bool, str]]:
    out = Console(width=None if sys.stdout.isatty() else 200)
    out.print(table(results))
    for line in notes(results):
        out.print(line, highlight=False)
    out.print(
        f"peak RSS of this process (every competitor, every job): {peak_rss_mb():,.0f} MB. CLI columns: a "
        f"separate `python -m trainer` of {CLI_STEPS} steps, launch to step 0 done, store already created.",
        highlight=False,
    )
    checks = list(targets(results))
    caveat = " (--quick: not meaningful)" if args.quick else ""
    for ok, line in checks:
        out.print(f"{'PASS' if ok else 'MISS'} {line}{caveat}", highlight=False)
    return checks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("mlflow", "alembic", "absl", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)  # store creation and tf.function retrace notices
    warnings.filterwarnings("ignore", message=".*shuffle=True.*")  # fit's default, moot for a dataset
    trainer.config.register()
    if args.threads:  # before anything starts TensorFlow; ours gets the same through its config
        tf.config.threading.set_intra_op_parallelism_threads(args.threads[0])
        tf.config.threading.set_inter_op_parallelism_threads(args.threads[1])
        intra, inter = args.threads
        OURS_OVERRIDES.extend([f"trainer.intra_op_threads={intra}", f"trainer.inter_op_threads={inter}"])
    if args.sink:
        return sink_main(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        template_store(Path(tmp))
        for name in args.jobs:
            results.append(measure_job(JOBS[name], plan_for(name, args), Path(tmp)))
    checks = report(results, args)
    if args.json:
        meta = {
            "argv": sys.argv,
            "quick": args.quick,
            "repeats": args.repeats,
            "cpus": os.cpu_count(),
            "versions": {m.__name__: m.__version__ for m in (tf, keras, mlflow, np)},
            "peak_rss_mb": peak_rss_mb(),
            "threads": {
                "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
            },
        }
        payload = {"meta": meta, "jobs": [asdict(r) for r in results], "targets": checks}
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


def sink_main(args: argparse.Namespace) -> int:
    job = JOBS[args.jobs[0]]
    steps = args.steps or (QUICK_STEPS[job.name][0] if args.quick else SINK_STEPS)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        template_store(Path(tmp))
        result = measure_sink(job, steps, args.repeats, Path(tmp))
    checks = sink_report(result)
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, "sink": asdict(result), "targets": checks}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
