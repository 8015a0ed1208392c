"""A user's own model, plugged in by `_target_` (see the README's "Your own model or loss")."""

import keras
import tensorflow as tf


class Quadratic(keras.Model):
    """y = (x * x) @ a + x @ b + c."""

    def __init__(self, units: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.a = self.add_weight(name="a", shape=(input_shape[-1], self.units))
        self.b = self.add_weight(name="b", shape=(input_shape[-1], self.units))
        self.c = self.add_weight(name="c", shape=(self.units,), initializer="zeros")

    def call(self, x, training=False):
        return (x * x) @ self.a + x @ self.b + self.c


def pinball(y_true: tf.Tensor, y_pred: tf.Tensor, tau: float = 0.5) -> tf.Tensor:
    """The quantile loss: tau-weighted absolute error."""
    err = y_true - y_pred
    return tf.reduce_mean(tf.maximum(tau * err, (tau - 1.0) * err))
