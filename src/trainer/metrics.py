"""The evaluation arithmetic, once: mean loss and the validation metrics over a whole split.

The trainer's validation (`StepLoop.evaluate`, on the device) and `trainer evaluate` (a logged model on its
run's data) both run `metrics_over_arrays` / `metrics_over_dataset`, so an evaluated model reproduces the
values its run logged. Batch losses are weighted by batch size: the mean does not depend on how the split is
cut. Metrics are `trainer.val_metrics` names: `accuracy` is the trainer's own (logits: > 0 for one output,
argmax otherwise), any other name is a `keras.metrics` one, updated on the device batch by batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

MIN_EVAL_BATCH = 1024  # examples per forward pass at least: fewer, larger calls; a batch's memory stays small


def eval_batch(batch_size: int) -> int:
    """Examples per evaluation forward pass for a run trained with `batch_size`."""
    return max(batch_size, MIN_EVAL_BATCH)


def default_metrics(task: str) -> list[str]:
    """What a run logs beside val/loss when `trainer.val_metrics` is null: accuracy for classification."""
    return [] if task == "regression" else ["accuracy"]


class Metrics:
    """The validation metrics of one run, as stateful objects updated inside the compiled evaluation.

    Built once, before any trace (their variables must exist outside tf.function); `reset()` before each
    evaluation. `sparse`: targets are class ids; `binary`: one logit per example.
    """

    def __init__(self, names: Sequence[str], task: str = "regression", sparse: bool = False):
        self.names = list(names)
        self.task, self.sparse = task, sparse
        self.objects = {name: self._build(name) for name in self.names if name != "accuracy"}

    def _build(self, name: str):
        import keras

        from trainer.config import TrainerError

        binary, key = self.task == "binary", name.lower()
        if key in ("auc", "pr_auc"):
            return keras.metrics.AUC(curve="PR" if key == "pr_auc" else "ROC", from_logits=binary, name=name)
        if key.startswith("top_") and key.endswith("_accuracy"):
            k = int(key.removeprefix("top_").removesuffix("_accuracy") or 5)
            cls = keras.metrics.SparseTopKCategoricalAccuracy if self.sparse else keras.metrics.TopKCategoricalAccuracy
            return cls(k=k, name=name)
        try:
            metric = keras.metrics.get(name)
        except ValueError:
            close = _close(name)
            raise TrainerError(
                f"trainer.val_metrics: {name!r} is not a keras.metrics name{f' (close: {close})' if close else ''}; "
                "e.g. accuracy, top_5_accuracy, auc, mean_absolute_error"
            ) from None
        return metric if isinstance(metric, keras.metrics.Metric) else keras.metrics.MeanMetricWrapper(metric, name)

    def reset(self) -> None:
        for metric in self.objects.values():
            metric.reset_state()

    def update(self, y: tf.Tensor, pred: tf.Tensor) -> tf.Tensor:
        """Feed one batch; returns its number of correct predictions (0 when accuracy is not asked for)."""
        for metric in self.objects.values():
            metric.update_state(y, pred)
        if "accuracy" not in self.names:
            return tf.constant(0.0)
        return tf.reduce_sum(tf.cast(hits(y, pred), tf.float32))

    def results(self, correct: tf.Tensor, n: tf.Tensor) -> dict[str, tf.Tensor]:
        out = {"accuracy": correct / n} if "accuracy" in self.names else {}
        return {**out, **{name: tf.cast(m.result(), tf.float32) for name, m in self.objects.items()}}


def _close(name: str) -> str:
    import difflib

    import keras

    names = [n for n in dir(keras.metrics) if not n.startswith("_")]
    return ", ".join(difflib.get_close_matches(name, names, n=3, cutoff=0.5))


def hits(y: tf.Tensor, pred: tf.Tensor) -> tf.Tensor:
    """Correct predictions: one logit > 0 against a 0/1 label for binary tasks, argmax against a class id or a
    one-hot row otherwise."""
    if y.shape.rank == 1:  # class ids
        return tf.equal(tf.argmax(pred, axis=-1, output_type=tf.int32), tf.cast(y, tf.int32))
    if y.shape[-1] == 1:
        return tf.equal(pred[:, 0] > 0, y[:, 0] > 0.5)
    return tf.equal(tf.argmax(pred, axis=-1), tf.argmax(y, axis=-1))


def _batch_terms(
    model: Callable, loss_fn: Callable, xb, yb, metrics: Metrics
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    pred = model(xb, training=False)
    pred = tf.cast(pred, yb.dtype if yb.dtype.is_floating else tf.float32)  # mixed precision: the loss in float32
    count = tf.cast(tf.shape(xb)[0], tf.float32)
    return tf.cast(loss_fn(yb, pred), tf.float32) * count, metrics.update(yb, pred), count


def metrics_over_arrays(model: Callable, loss_fn: Callable, x: tf.Tensor, y: tf.Tensor, batch: tf.Tensor,
                        metrics: Metrics) -> dict[str, tf.Tensor]:  # fmt: skip
    """Mean loss and metrics of `model` over (x, y), `batch` examples at a time; traceable (tf.function)."""
    n = tf.shape(x)[0]
    total_loss, correct = tf.constant(0.0), tf.constant(0.0)
    for start in tf.range(0, n, batch):
        loss, hit, _ = _batch_terms(model, loss_fn, x[start : start + batch], y[start : start + batch], metrics)
        total_loss += loss
        correct += hit
    count = tf.cast(n, tf.float32)
    return {"loss": total_loss / count, **metrics.results(correct, count)}


def metrics_over_dataset(model: Callable, loss_fn: Callable, dataset: tf.data.Dataset, metrics: Metrics,
                         features: Callable = lambda x: x) -> dict[str, tf.Tensor]:  # fmt: skip
    """The same over a batched tf.data split (streamed data); `features` is the input side's preprocessing."""
    total_loss, correct, count = tf.constant(0.0), tf.constant(0.0), tf.constant(0.0)
    for xb, yb in dataset:
        loss, hit, n = _batch_terms(model, loss_fn, features(xb), yb, metrics)
        total_loss += loss
        correct += hit
        count += n
    return {"loss": total_loss / count, **metrics.results(correct, count)}


def evaluate_model(model: Callable, loss_fn: Callable, x, y, batch_size: int, metrics: Metrics) -> dict[str, float]:
    """`metrics_over_arrays` compiled once for one model (the `trainer evaluate` path), as Python floats.
    `x` may be a batched tf.data.Dataset of (x, y) (streamed data; `y` is then None)."""
    metrics.reset()
    if isinstance(x, tf.data.Dataset):
        out = tf.function(lambda ds: metrics_over_dataset(model, loss_fn, ds, metrics))(x)
    else:
        compiled = tf.function(lambda x, y, batch: metrics_over_arrays(model, loss_fn, x, y, batch, metrics))
        out = compiled(tf.constant(x), tf.constant(y), tf.constant(eval_batch(batch_size), tf.int32))
    return {key: float(value) for key, value in out.items()}
