"""`data.class_weight`: each class's weight in the loss, from the training split's labels.

`balanced` is scikit-learn's rule, n_samples / (n_classes * count(class)), so a weighted run compares with
scikit-learn's `class_weight='balanced'`; a mapping `{label: weight}` names classes as the data does (the class
names of a text column, else the ids) and leaves the others at 1. The weights multiply each example's loss,
reduced as Keras reduces `sample_weight` (losses._mean): the weighted loss is what is minimized and logged as
train/loss. Validation is unweighted, as in Keras' `fit`: val/loss and val/accuracy are what `trainer evaluate`
reproduces (README: Data, class weights).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from trainer.config import TrainerError
from trainer.data.core import Dataset, val_mask


def class_weights(data: Dataset, setting: Any) -> np.ndarray | None:
    """The weight of each class id (float32, one per class), or None when `setting` is null."""
    if setting is None:
        return None
    shown = f"data.class_weight={_shown(setting)}"
    if data.task not in ("binary", "multiclass"):
        raise TrainerError(f"{shown}: the data is a {data.task} task; class weights need classes: remove it")
    if data.task == "binary" and data.y_shape and int(np.prod(data.y_shape)) > 1:
        raise TrainerError(f"{shown}: the data has {int(np.prod(data.y_shape))} binary targets per example; class "
                           "weights need one class per example: remove it")  # fmt: skip
    counts = class_counts(data)
    names = list(data.labels) if data.labels else [str(i) for i in range(len(counts))]
    if isinstance(setting, str):
        if setting != "balanced":
            raise TrainerError(f"{shown}: expected balanced, or a mapping {{label: weight}} such as "
                               f"{{{names[0]}: 1, {names[-1]}: 3}}")  # fmt: skip
        if (counts == 0).any():
            absent = [names[i] for i in np.flatnonzero(counts == 0)]
            raise TrainerError(f"{shown}: class {absent[0]!r} has no example in the training split, so it has no "
                               "balanced weight; give weights by label instead")  # fmt: skip
        return (counts.sum() / (len(counts) * counts)).astype(np.float32)
    if not isinstance(setting, Mapping):
        raise TrainerError(f"{shown}: expected balanced, or a mapping {{label: weight}}")
    weights = np.ones(len(counts), np.float32)
    for label, weight in setting.items():
        if str(label) not in names:
            raise TrainerError(f"{shown}: no class {label!r} in the data; its classes are {names[:20]}")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
            raise TrainerError(f"{shown}: the weight of {label!r} is {weight!r}; use a finite number >= 0")
        weights[names.index(str(label))] = weight
    if not weights.any():
        raise TrainerError(f"{shown}: every class weighs 0, so nothing would be learned")
    return weights


def sample_weights(weights: np.ndarray | None, data: Dataset, s: Any) -> np.ndarray | None:
    """The training split's rows of `weights` (data.sample_weight's column, one per row of the table), cut by
    the same val_mask as the rows themselves."""
    if weights is None:
        return None
    if data.streamed:
        raise TrainerError("data.sample_weight needs the table held in memory: set data.in_memory=true or auto")
    held_out = val_mask(len(weights), s.val_fraction, s.seed, s.folds, s.fold)
    train = weights[~held_out] if data.has_val else weights
    if len(train) != len(data.x_train):  # the reader's rows and the split's: a bug here, not the user's
        raise TrainerError(f"data.sample_weight: {len(train)} weights for {len(data.x_train)} training rows")
    if not train.any():
        raise TrainerError("data.sample_weight: every weight of the training split is 0, so nothing would be learned")
    return train


def class_counts(data: Dataset) -> np.ndarray:
    """Examples per class id in the training split (one pass over a stream's targets)."""
    n = 2 if data.task == "binary" else int(data.n_classes or 0)
    if not data.streamed:
        return _count(data.y_train, data, n)
    total = np.zeros(n, np.int64)
    for _, y in data.train.blocks().as_numpy_iterator():
        total += _count(y, data, n)
    return total


def _count(y: np.ndarray, data: Dataset, n: int) -> np.ndarray:
    if data.one_hot:
        return np.bincount(np.asarray(y).reshape(len(y), -1).argmax(axis=1), minlength=n)
    ids = np.asarray(y).reshape(-1)
    return np.bincount((ids > 0.5).astype(np.int64) if data.task == "binary" else ids.astype(np.int64), minlength=n)


def weighted_loss(loss: Callable, weights: np.ndarray, data: Dataset, name: str) -> Callable:
    """`loss(y_true, y_pred)` with each example weighted by its class (`sample_weight`, which the loss must
    take: the built-in losses and Keras' do)."""
    import tensorflow as tf

    require_sample_weight(loss, "data.class_weight", name)
    table = tf.constant(weights, tf.float32)
    task, one_hot = data.task, data.one_hot

    def class_ids(y: tf.Tensor) -> tf.Tensor:
        if one_hot:
            return tf.argmax(tf.reshape(y, [tf.shape(y)[0], -1]), axis=-1, output_type=tf.int32)
        flat = tf.reshape(y, [-1])
        return tf.cast(flat > 0.5, tf.int32) if task == "binary" else tf.cast(flat, tf.int32)

    def weighted(y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: tf.Tensor | None = None) -> tf.Tensor:
        weight = tf.gather(table, class_ids(y_true))  # data.sample_weight's, when given, multiplies it
        return loss(y_true, y_pred, sample_weight=weight if sample_weight is None else weight * sample_weight)

    weighted.evaluated = loss  # what evaluation reports (loop.StepLoop.loss_fn)
    return weighted


def require_sample_weight(loss: Callable, setting: str, name: str) -> None:
    """`setting` weights the loss through its sample_weight argument: one the loss must take."""
    if not _takes_sample_weight(loss):
        raise TrainerError(f"{setting} needs a loss that takes sample_weight; loss {name} does not: use a built-in "
                           "loss or loss=keras, or add a sample_weight=None argument to yours")  # fmt: skip


def _takes_sample_weight(loss: Callable) -> bool:
    try:
        return "sample_weight" in inspect.signature(loss).parameters
    except (TypeError, ValueError):
        return False


def _shown(setting: Any) -> str:
    if isinstance(setting, Mapping):
        return "{" + ", ".join(f"{k}: {v}" for k, v in setting.items()) + "}"
    return str(setting)
