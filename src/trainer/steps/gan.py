"""A generative adversarial network: two models, two optimizers, two updates a step."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf

from trainer.steps.base import Ops, Step


def _bce(labels: float, logits: tf.Tensor) -> tf.Tensor:
    logits = tf.cast(logits, tf.float32)
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(tf.fill(tf.shape(logits), labels), logits))


class GAN(Step):
    """Goodfellow et al.'s GAN with the non-saturating generator loss: each step updates the discriminator on
    real and generated examples, then the generator through the updated discriminator.

    `generator` is a model node built with `units` = the data's feature count (a `_partial_` node: the step
    fills it in); it maps `latent_dim` Gaussian noise to an example. `discriminator` gives one logit. Each has its
    own optimizer node. The noise is drawn with ops.seed, so a resumed run draws what the whole run would have.
    The generator is the run's model: logged, served (noise in, examples out) and checkpointed as `model`.
    Metrics: train/discriminator_optimizer/loss and train/generator_optimizer/loss (and their lr and norms);
    train/loss is their sum; validation logs val/d_loss, val/g_loss and val/loss (their sum) on held-out real
    examples."""

    trains = {"discriminator_optimizer": ("discriminator",), "generator_optimizer": ("generator",)}

    def __init__(self, generator: Callable[..., Any], discriminator: Any, generator_optimizer: Any,
                 discriminator_optimizer: Any, latent_dim: int):  # fmt: skip
        super().__init__()
        self._make_generator, self.discriminator = generator, discriminator
        self.generator_optimizer, self.discriminator_optimizer = generator_optimizer, discriminator_optimizer
        self.latent_dim = latent_dim
        self.generator = None

    def build(self, batch: Any) -> None:
        x = batch[0]
        if self.generator is None:
            make = self._make_generator
            self.generator = make(units=int(x.shape[-1])) if callable(make) and not hasattr(make, "call") else make
        self.discriminator(self.generator(self.noise(x, tf.constant([0, 0], tf.int64))))
        self.discriminator(x)

    def noise(self, x: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        return tf.random.stateless_normal([tf.shape(x)[0], self.latent_dim], seed)

    def train_step(self, batch: Any, ops: Ops) -> None:
        x = tf.cast(batch[0], tf.float32)
        ops.minimize(self.discriminator_optimizer, self.discriminator_loss, (x, self.noise(x, ops.seed(1))))
        ops.minimize(self.generator_optimizer, self.generator_loss, self.noise(x, ops.seed(2)))

    def discriminator_loss(self, batch: Any) -> tf.Tensor:
        x, z = batch
        fake = self.generator(z, training=True)
        return _bce(1.0, self.discriminator(x, training=True)) + _bce(0.0, self.discriminator(fake, training=True))

    def generator_loss(self, z: tf.Tensor) -> tf.Tensor:
        return _bce(1.0, self.discriminator(self.generator(z, training=True), training=True))

    def eval_step(self, batch: Any) -> Mapping[str, tf.Tensor]:
        x = tf.cast(batch[0], tf.float32)
        z = self.noise(x, tf.constant([7, 7], tf.int64))  # the same noise at every evaluation
        fake = self.generator(z)
        d = _bce(1.0, self.discriminator(x)) + _bce(0.0, self.discriminator(fake))
        g = _bce(1.0, self.discriminator(fake))
        return {"loss": d + g, "d_loss": d, "g_loss": g}

    def exports(self) -> Any:
        return self.generator

    def export_example(self, n: int = 2) -> Any:
        """The served model's input: noise."""
        return tf.random.stateless_normal([n, self.latent_dim], [0, 0]).numpy()
