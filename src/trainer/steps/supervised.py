"""Steps on (x, y) batches: today's supervised step, sharpness-aware minimization and adversarial training."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf

from trainer.metrics import hits
from trainer.steps.base import Ops, Step


class Supervised(Step):
    """`loss(y, model(x))` plus the model's own losses (kernel/activity regularizers, `add_loss`), as Keras'
    `fit` computes it; one optimizer. `step=supervised`, the default."""

    trains = {"optimizer": ("model",)}
    weighted = True  # (x, y, sample_weight) batches: data.sample_weight

    def __init__(self, model: Any, loss: Callable, optimizer: Any):
        super().__init__()
        self.model, self.loss, self.optimizer = model, loss, optimizer

    def build(self, batch: Any) -> None:
        self.model(batch[0])

    def objective(self, batch: Any) -> tf.Tensor:
        """The data loss of one batch in float32 (mixed precision: the model's float16 output is cast first),
        weighted by the batch's third part where the data has one (data.sample_weight)."""
        x, y, *weight = batch
        pred = self.model(x, training=True)
        pred = tf.cast(pred, y.dtype if y.dtype.is_floating else tf.float32)  # class ids stay integers
        return self.loss(y, pred, sample_weight=weight[0]) if weight else self.loss(y, pred)

    def train_step(self, batch: Any, ops: Ops) -> None:
        ops.minimize(self.optimizer, self.objective, batch)

    def eval_extra(self, batch: Any) -> Mapping[str, tf.Tensor]:
        """Validation values beside the loss and trainer.val_metrics (batch means), logged as val/<name>."""
        return {}

    def _loss_on(self, x: tf.Tensor, y: tf.Tensor, training: bool = False) -> tf.Tensor:
        pred = self.model(x, training=training)
        return self.loss(y, tf.cast(pred, y.dtype if y.dtype.is_floating else tf.float32))


class SAM(Supervised):
    """Sharpness-aware minimization (Foret et al. 2021): the gradient at w + e, e = rho * g / ||g||, applied at w.

    `adaptive=true` is ASAM (Kwon et al. 2021): e = rho * w^2 g / ||w g||, scale-invariant. The logged loss is
    the loss at w (before the perturbation), the norms those of the gradient applied. Each step costs two
    forward and backward passes."""

    def __init__(self, model: Any, loss: Callable, optimizer: Any, rho: float, adaptive: bool):
        super().__init__(model, loss, optimizer)
        self.rho, self.adaptive = rho, adaptive

    def train_step(self, batch: Any, ops: Ops) -> None:
        loss, grads = ops.gradients(self.optimizer, self.objective, batch)
        variables = ops.variables(self.optimizer)
        if self.adaptive:
            scaled = [tf.abs(v) * g for v, g in zip(variables, grads, strict=True)]
            norm = tf.linalg.global_norm(scaled)
            eps = [self.rho * tf.abs(v) * s / (norm + 1e-12) for v, s in zip(variables, scaled, strict=True)]
        else:
            norm = tf.linalg.global_norm(grads)
            eps = [self.rho * g / (norm + 1e-12) for g in grads]
        saved = [tf.identity(v) for v in variables]  # restored exactly, not by subtracting e again
        for v, e in zip(variables, eps, strict=True):
            v.assign_add(tf.cast(e, v.dtype))
        _, sharp = ops.gradients(self.optimizer, self.objective, batch)
        for v, w in zip(variables, saved, strict=True):
            v.assign(w)
        ops.apply(self.optimizer, sharp, loss)


class Adversarial(Supervised):
    """Adversarial training (Goodfellow et al. 2015; Madry et al. 2018): the loss on inputs moved by up to
    `epsilon` (L-infinity, in the model's input units, after the data's preprocessing) against the model.

    `steps=1` is FGSM (one signed-gradient step of epsilon); more is PGD with steps of `step_size` (null:
    2.5 * epsilon / steps), from a random start drawn with ops.seed. The loss trained is
    (1 - adversarial_weight) * clean + adversarial_weight * adversarial. `clip: [lo, hi]` keeps perturbed
    inputs in range. Validation adds `val/adversarial_accuracy`: accuracy on FGSM inputs of the same epsilon."""

    def __init__(self, model: Any, loss: Callable, optimizer: Any, epsilon: float, steps: int,
                 step_size: float | None, adversarial_weight: float, clip: list[float] | None):  # fmt: skip
        super().__init__(model, loss, optimizer)
        self.epsilon, self.steps, self.weight = epsilon, steps, adversarial_weight
        self.step_size = step_size or (epsilon if steps == 1 else 2.5 * epsilon / steps)
        self.clip = tuple(clip) if clip else None

    def perturb(self, x: tf.Tensor, y: tf.Tensor, seed: tf.Tensor | None = None, steps: int | None = None) -> tf.Tensor:
        """x moved up the loss's input gradient (its sign), within epsilon of x; no gradient flows through it."""
        steps = steps or self.steps
        x = tf.cast(x, tf.float32)
        adv = x
        if steps > 1 and seed is not None:  # PGD's random start
            adv = x + tf.random.stateless_uniform(tf.shape(x), seed, -self.epsilon, self.epsilon)
        for _ in range(steps):  # unrolled: steps is a small Python int
            with tf.GradientTape() as tape:
                tape.watch(adv)
                loss = self._loss_on(adv, y)
            adv = adv + (self.step_size if steps > 1 else self.epsilon) * tf.sign(tape.gradient(loss, adv))
            adv = x + tf.clip_by_value(adv - x, -self.epsilon, self.epsilon)
            if self.clip:
                adv = tf.clip_by_value(adv, *self.clip)
        return tf.stop_gradient(adv)

    def train_step(self, batch: Any, ops: Ops) -> None:
        x, y, *weight = batch
        adv = self.perturb(x, y, ops.seed())
        ops.minimize(self.optimizer, self._mixed_objective, (x, adv, y, *weight))

    def _mixed_objective(self, batch: Any) -> tf.Tensor:
        x, adv, y, *weight = batch
        clean = self.objective((x, y, *weight)) if self.weight < 1 else 0.0
        return (1.0 - self.weight) * clean + self.weight * self.objective((adv, y, *weight))

    def eval_extra(self, batch: Any) -> Mapping[str, tf.Tensor]:
        x, y = batch
        pred = self.model(self.perturb(x, y, steps=1), training=False)
        return {"adversarial_accuracy": tf.reduce_mean(tf.cast(hits(y, pred), tf.float32))}
