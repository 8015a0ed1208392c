"""Your own training step: mixup (Zhang et al. 2018), written as the README's worked example of the step contract.

Run from examples/ (so `my_steps` imports):
    python -m trainer hydra.searchpath=[file://my_conf] step=mixup data=wine model=mlp \
        loss=sparse_categorical_crossentropy

The step holds only the math: draw a mixing weight and a pairing, mix the inputs, weigh the two targets' losses.
The framework does the rest (model.losses, clipping, accumulation, tf.distribute, every step's metrics,
checkpoints and resume), because the one gradient goes through `ops.minimize`.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from trainer.steps import Ops, Supervised


class Mixup(Supervised):
    """Each step trains on lam * x_i + (1 - lam) * x_j, against lam * loss(y_i) + (1 - lam) * loss(y_j), with
    lam ~ Beta(alpha, alpha) and j a random pairing. Any loss works: the targets are not mixed, the losses are.
    `model`, `loss` and `optimizer` come from their config groups; `alpha` from this step's node."""

    logs = ("mix",)  # logged as train/mix at every step

    def __init__(self, model: Any, loss: Any, optimizer: Any, alpha: float):
        super().__init__(model, loss, optimizer)
        self.alpha = alpha

    def train_step(self, batch: Any, ops: Ops) -> dict[str, tf.Tensor]:
        x, y = batch
        # Stateless draws seeded by (trainer.seed, step): a resumed run draws exactly what it would have
        a = tf.random.stateless_gamma([], ops.seed(1), self.alpha)
        b = tf.random.stateless_gamma([], ops.seed(2), self.alpha)
        mix = tf.math.divide_no_nan(a, a + b)  # Beta(alpha, alpha); both draws can underflow to 0
        pairing = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(x)[0]), ops.seed(3))
        mixed = mix * x + (1.0 - mix) * tf.gather(x, pairing)

        def loss_fn(part: Any) -> tf.Tensor:  # gets a micro-batch when trainer.accumulate_steps > 1
            x_mixed, y_i, y_j = part
            return mix * self.objective((x_mixed, y_i)) + (1.0 - mix) * self.objective((x_mixed, y_j))

        ops.minimize(self.optimizer, loss_fn, (mixed, y, tf.gather(y, pairing)))
        return {"mix": mix}
