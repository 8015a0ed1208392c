"""Built-in losses: `(y_true, y_pred) -> scalar`, mean-reduced over the batch.

A config names one with `_target_` and `_partial_: true`, so keyword settings (`delta`, `from_logits`)
are bound at build time (from conf/loss/*.yaml, their one home: no defaults here) and the loop only ever
calls `loss(y_true, y_pred)`.
"""

from __future__ import annotations

import tensorflow as tf


def squared(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """(y - y_pred)^2 summed over outputs, averaged over examples: the GradientTape introduction's loss."""
    return tf.reduce_mean(tf.reduce_sum(tf.square(y_true - y_pred), axis=-1))


def mse(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.square(y_true - y_pred))


def mae(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.abs(y_true - y_pred))


def huber(y_true: tf.Tensor, y_pred: tf.Tensor, delta: float) -> tf.Tensor:
    err = tf.abs(y_true - y_pred)
    quadratic = tf.minimum(err, delta)
    return tf.reduce_mean(0.5 * tf.square(quadratic) + delta * (err - quadratic))


def binary_crossentropy(y_true: tf.Tensor, y_pred: tf.Tensor, from_logits: bool) -> tf.Tensor:
    if from_logits:
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y_true, logits=y_pred))
    p = tf.clip_by_value(y_pred, 1e-7, 1.0 - 1e-7)
    return -tf.reduce_mean(y_true * tf.math.log(p) + (1.0 - y_true) * tf.math.log(1.0 - p))


def categorical_crossentropy(y_true: tf.Tensor, y_pred: tf.Tensor, from_logits: bool) -> tf.Tensor:
    if from_logits:
        return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=y_true, logits=y_pred))
    p = tf.clip_by_value(y_pred, 1e-7, 1.0)
    return -tf.reduce_mean(tf.reduce_sum(y_true * tf.math.log(p), axis=-1))


CLASSIFICATION = (binary_crossentropy, categorical_crossentropy)
