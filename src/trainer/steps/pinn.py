"""A physics-informed network: the loss is an ODE's residual, from nested tapes (d2u/dt2 of the model)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from trainer.steps.base import Ops, Step


class Oscillator(Step):
    """u(t) with u'' + omega^2 u = 0, u(0) = u0, u'(0) = v0 (Raissi et al.'s PINN, for the harmonic oscillator).

    The batch's x are collocation times t (the data's y, the analytic solution, is not trained on): the loss is
    mean((u'' + omega^2 u)^2) at them plus `initial_weight` times the squared misfit of u(0) and u'(0). Both
    derivatives come from nested GradientTapes around the model. Validation compares u with the data's y:
    val/rel_l2 = ||u - y|| / ||y|| over the split, and val/loss is the physics loss."""

    trains = {"optimizer": ("model",)}

    def __init__(self, model: Any, optimizer: Any, omega: float, u0: float, v0: float, initial_weight: float):
        super().__init__()
        self.model, self.optimizer = model, optimizer
        self.omega, self.u0, self.v0, self.initial_weight = omega, u0, v0, initial_weight

    def build(self, batch: Any) -> None:
        self.model(batch[0])

    def derivatives(self, t: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """u, du/dt and d2u/dt2 at t (one time a row)."""
        with tf.GradientTape() as outer:
            outer.watch(t)
            with tf.GradientTape() as inner:
                inner.watch(t)
                u = tf.cast(self.model(t, training=True), tf.float32)
            du = inner.gradient(u, t)
        return u, du, outer.gradient(du, t)

    def physics_loss(self, t: tf.Tensor) -> tf.Tensor:
        t = tf.cast(t, tf.float32)
        u, _, d2u = self.derivatives(t)
        residual = tf.reduce_mean(tf.square(d2u + self.omega**2 * u))
        u_0, du_0, _ = self.derivatives(tf.zeros([1, 1]))
        initial = tf.square(u_0[0, 0] - self.u0) + tf.square(du_0[0, 0] - self.v0)
        return residual + self.initial_weight * initial

    def train_step(self, batch: Any, ops: Ops) -> None:
        ops.minimize(self.optimizer, self.physics_loss, batch[0])

    def eval_step(self, batch: Any) -> Mapping[str, tf.Tensor]:
        t, y = tf.cast(batch[0], tf.float32), tf.cast(batch[1], tf.float32)
        u = tf.cast(self.model(t), tf.float32)
        return {"loss": self.physics_loss(t), "sq_error": tf.reduce_mean(tf.square(u - y)),
                "sq_reference": tf.reduce_mean(tf.square(y))}  # fmt: skip

    def eval_results(self, means: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
        return {"loss": means["loss"], "rel_l2": tf.sqrt(means["sq_error"] / means["sq_reference"])}
