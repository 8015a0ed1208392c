"""The optimizer and its learning-rate schedule.

The schedule is a pure function of the step, evaluated by the Keras optimizer on its own `iterations`
counter inside the compiled step, so the learning rate logged for a step is the one that step used.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from trainer.config import build


@keras.saving.register_keras_serializable(package="trainer")
class Schedule(keras.optimizers.schedules.LearningRateSchedule):
    """constant | cosine | exponential | warmup_cosine, all starting from `lr`."""

    def __init__(
        self,
        lr: float,
        name: str = "constant",
        total_steps: int = 1,
        warmup_steps: int = 0,
        decay_steps: int | None = None,
        decay_rate: float = 0.96,
        final_lr_fraction: float = 0.0,
    ):
        self.lr, self.name, self.total_steps = lr, name, total_steps
        self.warmup_steps, self.decay_rate, self.final_lr_fraction = (
            warmup_steps,
            decay_rate,
            final_lr_fraction,
        )
        self.decay_steps = decay_steps or max(total_steps - warmup_steps, 1)

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


def build_optimizer(optimizer_cfg: DictConfig, schedule_cfg: DictConfig, total_steps: int) -> keras.Optimizer:
    """`optimizer.lr` becomes the schedule's starting point; every other key goes to the Keras optimizer."""
    kwargs = OmegaConf.to_container(optimizer_cfg, resolve=True)
    kwargs.pop("_partial_", None)
    lr = kwargs.pop("lr")
    schedule = Schedule(lr, total_steps=total_steps, **OmegaConf.to_container(schedule_cfg, resolve=True))
    return build(OmegaConf.create(kwargs), learning_rate=schedule)
