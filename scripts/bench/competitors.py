"""The four ways of running one job. Each draws its batches from the trainer's own `epoch_order`, not a copy.

Every `run_*` takes (context, steps) and returns the wall seconds of the whole job: model build, tracing
and opening the store included, so that the marginal rate over two step counts cancels them.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
import time
from collections.abc import Callable

import keras
import mlflow
import tensorflow as tf
from mlflow.tracking import MlflowClient

from bench.harness import (
    BenchError,
    Competitor,
    JobContext,
    Plan,
    Store,
    compose,
    fresh_model,
    fresh_optimizer,
    new_store,
    timed,
)
from trainer.config import build
from trainer.loop import MIN_EPOCH_FOR_CUTS, epoch_order
from trainer.train import train

FUSED_FIT_SPE = 100  # keras-fit with our fused optimizer, at one spe: how much of ours' lead is the optimizer
FUSED_FIT = f"keras-fit+fused spe={FUSED_FIT_SPE}"
BARE_STEPS_PER_CALL = 1000  # large enough that the one Python call per chunk is noise


def entrants(plan: Plan) -> list[Competitor]:
    """The sweep's field: naive, keras-fit at each spe (and once with our optimizer), bare, ours."""
    fits = [Competitor(f"keras-fit spe={spe}", keras_fit(spe), plan.steps, plan.small) for spe in plan.spes]
    fits.append(Competitor(FUSED_FIT, keras_fit(FUSED_FIT_SPE, stock=False), plan.steps, plan.small))
    return [
        Competitor("naive", run_naive, plan.naive_steps, plan.naive_small),
        *fits,
        Competitor("bare", run_bare, plan.steps, plan.small),
        Competitor("ours", run_ours, plan.steps, plan.small),
    ]


def finalists(plan: Plan, best_spe: int) -> list[Competitor]:
    """The final race: Keras at the sweep's best spe, bare and ours, so that best's rate is measured afresh."""
    return [
        Competitor("keras-fit best", keras_fit(best_spe), plan.steps, plan.small),
        Competitor("bare", run_bare, plan.steps, plan.small),
        Competitor("ours", run_ours, plan.steps, plan.small),
    ]


# --- naive -------------------------------------------------------------------------------------------
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


# --- keras-fit ---------------------------------------------------------------------------------------
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


# --- bare --------------------------------------------------------------------------------------------
def run_bare(ctx: JobContext, steps: int) -> float:
    """Our loop with nothing of ours around it: no metrics, no sink, no store; the last loss comes back."""
    return timed(lambda: bare_loop(ctx, steps))


def plain_update(model, loss_fn, optimizer, variables, xb: tf.Tensor, yb: tf.Tensor) -> tf.Tensor:
    """One GradientTape step, nothing else: bare's step."""
    with tf.GradientTape() as tape:
        loss = loss_fn(yb, model(xb, training=True))
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
    return loss


def bare_loop(ctx: JobContext, steps: int, update: Callable = plain_update) -> float:
    """`update(model, loss_fn, optimizer, variables, x, y) -> loss`: the step, hand-written (bench --step: SAM)."""
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
            loss = update(model, loss_fn, optimizer, variables, tf.gather(x, idx), tf.gather(y, idx))
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


# --- ours --------------------------------------------------------------------------------------------
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
