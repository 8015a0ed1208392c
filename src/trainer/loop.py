"""The compiled GradientTape step and the K-step chunk that runs it.

`train_step` is only the step (tape, loss, gradients, clip, apply). `run(k)` calls one compiled function
that runs k steps in a `tf.range` loop and writes each step's loss, learning rate and per-variable
squared gradient norms as one row of a buffer variable, so a chunk costs one Python call and hands back
length-k tensors; nothing in it touches the host. k is passed as a tensor, so one trace serves every
chunk, the short last one included (as Orbit's controller does). Batches are gathered by index from
tensors held on the device, reshuffled each epoch with a stateless seed of (seed, epoch): the data
position is a pure function of the step.

On a CPU each op of the step costs a microsecond or two of executor time whatever its size, so the step
carries only what must happen per step: the norms' square roots and sums are taken once per chunk, over
the whole [k, n_variables] array, and a new epoch's order is drawn before the loop, not tested for in
every step. Measured on a 2-core CPU, MLP 32-64-64-1 at ~230 us a step: a TensorArray write per step cost
~30 us (a row assigned into a preallocated variable: ~2 us); a `tf.cond` in the body ~20 us.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from trainer.inputs import MAX_ROWS, MIN_EPOCH_FOR_CUTS, ArrayInput, StreamInput, epoch_order, reading
from trainer.metrics import Metrics, eval_batch, metrics_over_arrays, metrics_over_dataset

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
# The per-step outputs are named as their MLflow metrics. This one is [k, n_variables]: one column per
# variable, logged as `train/grad_norm_by_var/<variable path>`. Not `train/grad_norm/<path>`: MLflow's file
# store keeps a metric as a file named by its key, so `train/grad_norm` (the global norm) and a directory of
# that name cannot both exist (the per-variable points were lost: "Not a directory"). No metric name may be another's
# followed by "/". It stays under `train/`, the prefix of the per-step metrics (resume's clean-up, fit.py).
PER_VARIABLE = "train/grad_norm_by_var/"
__all__ = ["MAX_ROWS", "MIN_EPOCH_FOR_CUTS", "PER_VARIABLE", "StepLoop", "epoch_order"]


def variable_path(v: tf.Variable, model_name: str = "") -> str:
    """`dense_0/kernel`: the variable's path inside the model, the same in every run of a sweep.

    Keras 3 variables know their path (`mlp/dense_0/kernel`); the model's own name is dropped because
    Keras numbers it per process (`mlp_1` for the second model a multirun builds). Plain tf.Variables
    only have a name.
    """
    path = getattr(v, "path", None) or v.name.split(":")[0]
    return path.removeprefix(f"{model_name}/") if model_name else path


def distinct_names(names: list[str]) -> list[str]:
    """Variable paths as metric names no two of which clash: a repeated name, or one that is another's followed
    by "/" (plain tf.Variables are all `Variable` unless named; a variable `a` beside a layer `a`), gets
    `_<index>`, its position among the variables. A repeat would merge two variables' norms into one metric;
    a prefix breaks MLflow's file store."""
    taken = set(names)
    out: list[str] = []
    for i, name in enumerate(names):
        nested = any(other.startswith(f"{name}/") for other in taken)  # `a` beside `a/b`: `a` is renamed
        out.append(f"{name}_{i}" if name in out or nested else name)
    return out


# Autograph rewrites every function of ours a compiled call reaches (~50-160 ms each, at every start); these
# have no tensor-dependent `if` or loop (their branches test Python settings), so they are traced as written.
_plain_graph = tf.autograph.experimental.do_not_convert


class StepLoop:
    def __init__(
        self,
        model,
        loss_fn: LossFn,
        optimizer,
        x: np.ndarray | ArrayInput | StreamInput,
        y: np.ndarray | None,
        batch_size: int,
        *,
        seed: int = 0,
        clip_norm: float | None = None,
        grad_norms: str = "per_variable",
        on_nonfinite: str = "stop",
        accumulate_steps: int = 1,
        jit: bool = False,
        strategy: tf.distribute.Strategy | None = None,
    ):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        default = tf.distribute.get_strategy()  # outside any scope: the default (no-op) strategy
        self.strategy = strategy or default
        self.replicas = self.strategy.num_replicas_in_sync
        self.distributed = self.strategy is not default
        if self.distributed and (batch_size % self.replicas or accumulate_steps > 1 or on_nonfinite != "stop"):
            raise ValueError(
                f"with {self.replicas} replicas: batch_size must be a multiple of it, accumulate_steps 1 "
                "and on_nonfinite stop"
            )
        self.batch_size, self.seed, self.clip_norm, self.grad_norms = batch_size, seed, clip_norm, grad_norms
        self.on_nonfinite, self.accumulate_steps = on_nonfinite, accumulate_steps
        self.loss_scaling = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        # the input side (inputs.py): arrays held on the device, or a tf.data stream; x, y arrays are the former
        inputs = x if isinstance(x, ArrayInput | StreamInput) else None
        self.input = inputs or ArrayInput(x, y, batch_size, seed, accumulate_steps=accumulate_steps)
        if self.input.streamed and accumulate_steps > 1:
            raise ValueError("accumulate_steps > 1 needs data held in memory (data.in_memory=true)")
        self.n, self.steps_per_epoch = self.input.n, self.input.steps_per_epoch
        self.cut_at_epochs = self.input.cut_at_epochs
        with self.strategy.scope():
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")
            self.input.build()
            model(self.input.example(batch_size))  # build the variables before the first trace
            self.variables = list(model.trainable_variables)
            optimizer.build(self.variables)  # its slots exist before the trace: one trace, not two
        self.variable_names = distinct_names([variable_path(v, getattr(model, "name", "")) for v in self.variables])
        # Outside the strategy's scope: written and read only in cross-replica context, one copy is enough
        self._rows = tf.Variable(tf.zeros([MAX_ROWS, self._row_width()]), trainable=False, name="metric_rows")
        # jit: XLA compiles the forward and backward pass only; batch gathering, the optimizer's update and
        # the metric arrays stay in the ordinary graph (XLA around the whole chunk was far slower on CPUs)
        self._gradients = _compiled(self._loss_and_gradients, jit_compile=True) if jit else self._loss_and_gradients
        self._chunk = _compiled(self._run_stream_chunk if self.input.streamed else self._run_chunk)
        self._eval = _compiled(self._evaluate)
        self._eval_stream = _compiled(self._evaluate_stream)

    @property
    def x(self) -> tf.Tensor:
        """The training inputs held on the device, preprocessed (in-memory data only)."""
        return self.input.eval_arrays()[0]

    @property
    def y(self) -> tf.Tensor:
        return self.input.y

    @property
    def order(self) -> tf.Variable | None:
        return getattr(self.input, "order", None)

    # --- the step ------------------------------------------------------------------------------
    def train_step(self, batch: tf.Tensor) -> tf.Tensor:
        """One update from batch number `batch` (and the accumulate_steps - 1 after it).

        With on_nonfinite=skip_step a step whose loss or gradients are not finite leaves every variable
        untouched; with stop the chunk reports the step and the run ends there. With float16 loss
        scaling, overflowing gradients are the LossScaleOptimizer's business (it skips and lowers the
        scale), so only a non-finite loss counts; norms are always reported unscaled.
        """
        return self._update(*self._accumulated_gradients(batch))

    def _replica_step(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Under tf.distribute: this replica's share of the global batch, then the same update everywhere.

        Each replica's mean loss is divided by the replica count and the gradients summed across replicas,
        which gives the gradient of the global batch's mean loss; norms, clipping and the finite check then
        see that one aggregated gradient, the same on every replica.
        """
        ctx = tf.distribute.get_replica_context()
        share = self.batch_size // self.replicas
        start = ctx.replica_id_in_sync_group * share
        loss, grads = self._gradients(x[start : start + share], y[start : start + share])
        loss, grads = ctx.all_reduce(
            tf.distribute.ReduceOp.SUM, [loss / self.replicas, [g / self.replicas for g in grads]]
        )
        return self._update(loss, grads)

    @_plain_graph
    def _update(self, loss: tf.Tensor, grads: list[tf.Tensor]) -> tf.Tensor:
        """Apply the step; return its row: loss, learning rate, [skipped steps,] half squared norms."""
        unscaled = grads
        if self.loss_scaling:
            unscaled = [g / tf.cast(self.optimizer.dynamic_scale, g.dtype) for g in grads]
        # L2Loss is sum(g**2)/2 in one op per variable; square roots and sums wait for the chunk's end
        halves = [tf.nn.l2_loss(tf.cast(g, tf.float32)) for g in unscaled]
        row = [tf.cast(loss, tf.float32), tf.cast(self.optimizer.learning_rate, tf.float32)]
        if self.clip_norm or self.on_nonfinite == "skip_step":
            norm = tf.sqrt(2.0 * tf.add_n(halves))  # tf.linalg.global_norm, sharing the sums
        if self.clip_norm:
            unscaled, _ = tf.clip_by_global_norm(unscaled, self.clip_norm, use_norm=norm)
            grads = unscaled if not self.loss_scaling else [g * self.optimizer.dynamic_scale for g in unscaled]
        if self.on_nonfinite == "skip_step":
            finite = self._finite(loss, norm)
            tf.cond(finite, lambda: self._apply(grads), tf.no_op)
            row.append(tf.cast(self.skipped.assign_add(tf.cast(~finite, tf.int64)), tf.float32))
        else:
            # stop: nothing extra in the step, no cond (a cond over every gradient and slot costs dozens of
            # ops a step). The chunk finds the first non-finite step from its arrays, once; the run ends there
            # and keeps its last good checkpoint, so that step's update does not matter.
            self._apply(grads)
        return tf.stack(row + halves)

    @_plain_graph
    def _finite(self, loss: tf.Tensor, grad_norm: tf.Tensor) -> tf.Tensor:
        """Float16 loss scaling: overflowing gradients are the LossScaleOptimizer's to skip; only the loss counts."""
        finite = tf.math.is_finite(loss)
        return finite if self.loss_scaling else finite & tf.math.is_finite(grad_norm)

    def _loss_and_gradients(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            pred = self.model(x, training=True)  # mixed precision: the loss in float32 (class ids stay integers)
            pred = tf.cast(pred, y.dtype if y.dtype.is_floating else tf.float32)
            loss = self.loss_fn(y, pred)
            scaled = self.optimizer.scale_loss(loss) if self.loss_scaling else loss
        return loss, tape.gradient(scaled, self.variables)

    def _accumulated_gradients(self, batch: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """Mean loss and mean gradients over accumulate_steps consecutive micro-batches: one big batch."""
        n = self.accumulate_steps
        loss, grads = self._gradients(*self.input.batch(batch * n))
        if n == 1:
            return loss, grads
        for j in tf.range(1, n):
            micro_loss, micro_grads = self._gradients(*self.input.batch(batch * n + tf.cast(j, batch.dtype)))
            loss += micro_loss
            grads = [g + m for g, m in zip(grads, micro_grads, strict=True)]
        return loss / n, [g / n for g in grads]

    @_plain_graph
    def _apply(self, grads: list[tf.Tensor]) -> tf.Operation:
        if self.distributed:  # Keras sums gradients across replicas again: hand it 1/R of the sum
            grads = [g / self.replicas for g in grads]
        self.optimizer.apply_gradients(zip(grads, self.variables, strict=True))
        return tf.no_op()

    @staticmethod
    @_plain_graph
    def _first_nonfinite(per_variable: tf.Tensor) -> tf.Tensor:
        """Index of the first variable whose gradient norm is not finite, -1 if none (named in the error)."""
        bad = ~tf.math.is_finite(per_variable)
        first = tf.cast(tf.argmax(tf.cast(bad, tf.int32)), tf.int32)
        return tf.where(tf.reduce_any(bad), first, -1)

    def gradients(self) -> list[tf.Tensor]:
        """The gradients the next step will see, without applying them (the tape example prints these)."""
        if self.input.streamed:
            x, y = next(iter(self.input.dataset(0, self.batch_size)))
            _, grads = self._gradients(self.input.features(x, training=True), y)
        else:
            _, grads = self._accumulated_gradients(self.step.read_value())
        if self.loss_scaling:
            grads = [g / tf.cast(self.optimizer.dynamic_scale, g.dtype) for g in grads]
        return grads

    # --- the chunk -----------------------------------------------------------------------------
    def run(self, num_steps: int) -> dict[str, tf.Tensor]:
        """Run up to `num_steps` steps in compiled calls; per-step values come back still on the device.

        `steps` says how many ran: fewer than asked only when on_nonfinite=stop met a non-finite step,
        whose index in the chunk is then `steps` and whose first bad variable is `bad_variable`. A run
        longer than `call_limit` is several calls, joined.
        """
        if self.input.streamed:
            return self._run_stream(num_steps)
        parts, step = [], int(self.step.numpy()) if self.cut_at_epochs else 0
        while True:
            n = min(num_steps, self.call_limit(step))
            parts.append(self._chunk(tf.constant(n, tf.int32)))
            num_steps, step = num_steps - n, step + n
            if num_steps == 0 or (self.on_nonfinite == "stop" and int(parts[-1]["steps"]) < n):
                break
        return parts[0] if len(parts) == 1 else _joined(parts)

    def _run_stream(self, num_steps: int) -> dict[str, tf.Tensor]:
        """Streamed data: calls take their batches from the epoch's iterator; one that runs dry ends the epoch.

        `steps` is what ran: fewer than asked when a non-finite step stopped it (on_nonfinite=stop; `stopped`
        is then true). A call that ran dry (an epoch shorter than counted) is followed by one on the next
        epoch. One scalar read per call, to place the iterator."""
        parts, step = [], int(self.step.numpy())
        while num_steps > 0:
            n = min(num_steps, self.call_limit(step))
            with reading():  # a source's error deep in a file: its one line
                out = self._chunk(tf.constant(n, tf.int32), self.input.iterator(step))
                ran = int(out["steps"])
            parts.append(out)
            step, num_steps = step + ran, num_steps - ran
            self.input.advanced(step, bool(out["exhausted"]))
            if bool(out["stopped"]):
                break
        return parts[0] if len(parts) == 1 else _joined(parts)

    def call_limit(self, step: int) -> int:
        """How many steps one compiled call may run from `step`: the rows buffer's length, and the epoch's end
        where epochs are cut. run() splits at it; the controller cuts its chunks there so that it need not."""
        return self.input.call_limit(step)

    def _run_chunk(self, num_steps: tf.Tensor) -> dict[str, tf.Tensor]:
        self.input.begin_chunk(self.step)  # a new epoch's order, once per call where chunks end at epochs
        for i in tf.range(num_steps):
            row = self._distributed_step() if self.distributed else self.train_step(self.step)
            self.step.assign_add(1)
            self._rows[i].assign(row)
        return self._chunk_outputs(self._rows[:num_steps], num_steps)

    def _run_stream_chunk(self, num_steps: tf.Tensor, iterator) -> dict[str, tf.Tensor]:
        """Up to num_steps steps from `iterator`; stops early, cleanly, when it runs dry (the epoch's end)."""
        i = tf.constant(0)
        exhausted = tf.constant(False)
        while i < num_steps:
            batch = iterator.get_next_as_optional()
            if not batch.has_value():
                exhausted = tf.constant(True)
                break
            x, y = batch.get_value()
            row = self._distributed_stream_step(x, y) if self.distributed else self._stream_step(x, y)
            self.step.assign_add(1)
            self._rows[i].assign(row)
            i += 1
        # A call on an iterator already dry runs no step: the outputs are taken over one (stale) row, then cut
        at_least_one = tf.maximum(i, 1)
        out = self._chunk_outputs(self._rows[:at_least_one], at_least_one)
        done = tf.minimum(out["steps"], i)
        stopped = done < i  # a non-finite step (on_nonfinite=stop)
        out = {k: v[:done] if k.startswith("train/") else v for k, v in out.items()}
        return {**out, "steps": done, "exhausted": exhausted & ~stopped, "stopped": stopped}

    def _stream_step(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        return self._update(*self._gradients(self.input.features(x, training=True), y))

    def _distributed_stream_step(self, x, y) -> tf.Tensor:
        """Each replica's own share, read by its own pipeline (distribute_datasets_from_function)."""
        row = self.strategy.run(self._replica_share_step, args=(x, y))
        return self.strategy.experimental_local_results(row)[0]

    def _replica_share_step(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        ctx = tf.distribute.get_replica_context()
        loss, grads = self._gradients(self.input.features(x, training=True), y)
        loss, grads = ctx.all_reduce(
            tf.distribute.ReduceOp.SUM, [loss / self.replicas, [g / self.replicas for g in grads]]
        )
        return self._update(loss, grads)

    @_plain_graph
    def _row_width(self) -> int:
        return 2 + (self.on_nonfinite == "skip_step") + len(self.variables)

    @_plain_graph
    def _chunk_outputs(self, rows: tf.Tensor, num_steps: tf.Tensor) -> dict[str, tf.Tensor]:
        """The rows' columns as named metrics; norms from the squares, the first non-finite step, once."""
        result = {"train/loss": rows[:, 0], "train/lr": rows[:, 1]}
        if self.on_nonfinite == "skip_step":
            result["train/skipped_steps"] = tf.cast(rows[:, 2], tf.int64)
        squares = 2.0 * rows[:, self._row_width() - len(self.variables) :]
        norm = tf.sqrt(tf.reduce_sum(squares, axis=1))
        per_variable = tf.sqrt(squares)
        if self.grad_norms != "off":
            result["train/grad_norm"] = norm
        if self.grad_norms == "per_variable":
            result[PER_VARIABLE] = per_variable
        done, bad_variable = num_steps, tf.constant(-1, tf.int32)
        if self.on_nonfinite == "stop":
            # The first step whose loss or gradient is not finite. There is no `break` in the loop (autograph
            # would wrap the rest of the body in a cond each step): a chunk that went bad runs out, and its
            # steps from the bad one on are dropped, as is the run.
            finite = self._finite(result["train/loss"], norm)
            done = tf.where(tf.reduce_all(finite), num_steps, tf.cast(tf.argmin(tf.cast(finite, tf.int32)), tf.int32))
            bad_variable = self._first_nonfinite(per_variable[tf.minimum(done, num_steps - 1)])
        return {**{k: v[:done] for k, v in result.items()}, "steps": done, "bad_variable": bad_variable}

    def _distributed_step(self) -> tf.Tensor:
        x, y = self.input.batch(self.step)  # the global batch, gathered once in cross-replica context
        row = self.strategy.run(self._replica_step, args=(x, y))
        return self.strategy.experimental_local_results(row)[0]  # every replica holds the same reduced row

    # --- evaluation ----------------------------------------------------------------------------
    def evaluate(self, x=None, y=None, metrics: Metrics | None = None) -> dict[str, tf.Tensor]:
        """Mean loss and `metrics` over a whole split, batched so large splits fit; on the device.

        `x`, `y`: raw arrays of a split held in memory; a `Stream` as `x`: a streamed split; nothing: the
        training set (the objective of a run without a validation split)."""
        metrics = metrics or Metrics(())
        metrics.reset()
        batch = eval_batch(self.batch_size)
        if self.input.streamed:
            with reading():
                return self._eval_stream(self.input.eval_dataset(x, batch), metrics)
        xs, ys = self.input.eval_arrays(x, y)
        return self._eval(xs, ys, tf.constant(batch, tf.int32), metrics)

    def _evaluate(self, x: tf.Tensor, y: tf.Tensor, batch: tf.Tensor, metrics: Metrics) -> dict[str, tf.Tensor]:
        return metrics_over_arrays(self.model, self.loss_fn, x, y, batch, metrics)

    def _evaluate_stream(self, dataset: tf.data.Dataset, metrics: Metrics) -> dict[str, tf.Tensor]:
        return metrics_over_dataset(self.model, self.loss_fn, dataset, metrics, self.input.features)


def _compiled(method: Callable, **options) -> Callable:
    """`tf.function(method)` with its own retracing count. TensorFlow counts traces per code object, so in a
    sweep run in one process every trial's new loop added to one count and Optuna's 5th trial printed
    "5 out of the last 5 calls ... triggered tf.function retracing" though each loop traced once; a partial
    has no code object of its own, so each loop's functions are counted apart."""
    return tf.function(functools.partial(method.__func__, method.__self__), **options)


def _joined(parts: list[dict[str, tf.Tensor]]) -> dict[str, tf.Tensor]:
    """Several calls' outputs as one chunk's: per-step arrays end to end; `steps` summed."""
    last = ("steps", "bad_variable", "exhausted", "stopped")
    out = {k: tf.concat([p[k] for p in parts], 0) for k in parts[0] if k not in last}
    return {
        **out,
        **{k: parts[-1][k] for k in last[1:] if k in parts[-1]},
        "steps": sum(int(p["steps"]) for p in parts),
    }
