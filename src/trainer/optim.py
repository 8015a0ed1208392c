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


FLAT_MAX_SIZE = 16_384  # variables up to this many parameters share one flat vector's update
KERNEL_MIN_SIZE = 16_384  # variables of at least this many get TensorFlow's own fused Adam kernel, one op each


@dataclass(frozen=True)
class _FusedLayout:
    """Which update each variable gets, and where its parameters sit in the flat vector. Held in one object,
    not lists: Keras' optimizer tracks every list of variables set on it as its own variables."""

    flat: tuple  # the small variables, in build order
    index: dict[int, int]  # id() of a small variable (Keras' or its tf.Variable) -> its position in `flat`
    sizes: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    kernel: dict[int, tuple]  # id() of a large variable (either object) -> (its momentum, its velocity)

    @classmethod
    def of(cls, flat: list, kernel: dict[int, tuple]) -> _FusedLayout:
        index = {id(w): i for i, v in enumerate(flat) for w in (v, getattr(v, "value", v))}
        shapes = tuple(tuple(v.shape) for v in flat)
        return cls(tuple(flat), index, tuple(math.prod(s) for s in shapes), shapes, kernel)


def _handle(v: Any) -> tf.Tensor:
    return getattr(v, "value", v).handle


class _FusedAdam:
    """Adam's update in few ops: small variables on one flat vector, large ones by TensorFlow's fused kernel.

    Keras' Adam runs ~13 ops per variable per step, each a pass over the variable. Two costs follow, and
    each size of variable pays one of them:
    - small variables pay op dispatch (~2 us an op on a CPU, whatever the size): those up to FLAT_MAX_SIZE
      parameters are updated together on one flat vector, ~10 ops plus a split (PyTorch's `foreach`/fused
      Adam, apex's multi-tensor Adam). Copying into the vector and back costs ~1.6 ns a parameter against
      ~25 us saved a variable, which is why only small ones go there (MLP 32-64-64-1: 1.2x faster a step).
    - large variables pay memory traffic: 13 passes over a 1M-parameter kernel read and write ~100 MB a
      step. TensorFlow's `ResourceApplyAdam` kernel reads the variable, its two slots and the gradient once
      and writes three: one op, one pass. For 784-1024-1024-1's variables, measured: Keras' update 4.8-5.1 ms
      a step, the kernel 1.6-2.1 ms; the flat vector was slower than Keras there (7.4 ms: the copies).
    The arithmetic is Keras' (alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t); m += (g - m)(1 - beta_1);
    v += (g^2 - v)(1 - beta_2); var -= m * alpha / (sqrt(v) + epsilon)): the flat vector's matches Keras to
    the bit; the kernel's agrees to an ulp (4.8e-7 on weights ~1 after 3 steps; its vectorized loop rounds
    differently). Used when every variable is float32 and no tf.distribute strategy is active at build time;
    otherwise (and with `amsgrad` or `fused=False`) it is Keras' own per-variable update. Variables between
    the two sizes (if the constants ever differ) get Keras' update. In the flat vector a variable with no
    gradient in a step is updated as if its gradient were zero; a large one is left alone, as in Keras.

    It overrides one private Keras method, `_backend_update_step`; trainer.compat checks once that Keras
    still has it (and calls it), else this is Keras' own Adam with a one-line warning.
    """

    def __init__(self, *args: Any, fused: bool | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fused = fused
        self._fused: _FusedLayout | None = None

    def build(self, var_list: list) -> None:
        if self.built:
            return
        fusable = self.fused is not False and not self.amsgrad and not tf.distribute.has_strategy()
        if not (fusable and all(v.dtype == "float32" for v in var_list) and keras_fused_ok()):
            super().build(var_list)
            return
        keras.optimizers.Optimizer.build(self, var_list)  # iterations, lr, variable indices; no slots
        flat = [v for v in var_list if math.prod(v.shape) <= FLAT_MAX_SIZE]
        large = [v for v in var_list if math.prod(v.shape) > FLAT_MAX_SIZE]
        kernel = {}
        for v in large:  # in build order, so a checkpoint's slot names are the same in every run
            slots = (self.add_variable_from_reference(v, "momentum"), self.add_variable_from_reference(v, "velocity"))
            kernel.update({id(v): slots, id(getattr(v, "value", v)): slots})
        total = sum(math.prod(v.shape) for v in flat)
        if flat:
            self._flat_momentum = self.add_variable((total,), name="flat_momentum")
            self._flat_velocity = self.add_variable((total,), name="flat_velocity")
        self._fused = _FusedLayout.of(flat, kernel)

    def _backend_update_step(self, grads: list, trainable_variables: list, learning_rate: Any) -> None:
        layout = self._fused
        if layout is None:
            super()._backend_update_step(grads, trainable_variables, learning_rate)
            return
        step = tf.cast(self.iterations + 1, tf.float32)
        lr, beta_1, beta_2 = (tf.cast(x, tf.float32) for x in (learning_rate, self.beta_1, self.beta_2))
        beta_1_power, beta_2_power = tf.pow(beta_1, step), tf.pow(beta_2, step)
        pairs = list(zip(grads, trainable_variables, strict=True))
        if layout.flat:
            alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
            self._flat_update(layout, [(g, v) for g, v in pairs if id(v) in layout.index], alpha)
        epsilon = tf.cast(self.epsilon, tf.float32)
        for g, v in pairs:
            if id(v) not in layout.kernel:
                continue
            m, u = layout.kernel[id(v)]
            tf.raw_ops.ResourceApplyAdam(var=_handle(v), m=_handle(m), v=_handle(u), beta1_power=beta_1_power,
                                         beta2_power=beta_2_power, lr=lr, beta1=beta_1, beta2=beta_2, epsilon=epsilon,
                                         grad=tf.convert_to_tensor(g, tf.float32))  # fmt: skip

    def _flat_update(self, layout: _FusedLayout, pairs: list, alpha: tf.Tensor) -> None:
        given = {layout.index[id(v)]: g for g, v in pairs}
        parts = [given.get(i, tf.zeros(shape)) for i, shape in enumerate(layout.shapes)]
        g = tf.concat([tf.reshape(tf.convert_to_tensor(p, tf.float32), [-1]) for p in parts], axis=0)
        m = self._flat_momentum.value.assign_add((g - self._flat_momentum.value) * (1 - self.beta_1))
        v = self._flat_velocity.value.assign_add((tf.square(g) - self._flat_velocity.value) * (1 - self.beta_2))
        delta = (m * alpha) / (tf.sqrt(v) + self.epsilon)
        for var, d, shape in zip(layout.flat, tf.split(delta, layout.sizes), layout.shapes, strict=True):
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


def lr_range(min_lr: float, max_lr: float, steps: int) -> Schedule:
    """The LR range test's ramp: min_lr at step 0, rising exponentially to max_lr at step `steps - 1`.

    The exponential schedule with a rate above 1: `min_lr * (max_lr / min_lr) ** (step / (steps - 1))`."""
    return Schedule(min_lr, "exponential", steps, None, max(steps - 1, 1), max_lr / min_lr, None)


def build_optimizer(optimizer_cfg: DictConfig, schedule_cfg: DictConfig, total_steps: int,
                    schedule: Schedule | None = None) -> keras.Optimizer:  # fmt: skip
    """`optimizer.lr` becomes the schedule's starting point; every other key goes to the Keras optimizer.
    `schedule`: one built already (the LR finder's ramp, lr_range), in place of optimizer.lr and schedule_cfg."""
    kwargs = OmegaConf.to_container(optimizer_cfg, resolve=True)
    kwargs.pop("_partial_", None)
    lr = kwargs.pop("lr")
    if schedule is None:
        check_schedule(schedule_cfg, total_steps)
        schedule = Schedule(lr, total_steps=total_steps, **OmegaConf.to_container(schedule_cfg, resolve=True))
    return build(OmegaConf.create(kwargs), learning_rate=schedule)
