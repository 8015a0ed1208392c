"""`data.target_scale`: regression targets standardized for training, every reported number in their own units.

Targets in dollars or grams barely trained at the defaults: penguins' body_mass_g with `model=linear` ended
220x worse than Ridge, and diabetes' raw target 9.5x worse than least squares (the final train loss ~mean(y^2)).
With `standard`, the training split's per-target mean and standard deviation make the loss see
(y - mean) / std: the model learns standardized outputs. Nothing else changes units:
- the data keeps the targets as read (held, streamed, `trainer evaluate`'s files);
- evaluation puts the outputs back, output * std + mean, so val/loss and val/<metric> are in the targets' units
  and compare with other tools;
- the logged model ends with that same step (a Keras Normalization layer, invert=True): it predicts in the
  targets' units.
`train/loss` alone is in standardized units (README: Data). `auto` is `standard` for a table's regression
targets (csv, parquet), `none` elsewhere (your own arrays, synthetic data, the GradientTape introduction).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from trainer.config import TrainerError
from trainer.data.core import Dataset

SCALES = ("auto", "standard", "none")


def target_scale(data: Dataset, setting: str, table: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std) per target, float32, for the loss to standardize with; None when the targets stay as they are.
    A target with no spread in the training split keeps std 1 (nothing to scale)."""
    if setting not in SCALES:
        raise TrainerError(f"data.target_scale={setting!r} is invalid: expected {' | '.join(SCALES)}")
    if setting == "none" or data.task != "regression" or (setting == "auto" and not table):
        return None
    n, total, squares = 0, 0.0, 0.0
    for y in _target_batches(data):
        y = y.reshape(len(y), -1).astype(np.float64)
        n, total, squares = n + len(y), total + y.sum(0), squares + np.square(y).sum(0)
    mean = total / max(n, 1)
    std = np.sqrt(np.maximum(squares / max(n, 1) - np.square(mean), 0.0))
    std = np.where(std > 0, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def _target_batches(data: Dataset):
    if not data.streamed:
        yield np.asarray(data.y_train)
        return
    for _, y in data.train.blocks().as_numpy_iterator():
        yield y


def scaled_loss(loss: Callable, scale: tuple[np.ndarray, np.ndarray]) -> Callable:
    """`loss` on standardized targets: what training minimizes. `.evaluated` is `loss` itself, which evaluation
    applies to outputs put back in the targets' units (loop.StepLoop.eval_model)."""
    import tensorflow as tf

    mean, std = (tf.constant(a, tf.float32) for a in scale)

    def scaled(y_true: tf.Tensor, y_pred: tf.Tensor, **kwargs: Any) -> tf.Tensor:
        return loss((tf.cast(y_true, tf.float32) - mean) / std, y_pred, **kwargs)

    scaled.evaluated = loss
    return scaled


def unscale_layer(scale: tuple[np.ndarray, np.ndarray]) -> Any:
    """The logged model's last layer: standardized outputs back in the targets' units (output * std + mean)."""
    import keras

    mean, std = scale
    return keras.layers.Normalization(axis=-1, mean=mean, variance=np.square(std), invert=True, name="target_units")
