"""Built-in losses: `(y_true, y_pred) -> scalar`, mean-reduced over the batch.

A config names one with `_target_` and `_partial_: true`, so keyword settings (`delta`, `from_logits`)
are bound at build time (from conf/loss/*.yaml, their one home: no defaults here) and the loop only ever
calls `loss(y_true, y_pred)`. `loss=keras` is built whole instead (`keras_loss` returns a keras.losses
object, itself that callable), so a wrong name fails before training.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from trainer.config import TrainerError, close_names


def _mean(values: tf.Tensor, sample_weight: tf.Tensor | None) -> tf.Tensor:
    """The mean of elementwise losses ([b] or [b, k]); weighted, each example's mean over its outputs times its
    weight, summed and divided by the batch size: Keras' `sum_over_batch_size`, so weights of 1 change nothing.
    (Unweighted, the mean over all elements: the same number, bitwise as before weights existed.)"""
    if sample_weight is None:
        return tf.reduce_mean(values)
    per_example = tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]), axis=-1)
    weights = tf.reshape(tf.cast(sample_weight, per_example.dtype), [-1])
    return tf.reduce_sum(per_example * weights) / tf.cast(tf.shape(per_example)[0], per_example.dtype)


def squared(y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: tf.Tensor | None = None) -> tf.Tensor:
    """(y - y_pred)^2 summed over outputs, averaged over examples: the GradientTape introduction's loss."""
    return _mean(tf.reduce_sum(tf.square(y_true - y_pred), axis=-1), sample_weight)


def mse(y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: tf.Tensor | None = None) -> tf.Tensor:
    return _mean(tf.square(y_true - y_pred), sample_weight)


def mae(y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: tf.Tensor | None = None) -> tf.Tensor:
    return _mean(tf.abs(y_true - y_pred), sample_weight)


def huber(y_true: tf.Tensor, y_pred: tf.Tensor, delta: float, sample_weight: tf.Tensor | None = None) -> tf.Tensor:
    err = tf.abs(y_true - y_pred)
    quadratic = tf.minimum(err, delta)
    return _mean(0.5 * tf.square(quadratic) + delta * (err - quadratic), sample_weight)


def binary_crossentropy(y_true: tf.Tensor, y_pred: tf.Tensor, from_logits: bool,
                        sample_weight: tf.Tensor | None = None) -> tf.Tensor:  # fmt: skip
    if from_logits:
        return _mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y_true, logits=y_pred), sample_weight)
    p = tf.clip_by_value(y_pred, 1e-7, 1.0 - 1e-7)
    return _mean(-(y_true * tf.math.log(p) + (1.0 - y_true) * tf.math.log(1.0 - p)), sample_weight)


def categorical_crossentropy(y_true: tf.Tensor, y_pred: tf.Tensor, from_logits: bool,
                             sample_weight: tf.Tensor | None = None) -> tf.Tensor:  # fmt: skip
    if from_logits:
        return _mean(tf.nn.softmax_cross_entropy_with_logits(labels=y_true, logits=y_pred), sample_weight)
    p = tf.clip_by_value(y_pred, 1e-7, 1.0)
    return _mean(-tf.reduce_sum(y_true * tf.math.log(p), axis=-1), sample_weight)


def sparse_categorical_crossentropy(y_true: tf.Tensor, y_pred: tf.Tensor, from_logits: bool,
                                    sample_weight: tf.Tensor | None = None) -> tf.Tensor:  # fmt: skip
    """Integer class ids (shape [b] or [b, 1], any dtype: the data's arrays are floats) against one output per
    class: categorical cross-entropy without a one-hot copy of the labels (what image folders give)."""
    labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
    if from_logits:
        return _mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=y_pred), sample_weight)
    p = tf.clip_by_value(tf.gather(y_pred, labels, batch_dims=1), 1e-7, 1.0)
    return _mean(-tf.math.log(p), sample_weight)


def keras_loss(name: str, settings: dict[str, Any]) -> keras.losses.Loss:
    """Any keras.losses loss by class or function name (Huber, huber, MeanSquaredError, mse), built with
    `settings`. Keras' Loss objects reduce to the batch mean (`sum_over_batch_size`), so the object itself is
    the `(y_true, y_pred) -> scalar` the loop calls; it is built whole (`_partial_: false`), so a wrong name or
    setting fails before training."""
    cls = _loss_class(name)
    try:
        return cls(**settings)
    except TypeError as e:
        raise TrainerError(f"loss.settings={dict(settings)!r} do not fit keras.losses.{cls.__name__}: {e}") from None


def _squash(name: str) -> str:
    return name.replace("_", "").lower()


def _loss_class(name: str) -> type:
    """The keras.losses.Loss subclass `name` names; a function name (huber) or alias (mse) maps to its class by the
    function's own name (mean_squared_error -> MeanSquaredError)."""
    classes = {n: c for n, c in vars(keras.losses).items() if isinstance(c, type) and issubclass(c, keras.losses.Loss)}
    by_squashed = {_squash(n): c for n, c in classes.items() if n != "Loss"}
    found = by_squashed.get(_squash(name))
    if found is None:
        try:
            fn = keras.losses.get(name)  # Keras' aliases: mse, mae, kld, ...
        except (ValueError, TypeError):
            fn = None
        found = by_squashed.get(_squash(getattr(fn, "__name__", "")))
    if found is None:
        names = [n for n in classes if n != "Loss"]
        raise TrainerError(f"loss.name={name!r} is no keras.losses loss: {close_names(name, names)}")
    return found


CLASSIFICATION = (binary_crossentropy, categorical_crossentropy)
# Integer class ids as targets (0..n_classes-1), not 0/1 columns: outside CLASSIFICATION, whose targets are checked
# to be 0/1 (train.py), which class ids 2..9 would fail
CLASS_IDS = (sparse_categorical_crossentropy,)
REGRESSION = (squared, mse, mae, huber)  # losses of continuous targets (train.py checks them against the data)
