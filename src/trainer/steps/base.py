"""The step contract: what a user writes (`Step`) and what the framework owns (`Ops`).

A step is only the math and the order of updates, written as graph code. Every gradient that reaches an
optimizer goes through `Ops` (`minimize`, or `gradients` then `apply`), so the framework sees each one and does,
once, what Keras' `train_step` overrides, Lightning's manual optimization and Model Garden's `Task.train_step`
leave to each user: the models' own losses (`model.losses`: kernel regularizers, activity regularizers,
`add_loss`), mixed-precision loss scaling, gradient accumulation, the all-reduce under tf.distribute, clipping,
the non-finite policy, and each optimizer's loss, learning rate and gradient norms in the step's metric row.

The row's layout is fixed before the first trace from `trains` and `logs`, so a chunk of K steps still writes
one row a step into a preallocated buffer (loop.py) and nothing in the step touches the host. With one optimizer
the metric names are exactly those of the built-in step (`train/loss`, `train/lr`, `train/grad_norm`, ...).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf

from trainer.config import TrainerError

LossFn = Callable[[Any], tf.Tensor]
RESERVED = ("loss", "lr", "grad_norm", "grad_norm_by_var", "regularization", "skipped_steps", "final_loss")
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class StepError(TrainerError):
    """A step that breaks the contract; the loop turns it into one line naming the step class and the fix."""


class Step(tf.Module):
    """Subclass this, name it by `_target_` in a `step` config node, and write `train_step` as graph code.

    - `trains`: optimizer attribute -> the attributes of the models whose trainable variables it updates.
    - `logs`: names of extra per-step scalars, logged as `train/<name>` (`ops.log(name, value)`).
    - `build(batch)`: create any variable of your own, eagerly, before the first trace (models are built
      by the framework calling them on `batch`'s inputs).
    - `train_step(batch, ops)`: one update from `batch` (as the data gives it: `x, y = batch`).
    - `weighted`: True if train_step takes `x, y, sample_weight = batch` when a table names data.sample_weight
      (the built-in supervised steps do; a step that leaves it False is refused such data in one line).
    - `eval_step(batch)` -> {name: batch mean}: logged as `val/<name>`, weighted by batch size; `loss` is the
      objective a sweep minimises. `eval_results(means)` may turn the means into what is logged.
    - `exports()`: the model that is checkpointed as "the model", logged, served and early-stopped.

    The constructor receives, by keyword, what its signature names among `model`, `loss` and `optimizer`: the
    framework builds those from the config groups of the same name (with the schedule, mixed precision and the
    data's output count); everything else comes from the step's own config node.
    """

    trains: Mapping[str, Sequence[str]] = {"optimizer": ("model",)}
    logs: Sequence[str] = ()
    weighted: bool = False

    def build(self, batch: Any) -> None:
        """Create the step's own variables (a step counter, an EMA copy): eagerly, before the trace."""

    def train_step(self, batch: Any, ops: Ops) -> Mapping[str, tf.Tensor] | None:
        raise NotImplementedError

    def eval_step(self, batch: Any) -> Mapping[str, tf.Tensor]:
        raise NotImplementedError(f"{type(self).__qualname__} defines no eval_step")

    def eval_results(self, means: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
        return means

    def exports(self) -> Any:
        return getattr(self, "model", None)

    def models(self) -> dict[str, Any]:
        """The step's models by attribute name (anything with `trainable_variables` that is called)."""
        names = {m for ms in self.trains.values() for m in ms}
        found = {name: getattr(self, name) for name in names if getattr(self, name, None) is not None}
        for name, value in vars(self).items():
            if isinstance(value, keras.Model) and name not in found:
                found[name] = value
        return found


@dataclass(eq=False)
class Slot:
    """One optimizer's place in the step: its variables, and where its values sit in the row."""

    name: str
    optimizer: Any
    models: list[Any]
    variables: list[tf.Variable]
    variable_names: list[str]
    regularized: bool
    loss_col: int = 0
    halves_col: int = 0
    reg_col: int = -1

    @property
    def loss_scaling(self) -> bool:
        return isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)


@dataclass
class Layout:
    """Which column of a step's row holds what, and the metric name of each."""

    slots: list[Slot]
    logs: list[str]
    skip: bool
    width: int = 0
    log_cols: dict[str, int] = field(default_factory=dict)
    skip_col: int = -1

    def __post_init__(self) -> None:
        col = 0
        for slot in self.slots:
            slot.loss_col, slot.halves_col = col, col + 2
            col += 2 + len(slot.variables)
        for slot in self.slots:
            if slot.regularized:
                slot.reg_col, col = col, col + 1
        for name in self.logs:
            self.log_cols[name], col = col, col + 1
        if self.skip:
            self.skip_col, col = col, col + 1
        self.width = col

    @property
    def single(self) -> bool:
        return len(self.slots) == 1

    def prefix(self, slot: Slot) -> str:
        """`train/` for the one optimizer of a step (today's names), `train/<optimizer>/` for each of several."""
        return "train/" if self.single else f"train/{slot.name}/"

    @property
    def variable_names(self) -> list[str]:
        return [name for slot in self.slots for name in slot.variable_names]

    @property
    def halves(self) -> list[int]:
        """The columns of every variable's half squared norm, in variable_names' order."""
        return [slot.halves_col + i for slot in self.slots for i in range(len(slot.variables))]

    def slot_of_variable(self, index: int) -> Slot:
        for slot in self.slots:
            if index < len(slot.variables):
                return slot
            index -= len(slot.variables)
        raise IndexError(index)


class Ops:
    """The framework's side of a step: the only way a gradient reaches an optimizer.

    Built once per loop; `begin()` and `end()` bracket each traced step (Python bookkeeping at trace time:
    the values it gathers are graph tensors, written as one row by the loop)."""

    def __init__(self, layout: Layout, step: tf.Variable, seed: int, *, clip_norm: float | None,
                 on_nonfinite: str, accumulate_steps: int, replicas: int, distributed: bool, jit: bool):  # fmt: skip
        self.layout, self.step = layout, step
        self._seed, self.clip_norm, self.on_nonfinite = seed, clip_norm, on_nonfinite
        self.accumulate_steps, self.replicas, self.distributed = accumulate_steps, replicas, distributed
        self._by_id = {id(slot.optimizer): slot for slot in layout.slots}
        self._tape_fn = tf.function(self._tape, jit_compile=True) if jit else self._tape
        # A step's values while it is traced: per thread, as MirroredStrategy traces each replica's step in a
        # thread of its own, at once (shared, two replicas' traces saw each other's apply)
        self._local = threading.local()

    @property
    def _values(self) -> dict[int, tf.Tensor]:
        return self._local.values

    @property
    def _finite(self) -> list[tf.Tensor]:
        return self._local.finite

    # --- what a step calls ------------------------------------------------------------------------
    def variables(self, optimizer: Any) -> list[tf.Variable]:
        """The variables `optimizer` updates, in the order of the gradients `gradients` returns."""
        return list(self._slot(optimizer, "variables").variables)

    def seed(self, salt: int = 0) -> tf.Tensor:
        """A stateless seed of (trainer.seed, step, salt) for tf.random.stateless_*: the same draws on a resume.
        Under tf.distribute each replica gets its own."""
        base = tf.constant(self._seed * 1_000_003 + salt, tf.int64)
        if self.distributed:
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            base += tf.cast(replica, tf.int64) * 7_919
        return tf.stack([base, tf.cast(self.step, tf.int64)])

    def minimize(self, optimizer: Any, loss_fn: LossFn, batch: Any) -> tf.Tensor:
        """`gradients` then `apply`; returns the loss (the models' own losses included)."""
        loss, grads = self.gradients(optimizer, loss_fn, batch)
        self.apply(optimizer, grads, loss)
        return loss

    def gradients(self, optimizer: Any, loss_fn: LossFn, batch: Any) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """Loss and gradients of `loss_fn(batch)` (+ the trained models' `losses`) for `optimizer`'s variables.

        With trainer.accumulate_steps=n, `batch` holds n micro-batches end to end and the result is their mean;
        under tf.distribute it is the mean over every replica's share. Gradients come back unscaled (mixed
        precision), so they can be used in the step's own math (SAM's perturbation)."""
        slot = self._slot(optimizer, "gradients")
        n = self.accumulate_steps
        if n == 1:
            loss, reg, grads = self._tape_fn(slot, loss_fn, batch)
        else:
            size = tf.shape(tf.nest.flatten(batch)[0])[0] // n
            loss, reg, grads = self._tape_fn(slot, loss_fn, _micro(batch, 0, size))
            for j in tf.range(1, n):
                micro = self._tape_fn(slot, loss_fn, _micro(batch, j, size))
                loss, reg = loss + micro[0], reg + micro[1]
                grads = [g + m for g, m in zip(grads, micro[2], strict=True)]
            loss, reg, grads = loss / n, reg / n, [g / n for g in grads]
        if self.distributed:
            ctx = tf.distribute.get_replica_context()
            r = self.replicas
            loss, reg, grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [loss / r, reg / r, [g / r for g in grads]])
        if slot.regularized:
            self._values.setdefault(slot.reg_col, tf.cast(reg, tf.float32))  # the step's first evaluation of it
        if slot.loss_scaling:
            grads = [g / tf.cast(slot.optimizer.dynamic_scale, g.dtype) for g in grads]
        return loss, grads

    def apply(self, optimizer: Any, grads: Sequence[tf.Tensor], loss: tf.Tensor) -> None:
        """Clip, check, apply `grads` to `optimizer`'s variables; `loss` and the norms go into the step's row."""
        slot = self._slot(optimizer, "apply")
        if slot.loss_col in self._values:
            raise StepError(f"optimizer {slot.name!r} is applied twice in one step: apply each optimizer once")
        grads = list(grads)
        if len(grads) != len(slot.variables):
            raise StepError(f"apply({slot.name!r}) got {len(grads)} gradients for its {len(slot.variables)} "
                            "variables: pass the list ops.gradients returned")  # fmt: skip
        _scalar(loss, f"the loss given to apply({slot.name!r})")
        halves = [tf.nn.l2_loss(tf.cast(g, tf.float32)) for g in grads]  # sum(g**2)/2: roots at the chunk's end
        self._values[slot.loss_col] = tf.cast(loss, tf.float32)
        self._values[slot.loss_col + 1] = tf.cast(slot.optimizer.learning_rate, tf.float32)
        for i, half in enumerate(halves):
            self._values[slot.halves_col + i] = half
        if self.clip_norm or self.on_nonfinite == "skip_step":
            norm = tf.sqrt(2.0 * tf.add_n(halves))  # tf.linalg.global_norm, sharing the sums
        if self.clip_norm:
            grads, _ = tf.clip_by_global_norm(grads, self.clip_norm, use_norm=norm)
        if slot.loss_scaling:
            grads = [g * tf.cast(slot.optimizer.dynamic_scale, g.dtype) for g in grads]
        if self.on_nonfinite == "skip_step":
            finite = finite_step(loss, norm, slot.loss_scaling)
            tf.cond(finite, lambda: self._apply(slot, grads), tf.no_op)
            self._finite.append(finite)
        else:
            # stop: nothing extra in the step, no cond (a cond over every gradient and slot costs dozens of
            # ops a step). The chunk finds the first non-finite step from its rows, once; the run ends there
            # and keeps its last good checkpoint, so that step's update does not matter.
            self._apply(slot, grads)

    def log(self, name: str, value: tf.Tensor) -> None:
        """A scalar the step declared in `logs`, logged as train/<name> at this step."""
        if name not in self.layout.log_cols:
            declared = ", ".join(self.layout.logs) or "none"
            raise StepError(f"ops.log({name!r}) is not declared in `logs` (declared: {declared}): add it there")
        col = self.layout.log_cols[name]
        if col in self._values:
            raise StepError(f"ops.log({name!r}) is given twice in one step: log each name once")
        _scalar(value, f"the value logged as {name!r}")
        self._values[col] = tf.cast(value, tf.float32)

    # --- the loop's side -------------------------------------------------------------------------
    def begin(self) -> None:
        self._local.values, self._local.finite = {}, []

    def end(self, returned: Mapping[str, tf.Tensor] | None, skipped: tf.Variable) -> tf.Tensor:
        """The step's row, after checking at trace time that it kept the contract."""
        if returned is not None:
            if not isinstance(returned, Mapping):
                raise StepError(f"train_step returned {type(returned).__name__}: return None, or a dict of the "
                                "scalars declared in `logs`")  # fmt: skip
            for name, value in returned.items():
                self.log(name, value)
        for slot in self.layout.slots:
            if slot.loss_col not in self._values:
                raise StepError(f"optimizer {slot.name!r} is never applied: call ops.minimize({slot.name}, ...) or "
                                "ops.apply once a step, or leave it out of `trains`")  # fmt: skip
        missing = [name for name, col in self.layout.log_cols.items() if col not in self._values]
        if missing:
            raise StepError(f"`logs` declares {', '.join(missing)} but the step never logs it: ops.log(name, value) "
                            "each step, or leave it out of `logs`")  # fmt: skip
        for slot in self.layout.slots:
            if slot.regularized and slot.reg_col not in self._values:  # applied without ops.gradients
                self._values[slot.reg_col] = tf.constant(0.0)
        if self.layout.skip:
            finite = tf.reduce_all(tf.stack(self._finite)) if self._finite else tf.constant(True)
            self._values[self.layout.skip_col] = tf.cast(skipped.assign_add(tf.cast(~finite, tf.int64)), tf.float32)
        return tf.stack([self._values[col] for col in range(self.layout.width)])

    def _slot(self, optimizer: Any, call: str) -> Slot:
        slot = self._by_id.get(id(optimizer))
        if slot is None:
            names = ", ".join(s.name for s in self.layout.slots)
            raise StepError(f"ops.{call} got an optimizer that is not in `trains` ({names}): pass one of the step's "
                            "own optimizers (self.<name>)")  # fmt: skip
        return slot

    def _tape(self, slot: Slot, loss_fn: LossFn, batch: Any) -> tuple[tf.Tensor, tf.Tensor, list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            loss = loss_fn(batch)
            _scalar(loss, f"the loss for optimizer {slot.name!r}")
            reg = tf.constant(0.0, loss.dtype)
            if slot.regularized:  # Keras fit's loss: the compiled loss plus every model.losses term
                terms = [tf.cast(term, loss.dtype) for model in slot.models for term in model.losses]
                reg = tf.add_n(terms) if terms else reg
                loss = loss + reg
            scaled = slot.optimizer.scale_loss(loss) if slot.loss_scaling else loss
        grads = tape.gradient(scaled, slot.variables)
        return loss, reg, [tf.zeros_like(v) if g is None else g for g, v in zip(grads, slot.variables, strict=True)]

    def _apply(self, slot: Slot, grads: list[tf.Tensor]) -> tf.Operation:
        if self.distributed:  # Keras sums gradients across replicas again: hand it 1/R of the sum
            grads = [g / self.replicas for g in grads]
        slot.optimizer.apply_gradients(zip(grads, slot.variables, strict=True))
        return tf.no_op()


def finite_step(loss: tf.Tensor, grad_norm: tf.Tensor, loss_scaling: bool) -> tf.Tensor:
    """Float16 loss scaling: overflowing gradients are the LossScaleOptimizer's to skip; only the loss counts."""
    finite = tf.math.is_finite(loss)
    return finite if loss_scaling else finite & tf.math.is_finite(grad_norm)


def _scalar(value: Any, what: str) -> None:
    shape = getattr(value, "shape", None)
    if shape is None or shape.rank is None or shape.rank > 0:
        got = f"shape {tuple(shape)}" if shape is not None and shape.rank is not None else type(value).__name__
        raise StepError(f"{what} has {got}, not a scalar: reduce it (tf.reduce_mean)")


def _micro(batch: Any, j: Any, size: tf.Tensor) -> Any:
    return tf.nest.map_structure(lambda t: t[j * size : (j + 1) * size], batch)


def layout_of(step: Step, skip: bool, variable_path: Callable[[Any, str], str],
              distinct: Callable[[list[str]], list[str]]) -> Layout:  # fmt: skip
    """The row layout of `step`, once its models are built; StepError for a step that breaks the contract."""
    trains = dict(step.trains)
    if not trains:
        raise StepError("`trains` is empty: name at least one optimizer and the models it updates")
    logs = list(step.logs)
    for name in [*trains, *logs]:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise StepError(f"{name!r} in `trains` or `logs` is not a plain name (letters, digits, _): rename it")
    clashes = sorted({n for n in logs if logs.count(n) > 1} | {n for n in logs if n in trains or n in RESERVED})
    if clashes:
        raise StepError(f"`logs` names {', '.join(clashes)} twice or as a name the framework logs "
                        f"({', '.join(RESERVED)}, or an optimizer's): rename it")  # fmt: skip
    several = len(trains) > 1
    slots, owner = [], {}
    for opt_name, model_names in trains.items():
        optimizer = getattr(step, opt_name, None)
        if optimizer is None or not hasattr(optimizer, "apply_gradients"):
            raise StepError(f"`trains` names optimizer {opt_name!r} but self.{opt_name} is "
                            f"{type(optimizer).__name__}: set it to a Keras optimizer in __init__")  # fmt: skip
        if isinstance(model_names, str):
            model_names = (model_names,)
        models, variables, names = [], [], []
        for model_name in model_names:
            model = getattr(step, model_name, None)
            if model is None or not hasattr(model, "trainable_variables"):
                raise StepError(f"`trains` names model {model_name!r} for {opt_name!r} but self.{model_name} is "
                                f"{type(model).__name__}: set it to a model in __init__")  # fmt: skip
            models.append(model)
            for v in model.trainable_variables:
                if any(v is w for w in variables):
                    continue
                if id(v) in owner:
                    raise StepError(f"variable {v.name} is trained by both {owner[id(v)]!r} and {opt_name!r}: "
                                    "give each variable one optimizer")  # fmt: skip
                owner[id(v)] = opt_name
                variables.append(v)
                path = variable_path(v, getattr(model, "name", ""))
                names.append(f"{model_name}/{path}" if several or len(model_names) > 1 else path)
        if not variables:
            raise StepError(f"optimizer {opt_name!r} has no trainable variable (models: {', '.join(model_names)}): "
                            "build the models in build(batch), or unfreeze a layer")  # fmt: skip
        regularized = any(len(getattr(m, "losses", ()) or ()) for m in models)
        slots.append(Slot(opt_name, optimizer, models, variables, names, regularized))
    for model_name, model in step.models().items():
        stray = [v.name for v in getattr(model, "trainable_variables", []) if id(v) not in owner]
        if stray:
            raise StepError(f"model {model_name!r} has trainable variables no optimizer trains ({stray[0]}, ...): add "
                            f"it to `trains`, or set self.{model_name}.trainable = False")  # fmt: skip
    all_names = distinct([n for slot in slots for n in slot.variable_names])
    for slot in slots:
        slot.variable_names, all_names = all_names[: len(slot.variables)], all_names[len(slot.variables) :]
    return Layout(slots, logs, skip)
