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
from typing import Any

import numpy as np
import tensorflow as tf

from trainer.config import TrainerError
from trainer.inputs import MAX_ROWS, MIN_EPOCH_FOR_CUTS, ArrayInput, StreamInput, epoch_order, reading
from trainer.metrics import Metrics, eval_batch, metrics_over_arrays, metrics_over_dataset
from trainer.steps import Layout, Ops, Step, StepError, Supervised, layout_of
from trainer.steps.base import finite_step

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
    """The compiled chunk around a step (trainer/steps): `StepLoop(step, None, None, x, ...)`, or
    `StepLoop(model, loss_fn, optimizer, x, y, ...)` for the supervised step."""

    def __init__(
        self,
        model,
        loss_fn: LossFn | None,
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
        self.step_impl: Step = model if isinstance(model, Step) else Supervised(model, loss_fn, optimizer)
        self.output_scale: tuple[np.ndarray, np.ndarray] | None = None  # data.target_scale (eval_model)
        self.step_name = type(self.step_impl).__qualname__
        default = tf.distribute.get_strategy()  # outside any scope: the default (no-op) strategy
        self.strategy = strategy or default
        self.replicas = self.strategy.num_replicas_in_sync
        self.distributed = self.strategy is not default
        if self.distributed and (batch_size % self.replicas or accumulate_steps > 1 or on_nonfinite != "stop"):
            raise TrainerError(
                f"{self.replicas} replicas train in sync: trainer.batch_size={batch_size} must be a multiple of "
                "that, trainer.accumulate_steps 1 and trainer.on_nonfinite stop"
            )
        self.batch_size, self.seed, self.clip_norm, self.grad_norms = batch_size, seed, clip_norm, grad_norms
        self.jit = jit
        self.on_nonfinite, self.accumulate_steps = on_nonfinite, accumulate_steps
        # the input side (inputs.py): arrays held on the device, or a tf.data stream; x, y arrays are the former
        inputs = x if isinstance(x, ArrayInput | StreamInput) else None
        self.input = inputs or ArrayInput(x, y, batch_size, seed, accumulate_steps=accumulate_steps)
        if self.input.streamed and accumulate_steps > 1:
            raise TrainerError(f"trainer.accumulate_steps={accumulate_steps} needs data held in memory: "
                               "set data.in_memory=true (or trainer.batch_size larger instead)")  # fmt: skip
        self.n, self.steps_per_epoch = self.input.n, self.input.steps_per_epoch
        self.cut_at_epochs = self.input.cut_at_epochs
        with self.strategy.scope():
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")
            self.input.build()
            self.step_impl.build(self.example_batch(batch_size))  # every variable before the first trace
            self.layout = self._layout()
            for slot in self.layout.slots:
                slot.optimizer.build(slot.variables)  # its slots exist before the trace: one trace, not two
        self._compile()
        self._eval_keys: list[str] | None = None
        self._calls = 0

    def _compile(self) -> None:
        """The layout's variables, the step's ops and the compiled functions around them (traced at first call)."""
        self.variables = [v for slot in self.layout.slots for v in slot.variables]
        self.variable_names = self.layout.variable_names
        self.ops = Ops(self.layout, self.step, self.seed, clip_norm=self.clip_norm, on_nonfinite=self.on_nonfinite,
                       accumulate_steps=self.accumulate_steps, replicas=self.replicas, distributed=self.distributed,
                       jit=self.jit)  # fmt: skip
        # Outside the strategy's scope: written and read only in cross-replica context, one copy is enough
        self._rows = tf.Variable(tf.zeros([MAX_ROWS, self.layout.width]), trainable=False, name="metric_rows")
        self._chunk = _compiled(self._run_stream_chunk if self.input.streamed else self._run_chunk)
        self._eval = _compiled(self._evaluate)
        self._eval_stream = _compiled(self._evaluate_stream)
        self._step_eval = _compiled(self._evaluate_step)
        self._step_eval_stream = _compiled(self._evaluate_step_stream)

    def retrain(self, optimizers: dict[str, Any]) -> None:
        """A new phase of the run (trainer.unfreeze): the step's optimizers replaced, its layout taken again from
        what is trainable now, the chunk traced once more. Between chunks only; the new optimizers' slots are
        built here, before the trace, as at the start."""
        with self.strategy.scope():
            for name, optimizer in optimizers.items():
                setattr(self.step_impl, name, optimizer)
            self.layout = self._layout()
            for slot in self.layout.slots:
                slot.optimizer.build(slot.variables)
        self._compile()
        self._eval_keys, self._calls = None, 0

    def _layout(self) -> Layout:
        try:
            return layout_of(self.step_impl, self.on_nonfinite == "skip_step", variable_path, distinct_names)
        except StepError as e:
            raise StepError(f"step {self.step_name}: {e}") from None

    # --- what the rest of the trainer reads --------------------------------------------------------
    @property
    def model(self):
        """The model the step serves: logged, early-stopped, checkpointed as `model`."""
        return self.step_impl.exports()

    @property
    def loss_fn(self) -> LossFn | None:
        """The loss evaluation reports: unweighted (data.class_weight weighs training only, as in Keras' fit), so
        val/loss is the one `trainer evaluate` reproduces."""
        loss = getattr(self.step_impl, "loss", None)
        return getattr(loss, "evaluated", loss)

    @property
    def eval_model(self) -> Callable:
        """The model evaluation scores: with `output_scale` (data.target_scale), its standardized outputs put
        back in the targets' units, so val/* compare with other tools (data/scaling.py)."""
        model, scale = self.model, self.output_scale
        if scale is None:
            return model
        mean, std = (tf.constant(a, tf.float32) for a in scale)
        return lambda x, training=False: tf.cast(model(x, training=training), tf.float32) * std + mean

    @property
    def optimizer(self):
        return self.layout.slots[0].optimizer

    @property
    def supervised(self) -> bool:
        return isinstance(self.step_impl, Supervised)

    def checkpointed(self) -> dict[str, Any]:
        """What a checkpoint holds of the step: the supervised step's model and optimizer under the names runs
        have always used; any other step whole (its models, optimizers and variables)."""
        models = self.step_impl.models().values()
        non_trainable = [getattr(v, "value", v) for m in models for v in getattr(m, "non_trainable_variables", [])]
        if self.supervised:
            return {"model": self.step_impl.model, "optimizer": self.optimizer, "non_trainable": non_trainable}
        return {"model": self.model, "step_state": self.step_impl, "non_trainable": non_trainable}

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

    def example_batch(self, n: int) -> tuple[tf.Tensor, tf.Tensor]:
        """The first n examples as a step sees them (x preprocessed)."""
        if self.input.streamed:
            x, y = next(iter(self.input.stream.read().batch(n)))
            return self.input.features(x), y
        weight = getattr(self.input, "w", None)
        return (self.input.example(n), self.input.y[:n], *([] if weight is None else [weight[:n]]))

    # --- the step ------------------------------------------------------------------------------
    def check_trainable(self, step: int) -> None:
        """The compiled step trains the variables it was traced with: a layer a callback froze or unfroze
        mid-run changed nothing (a callback setting `trainable = True` on a backbone left its weights where
        they were, silently). Checked between chunks, in Python, never in the step."""
        for slot in self.layout.slots:
            traced = {id(v) for v in slot.variables}
            now = [v for m in slot.models for v in m.trainable_variables]
            changed = [v.path for v in now if id(v) not in traced] or [
                v.path for v in slot.variables if all(v is not w for w in now)]  # fmt: skip
            if changed:
                raise TrainerError(
                    f"at step {step} the trainable variables of optimizer {slot.name!r} changed ({changed[0]}, "
                    f"{len(changed)} in all): the compiled step trains the variables it began with. Freeze with "
                    "model.freeze, and train the next phase as a new run with trainer.init_from=<this run> "
                    "(README: Fine-tuning)"
                )

    def use_averages(self) -> bool:
        """optimizer.use_ema: each such optimizer's moving averages replace the weights it trains (Keras'
        `finalize_variable_values`, which `fit` calls at its end). The averages are optimizer variables, so they
        are checkpointed with it and a resume continues them exactly. False when no optimizer keeps any."""
        used = False
        for name in self.step_impl.trains:
            optimizer = getattr(self.step_impl, name)
            inner = getattr(optimizer, "inner_optimizer", optimizer)  # mixed precision's LossScaleOptimizer
            if getattr(inner, "use_ema", False):
                inner.finalize_variable_values(self.ops.variables(optimizer))
                used = True
        return used

    def check_step(self) -> None:
        """Trace one step on its own, before training, so a step that breaks the contract (or calls .numpy(),
        or is not graph code) fails in one line naming it rather than from inside the chunk's trace."""
        if self.distributed:
            return
        batch = self.example_batch(self.batch_size * self.accumulate_steps)
        spec = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), batch)
        try:
            tf.function(self._traced_row).get_concrete_function(spec)
        except Exception as e:  # any failure of the user's trace is reported as one line
            lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
            why = lines[-1] if lines else type(e).__name__  # autograph's last line is the error itself
            if isinstance(e, StepError):
                raise StepError(f"step {self.step_name}: {why}") from None
            hint = "use TensorFlow ops only: .numpy(), float() or an `if` on a tensor syncs to the host"
            raise StepError(f"step {self.step_name}: train_step cannot be traced ({why}); "
                            f"{hint}") from None  # fmt: skip

    def _traced_row(self, batch) -> tf.Tensor:
        """One step of the user's code, bracketed by Ops; returns its row."""
        self.ops.begin()
        returned = self.step_impl.train_step(batch, self.ops)
        return self.ops.end(returned, self.skipped)

    def _batch_at(self, index: tf.Tensor):
        """Batch number `index`; with accumulation, its accumulate_steps micro-batches end to end."""
        n = self.accumulate_steps
        if n == 1:
            return self.input.batch(index)
        parts = [self.input.batch(index * n + j) for j in range(n)]
        return tuple(tf.concat([p[i] for p in parts], 0) for i in range(len(parts[0])))

    def _row(self, batch, replica_share: bool = False) -> tf.Tensor:
        """The step's row; under tf.distribute each replica runs the step on its share and Ops all-reduces."""
        if not self.distributed:
            return self._traced_row(batch)
        fn = self._share_row if replica_share else self._traced_row
        row = self.strategy.run(fn, args=(batch,))
        return self.strategy.experimental_local_results(row)[0]  # every replica holds the same reduced row

    def _share_row(self, batch) -> tf.Tensor:
        """This replica's share of a global batch gathered once in cross-replica context."""
        ctx = tf.distribute.get_replica_context()
        share = self.batch_size // self.replicas
        start = ctx.replica_id_in_sync_group * share
        return self._traced_row(tf.nest.map_structure(lambda t: t[start : start + share], batch))

    def gradients(self) -> list[tf.Tensor]:
        """The gradients the next step will see, without applying them (the tape example prints these)."""
        objective = getattr(self.step_impl, "objective", None)
        if objective is None:
            raise StepError(f"step {self.step_name}: trainer.print_gradients needs a supervised step")
        if self.input.streamed:
            x, y = next(iter(self.input.dataset(0, self.batch_size)))
            batch = (self.input.features(x, training=True), y)
        else:
            batch = self._batch_at(self.step.read_value())
        self.ops.begin()
        return self.ops.gradients(self.optimizer, objective, batch)[1]

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
            self._check_traces()
            num_steps, step = num_steps - n, step + n
            if num_steps == 0 or (self.on_nonfinite == "stop" and int(parts[-1]["steps"]) < n):
                break
        return parts[0] if len(parts) == 1 else _joined(parts)

    def _check_traces(self) -> None:
        """One trace serves every call: from the second call on, a second trace is a step that retraces (Python
        state in the graph); refused rather than slowing every chunk by a trace."""
        self._calls += 1
        if self._calls >= 2 and self._chunk.experimental_get_tracing_count() > 1:
            raise StepError(f"step {self.step_name}: the compiled chunk was traced "
                            f"{self._chunk.experimental_get_tracing_count()} times by call {self._calls}, not once: "
                            "create every variable in build(batch), not in train_step, and keep Python values "
                            "that change out of the step")  # fmt: skip

    def _run_stream(self, num_steps: int) -> dict[str, tf.Tensor]:
        """Streamed data: calls take their batches from the epoch's iterator; one that runs dry ends the epoch.

        `steps` is what ran: fewer than asked when a non-finite step stopped it (on_nonfinite=stop; `stopped`
        is then true). A call that ran dry (an epoch shorter than counted) is followed by one on the next
        epoch. One scalar read per call, to place the iterator."""
        parts, step = [], int(self.step.numpy())
        while num_steps > 0:
            n = min(num_steps, self.call_limit(step))
            with reading(self.input.stream):  # a source's error deep in a file: its one line
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
            row = self._row(self._batch_at(self.step), replica_share=True)
            self.step.assign_add(1)
            self._rows[i].assign(row)
        return self._chunk_outputs(self._rows[:num_steps], num_steps)

    def _run_stream_chunk(self, num_steps: tf.Tensor, iterator) -> dict[str, tf.Tensor]:
        """Up to num_steps steps from `iterator`; stops early, cleanly, when it runs dry (the epoch's end).

        Keras' multi-step loop's shape: the next batch is fetched at the end of a step, into the loop's
        condition, so the step is not inside a branch. Written as `if not has_value(): break`, the whole step
        sat in a cond whose every captured tensor passed a Switch each step: 3,478 against 3,925 steps/s here
        (medians of 7 in one process, the stream bench's MLP, 1 GiB .npy). The fetch is skipped after the
        last step, so no batch is drawn and dropped."""
        i = tf.constant(0)
        batch = iterator.get_next_as_optional()
        while tf.logical_and(i < num_steps, batch.has_value()):
            x, y = batch.get_value()
            row = self._row(self._stream_batch(x, y))
            self.step.assign_add(1)
            self._rows[i].assign(row)
            i += 1
            batch = tf.cond(i < num_steps, iterator.get_next_as_optional, functools.partial(_same, batch))
        exhausted = tf.logical_not(batch.has_value())
        # A call on an iterator already dry runs no step: the outputs are taken over one (stale) row, then cut
        at_least_one = tf.maximum(i, 1)
        out = self._chunk_outputs(self._rows[:at_least_one], at_least_one)
        done = tf.minimum(out["steps"], i)
        stopped = done < i  # a non-finite step (on_nonfinite=stop)
        out = {k: v[:done] if k.startswith("train/") else v for k, v in out.items()}
        return {**out, "steps": done, "exhausted": exhausted & ~stopped, "stopped": stopped}

    def _stream_batch(self, x, y):
        """A streamed batch as the step takes it; under tf.distribute, each replica its own share."""
        if self.distributed:
            return self.strategy.run(lambda x, y: (self.input.features(x, training=True), y), args=(x, y))
        return self.input.features(x, training=True), y

    @_plain_graph
    def _chunk_outputs(self, rows: tf.Tensor, num_steps: tf.Tensor) -> dict[str, tf.Tensor]:
        """The rows' columns as named metrics; norms from the squares, the first non-finite step, once."""
        layout = self.layout
        result: dict[str, tf.Tensor] = {}
        halves = layout.halves
        if halves == list(range(halves[0], halves[0] + len(halves))):
            squares = 2.0 * rows[:, halves[0] : halves[0] + len(halves)]
        else:
            squares = 2.0 * tf.gather(rows, halves, axis=1)
        norm = tf.sqrt(tf.reduce_sum(squares, axis=1))
        per_variable = tf.sqrt(squares)
        finite, start, finite_by_slot = None, 0, []
        for slot in layout.slots:
            prefix = layout.prefix(slot)
            loss = rows[:, slot.loss_col]
            result[f"{prefix}loss"], result[f"{prefix}lr"] = loss, rows[:, slot.loss_col + 1]
            if slot.regularized:
                result[f"{prefix}regularization"] = rows[:, slot.reg_col]
            slot_norm = norm
            if not layout.single:
                slot_norm = tf.sqrt(tf.reduce_sum(squares[:, start : start + len(slot.variables)], axis=1))
                if self.grad_norms != "off":
                    result[f"{prefix}grad_norm"] = slot_norm
            start += len(slot.variables)
            ok = finite_step(loss, slot_norm, slot.loss_scaling)
            finite = ok if finite is None else finite & ok
            finite_by_slot.append(ok)
        if not layout.single:  # several optimizers: train/loss is the sum of theirs (the step's total)
            result["train/loss"] = tf.add_n([rows[:, slot.loss_col] for slot in layout.slots])
        if layout.skip:
            result["train/skipped_steps"] = tf.cast(rows[:, layout.skip_col], tf.int64)
        for name, col in layout.log_cols.items():
            result[f"train/{name}"] = rows[:, col]
        if self.grad_norms != "off":
            result["train/grad_norm"] = norm
        if self.grad_norms == "per_variable":
            result[PER_VARIABLE] = per_variable
        done, bad_variable, bad_optimizer = num_steps, tf.constant(-1, tf.int32), tf.constant(-1, tf.int32)
        if self.on_nonfinite == "stop":
            # The first step whose loss or gradient is not finite. There is no `break` in the loop (autograph
            # would wrap the rest of the body in a cond each step): a chunk that went bad runs out, and its
            # steps from the bad one on are dropped, as is the run.
            done = tf.where(tf.reduce_all(finite), num_steps, tf.cast(tf.argmin(tf.cast(finite, tf.int32)), tf.int32))
            at = tf.minimum(done, num_steps - 1)
            bad_variable = self._first_nonfinite(per_variable[at])
            if not layout.single:  # which optimizer's loss or gradient it was
                slots_ok = tf.stack([ok[at] for ok in finite_by_slot])
                bad_optimizer = tf.where(tf.reduce_all(slots_ok), -1, tf.cast(tf.argmin(tf.cast(slots_ok, tf.int32)),
                                                                               tf.int32))  # fmt: skip
        out = {**{k: v[:done] for k, v in result.items()}, "steps": done, "bad_variable": bad_variable}
        return out if layout.single else {**out, "bad_optimizer": bad_optimizer}

    @staticmethod
    @_plain_graph
    def _first_nonfinite(per_variable: tf.Tensor) -> tf.Tensor:
        """Index of the first variable whose gradient norm is not finite, -1 if none (named in the error)."""
        bad = ~tf.math.is_finite(per_variable)
        first = tf.cast(tf.argmax(tf.cast(bad, tf.int32)), tf.int32)
        return tf.where(tf.reduce_any(bad), first, -1)

    def describe_nonfinite(self, out: dict[str, tf.Tensor]) -> str:
        """`; first non-finite gradient: dense_0/kernel`, and with several optimizers which one went bad."""
        optimizer, variable = int(out.get("bad_optimizer", -1)), int(out["bad_variable"])
        where = f" of optimizer {self.layout.slots[optimizer].name!r}" if optimizer >= 0 else ""
        return where + (f"; first non-finite gradient: {self.describe_variable(variable)}" if variable >= 0 else "")

    def describe_variable(self, index: int) -> str:
        """`dense_0/kernel`, or `dense_0/kernel (optimizer generator_optimizer)` when the step has several."""
        name = self.variable_names[index]
        return name if self.layout.single else f"{name} (optimizer {self.layout.slot_of_variable(index).name})"

    # --- evaluation ----------------------------------------------------------------------------
    def evaluate(self, x=None, y=None, metrics: Metrics | None = None) -> dict[str, tf.Tensor]:
        """Mean loss and `metrics` over a whole split, batched so large splits fit; on the device.

        `x`, `y`: raw arrays of a split held in memory; a `Stream` as `x`: a streamed split; nothing: the
        training set (the objective of a run without a validation split). A supervised step gives the loss and
        trainer.val_metrics (and its eval_extra); any other step, what its eval_step gives."""
        if not self.supervised:
            return dict(self.step_impl.eval_results(self._over_split(self.step_impl.eval_step, x, y)))
        metrics = metrics or Metrics(())
        metrics.reset()
        batch = eval_batch(self.batch_size)
        if self.input.streamed:
            with reading(x or self.input.stream):
                out = self._eval_stream(self.input.eval_dataset(x, batch), metrics)
        else:
            xs, ys = self.input.eval_arrays(x, y)
            out = self._eval(xs, ys, tf.constant(batch, tf.int32), metrics)
        if type(self.step_impl).eval_extra is not Supervised.eval_extra:
            out = {**out, **self._over_split(self.step_impl.eval_extra, x, y)}
        return out

    def _over_split(self, fn, x=None, y=None) -> dict[str, tf.Tensor]:
        """Batch means of `fn((x, y))` over a split, weighted by batch size."""
        batch = eval_batch(self.batch_size)
        if self._eval_keys is None:  # the names it gives, from one eager call (the loops need them up front)
            self._eval_keys = sorted(fn(self.example_batch(min(2, self.n))[:2]))  # (x, y): validation is unweighted
        if self.input.streamed:
            with reading(x or self.input.stream):
                return self._step_eval_stream(fn, self.input.eval_dataset(x, batch))
        xs, ys = self.input.eval_arrays(x, y)
        return self._step_eval(fn, xs, ys, tf.constant(batch, tf.int32))

    def _evaluate_step(self, fn, x: tf.Tensor, y: tf.Tensor, batch: tf.Tensor) -> dict[str, tf.Tensor]:
        n = tf.shape(x)[0]
        totals = {k: tf.constant(0.0) for k in self._eval_keys}
        for start in tf.range(0, n, batch):
            xb, yb = x[start : start + batch], y[start : start + batch]
            count = tf.cast(tf.shape(xb)[0], tf.float32)
            values = fn((xb, yb))
            totals = {k: totals[k] + tf.cast(values[k], tf.float32) * count for k in self._eval_keys}
        return {k: v / tf.cast(n, tf.float32) for k, v in totals.items()}

    def _evaluate_step_stream(self, fn, dataset: tf.data.Dataset) -> dict[str, tf.Tensor]:
        totals = {k: tf.constant(0.0) for k in self._eval_keys}
        count = tf.constant(0.0)
        for xb, yb in dataset:
            n = tf.cast(tf.shape(xb)[0], tf.float32)
            values = fn((self.input.features(xb), yb))
            totals = {k: totals[k] + tf.cast(values[k], tf.float32) * n for k in self._eval_keys}
            count += n
        return {k: v / count for k, v in totals.items()}

    def _evaluate(self, x: tf.Tensor, y: tf.Tensor, batch: tf.Tensor, metrics: Metrics) -> dict[str, tf.Tensor]:
        return metrics_over_arrays(self.eval_model, self.loss_fn, x, y, batch, metrics)

    def _evaluate_stream(self, dataset: tf.data.Dataset, metrics: Metrics) -> dict[str, tf.Tensor]:
        return metrics_over_dataset(self.eval_model, self.loss_fn, dataset, metrics, self.input.features)


def _compiled(method: Callable, **options) -> Callable:
    """`tf.function(method)` with its own retracing count. TensorFlow counts traces per code object, so in a
    sweep run in one process every trial's new loop added to one count and Optuna's 5th trial printed
    "5 out of the last 5 calls ... triggered tf.function retracing" though each loop traced once; a partial
    has no code object of its own, so each loop's functions are counted apart."""
    return tf.function(functools.partial(method.__func__, method.__self__), **options)


def _same(value: Any) -> Any:
    """A cond's branch that keeps what it was given (the batch already held, after a call's last step)."""
    return value


def _joined(parts: list[dict[str, tf.Tensor]]) -> dict[str, tf.Tensor]:
    """Several calls' outputs as one chunk's: per-step arrays end to end; `steps` summed."""
    last = ("steps", "bad_variable", "bad_optimizer", "exhausted", "stopped")
    out = {k: tf.concat([p[k] for p in parts], 0) for k in parts[0] if k not in last}
    return {
        **out,
        **{k: parts[-1][k] for k in last[1:] if k in parts[-1]},
        "steps": sum(int(p["steps"]) for p in parts),
    }
