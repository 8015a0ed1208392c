"""The evaluation arithmetic, once: mean loss (and accuracy) over a whole split.

The trainer's validation (`StepLoop.evaluate`, on the device, inside the strategy) and `trainer evaluate`
(a logged model on its run's data) both call `split_metrics`, so an evaluated model reproduces the value its
run logged. Batch losses are weighted by batch size: the mean does not depend on how the split is cut.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

MIN_EVAL_BATCH = 1024  # examples per forward pass at least: fewer, larger calls; a batch's memory stays small


def eval_batch(batch_size: int) -> int:
    """Examples per evaluation forward pass for a run trained with `batch_size`."""
    return max(batch_size, MIN_EVAL_BATCH)


def split_metrics(
    model: Callable, loss_fn: Callable, x: tf.Tensor, y: tf.Tensor, batch: tf.Tensor, accuracy: bool
) -> dict[str, tf.Tensor]:
    """Mean loss (and accuracy) of `model` over (x, y), `batch` examples at a time; traceable (tf.function)."""
    n = tf.shape(x)[0]
    total_loss, correct = tf.constant(0.0), tf.constant(0.0)
    for start in tf.range(0, n, batch):
        xb, yb = x[start : start + batch], y[start : start + batch]
        pred = tf.cast(model(xb, training=False), yb.dtype)  # mixed precision: the loss in float32, as in training
        count = tf.cast(tf.shape(xb)[0], tf.float32)
        total_loss += tf.cast(loss_fn(yb, pred), tf.float32) * count
        if accuracy:
            correct += tf.reduce_sum(tf.cast(hits(yb, pred), tf.float32))
    out = {"loss": total_loss / tf.cast(n, tf.float32)}
    if accuracy:
        out["accuracy"] = correct / tf.cast(n, tf.float32)
    return out


def hits(y: tf.Tensor, pred: tf.Tensor) -> tf.Tensor:
    """Correct predictions: one logit > 0 against a 0/1 label for binary tasks, argmax against one-hot otherwise."""
    if y.shape[-1] == 1:
        return tf.equal(pred[:, 0] > 0, y[:, 0] > 0.5)
    return tf.equal(tf.argmax(pred, axis=-1), tf.argmax(y, axis=-1))


def evaluate_model(model: Callable, loss_fn: Callable, x, y, batch_size: int, accuracy: bool) -> dict[str, float]:
    """`split_metrics` compiled once for one model (the `trainer evaluate` path), as Python floats."""
    compiled = tf.function(lambda x, y, batch: split_metrics(model, loss_fn, x, y, batch, accuracy))
    out = compiled(tf.constant(x), tf.constant(y), tf.constant(eval_batch(batch_size), tf.int32))
    return {key: float(value) for key, value in out.items()}
