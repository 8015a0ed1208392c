"""The optimizer and its learning-rate schedule.

The schedule is a pure function of the step, evaluated by the Keras optimizer on its own `iterations`
counter inside the compiled step, so the learning rate logged for a step is the one that step used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from trainer.compat import keras_fused_ok
from trainer.config import TrainerError, build


@keras.saving.register_keras_serializable(package="trainer")
class Schedule(keras.optimizers.schedules.LearningRateSchedule):
    """constant | cosine | exponential | warmup_cosine, all starting from `lr`.

    Every key is required, as conf/schedule/*.yaml (their one home) gives them; a key the schedule does
    not read is None there."""

    def __init__(
        self,
        lr: float,
        name: str,
        total_steps: int,
        warmup_steps: int | None,
        decay_steps: int | None,
        decay_rate: float | None,
        final_lr_fraction: float | None,
    ):
        self.lr, self.name, self.total_steps = lr, name, total_steps
        self.warmup_steps, self.decay_rate, self.final_lr_fraction = (
            warmup_steps,
            decay_rate,
            final_lr_fraction,
        )
        # only warmup_cosine warms up; the other schedules' decay spans the whole run (build_optimizer
        # refuses a warmup_steps they would ignore, and a run too short for the decay)
        warmup = warmup_steps if name == "warmup_cosine" else 0
        self.decay_steps = decay_steps or max(total_steps - warmup, 1)

    def __call__(self, step: tf.Tensor) -> tf.Tensor:
        step = tf.cast(step, tf.float32)
        if self.name == "constant":
            return tf.constant(self.lr, tf.float32)
        if self.name == "exponential":
            return self.lr * tf.pow(self.decay_rate, step / self.decay_steps)
        warmup = float(self.warmup_steps) if self.name == "warmup_cosine" else 0.0
        progress = tf.clip_by_value((step - warmup) / self.decay_steps, 0.0, 1.0)
        floor = self.final_lr_fraction
        cosine = self.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + tf.cos(math.pi * progress)))
        if warmup == 0.0:
            return cosine
        return tf.where(step < warmup, self.lr * (step + 1.0) / warmup, cosine)

    def get_config(self) -> dict[str, Any]:
        keys = ("lr", "name", "total_steps", "warmup_steps", "decay_steps", "decay_rate", "final_lr_fraction")
        return {k: getattr(self, k) for k in keys}


FUSED_MAX_MEAN_SIZE = 16_384  # fused=None: flat while variables average at most this many parameters


@dataclass(frozen=True)
class _FlatLayout:
    """Where each variable's parameters sit in the flat vector. Held in one object, not lists: Keras'
    optimizer tracks every list of variables set on it as its own variables."""

    variables: tuple  # in build order, as Keras numbers them
    index: dict[int, int]  # id() of a variable (Keras' or its tf.Variable) -> its position
    sizes: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, var_list: list) -> _FlatLayout:
        index = {id(w): i for i, v in enumerate(var_list) for w in (v, getattr(v, "value", v))}
        shapes = tuple(tuple(v.shape) for v in var_list)
        return cls(tuple(var_list), index, tuple(math.prod(s) for s in shapes), shapes)


class _FusedAdam:
    """Adam's update for every variable at once, on one flat vector of all the model's parameters.

    Keras' Adam runs ~13 small ops per variable per step; on one vector it is ~10 ops plus a split, so a
    model of many small layers stops paying per-variable op dispatch (PyTorch's `foreach`/fused Adam,
    apex's multi-tensor Adam). The arithmetic is Keras', term for term, so the numbers match it. Used
    when every variable is float32 and no tf.distribute strategy is active at build time; otherwise (and
    with `amsgrad` or `fused=False`) it is Keras' own per-variable update. A variable that gets no
    gradient in a step is updated as if its gradient were zero.

    `fused=None` (the default) flattens only where it pays: copying the gradients into the flat vector
    and the update back out costs ~1.6 ns a parameter here, against ~25 us of op dispatch saved per
    variable, so it is used while variables average at most FUSED_MAX_MEAN_SIZE parameters (MLP
    32-64-64-1: ~1,000, 1.2x faster a step; 784-1024-1024-1: ~310,000, where flat was 8% slower).

    It overrides one private Keras method, `_backend_update_step`; trainer.compat checks once that Keras
    still has it (and calls it), else this is Keras' own Adam with a one-line warning.
    """

    def __init__(self, *args: Any, fused: bool | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fused = fused
        self._flat: _FlatLayout | None = None

    def build(self, var_list: list) -> None:
        if self.built:
            return
        small = sum(math.prod(v.shape) for v in var_list) <= FUSED_MAX_MEAN_SIZE * max(len(var_list), 1)
        flat = (small if self.fused is None else self.fused) and not self.amsgrad and not tf.distribute.has_strategy()
        if not (flat and all(v.dtype == "float32" for v in var_list) and keras_fused_ok()):
            super().build(var_list)
            return
        keras.optimizers.Optimizer.build(self, var_list)  # iterations, lr, variable indices; no slots
        layout = _FlatLayout.of(var_list)
        total = sum(layout.sizes)
        self._flat_momentum = self.add_variable((total,), name="flat_momentum")
        self._flat_velocity = self.add_variable((total,), name="flat_velocity")
        self._flat = layout

    def _backend_update_step(self, grads: list, trainable_variables: list, learning_rate: Any) -> None:
        layout = self._flat
        if layout is None:
            super()._backend_update_step(grads, trainable_variables, learning_rate)
            return
        given = {layout.index[id(v)]: g for g, v in zip(grads, trainable_variables, strict=True)}
        parts = [given.get(i, tf.zeros(shape)) for i, shape in enumerate(layout.shapes)]
        g = tf.concat([tf.reshape(tf.convert_to_tensor(p, tf.float32), [-1]) for p in parts], axis=0)
        step = tf.cast(self.iterations + 1, tf.float32)
        alpha = tf.cast(learning_rate, tf.float32) * tf.sqrt(1 - tf.pow(self.beta_2, step))
        alpha /= 1 - tf.pow(self.beta_1, step)
        m = self._flat_momentum.value.assign_add((g - self._flat_momentum.value) * (1 - self.beta_1))
        v = self._flat_velocity.value.assign_add((tf.square(g) - self._flat_velocity.value) * (1 - self.beta_2))
        delta = (m * alpha) / (tf.sqrt(v) + self.epsilon)
        for var, d, shape in zip(layout.variables, tf.split(delta, layout.sizes), layout.shapes, strict=True):
            var.value.assign_sub(tf.reshape(d, shape))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "fused": self.fused}


@keras.saving.register_keras_serializable(package="trainer")
class Adam(_FusedAdam, keras.optimizers.Adam):
    """keras.optimizers.Adam, with the fused flat update (`fused=None`, the default: where it pays)."""


@keras.saving.register_keras_serializable(package="trainer")
class AdamW(_FusedAdam, keras.optimizers.AdamW):
    """keras.optimizers.AdamW (decoupled weight decay by Keras), with the fused flat update."""


def check_schedule(schedule_cfg: DictConfig, total_steps: int) -> None:
    """Settings that only the run's length shows to be wrong (the rest are checked in config.Schedule).

    A warm-up as long as the run leaves nothing for the decay: with the decay over `total - warmup`
    steps, `schedule=warmup_cosine schedule.warmup_steps=100000 trainer.max_steps=10` would never leave
    its warm-up ramp.
    """
    warmup = schedule_cfg.warmup_steps
    if schedule_cfg.name == "warmup_cosine" and warmup >= total_steps:
        raise TrainerError(
            f"schedule.warmup_steps={warmup} is not below the run's {total_steps} steps (trainer.max_steps / "
            "trainer.epochs): the run would end in its warm-up; lower it or train longer"
        )


def build_optimizer(optimizer_cfg: DictConfig, schedule_cfg: DictConfig, total_steps: int) -> keras.Optimizer:
    """`optimizer.lr` becomes the schedule's starting point; every other key goes to the Keras optimizer."""
    check_schedule(schedule_cfg, total_steps)
    kwargs = OmegaConf.to_container(optimizer_cfg, resolve=True)
    kwargs.pop("_partial_", None)
    lr = kwargs.pop("lr")
    schedule = Schedule(lr, total_steps=total_steps, **OmegaConf.to_container(schedule_cfg, resolve=True))
    return build(OmegaConf.create(kwargs), learning_rate=schedule)
