"""The rules of data/prepare.py: the task from the targets, statistics from the training split only, the same
preprocessing in training and in the logged model, class ids renumbered to a model's own."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from trainer.config import TrainerError
from trainer.data import Dataset, Examples, val_mask
from trainer.data.prepare import infer_task, prepare, preprocessing_layers, relabel, settings
from trainer.inputs import ArrayInput


@pytest.mark.parametrize(
    ("y", "labels", "task"),
    [
        (np.array([0, 1, 1, 0]), None, "binary"),
        (np.array([[0.0], [1.0], [1.0]]), None, "binary"),
        (np.array([0, 2, 1, 3]), None, "multiclass"),
        (np.array([0.0, 2.0, 1.0]), None, "multiclass"),  # whole numbers 0..k-1, as floats (a CSV's class column)
        (np.array([25.0, 310.0, 151.0]), None, "regression"),  # whole numbers that are no class ids (diabetes)
        (np.array([1, 2, 3, 4, 5]), None, "regression"),  # 1..5: not starting at 0
        (np.array([0.5, 1.5]), None, "regression"),
        (np.eye(3)[[0, 2, 1]], None, "multiclass"),
        (np.array([0, 1, 0]), ["benign", "malignant"], "binary"),
        (np.array([0, 1, 2]), ["a", "b", "c"], "multiclass"),
    ],
)
def test_the_task_is_read_from_the_targets(y, labels, task):
    assert infer_task(y, labels) == task


def _settings(**changes):
    return settings(OmegaConf.create(changes))


def test_statistics_come_from_the_training_split_and_the_logged_layers_compute_the_same():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((400, 3)) * [1.0, 100.0, 1e4] + [5.0, -300.0, 2e5]).astype(np.float32)
    y = rng.standard_normal((400, 1)).astype(np.float32)
    ex = Examples(400, (3,), (1,), arrays=(x, y))
    data = prepare(ex, _settings(normalize="standard", val_fraction=0.25, seed=1))
    train = x[~val_mask(400, 0.25, 1)].astype(np.float64)
    np.testing.assert_allclose(data.preprocess["mean"], train.mean(0), rtol=1e-6)
    np.testing.assert_allclose(data.preprocess["variance"], train.var(0), rtol=1e-6)
    inputs = ArrayInput(data.x_train, data.y_train, 10, preprocess=data.preprocess, shuffle=False)
    held = inputs.eval_arrays()[0].numpy()  # what the step sees: standardized once, on the device
    np.testing.assert_allclose(held.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(held.std(0), 1.0, atol=1e-4)
    logged = keras.Sequential([keras.Input((3,)), *preprocessing_layers(data.preprocess)])
    np.testing.assert_array_equal(logged(data.x_train).numpy(), held)  # the logged model: the same bits
    minmax = prepare(ex, _settings(normalize="minmax", val_fraction=0.25, seed=1))
    scaled = keras.Sequential([keras.Input((3,)), *preprocessing_layers(minmax.preprocess)])(minmax.x_train).numpy()
    np.testing.assert_allclose([scaled.min(0), scaled.max(0)], [[0, 0, 0], [1, 1, 1]], atol=1e-5)


def test_a_stream_fits_the_same_statistics_in_one_pass():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((3000, 2)) * [3.0, 0.1] + [1.0, 7.0]).astype(np.float32)
    ex = Examples(3000, (2,), (1,), arrays=(x, rng.standard_normal((3000, 1)).astype(np.float32)))
    held = prepare(ex, _settings(normalize="standard", seed=3))
    streamed = prepare(ex, _settings(normalize="standard", seed=3, in_memory="false"))
    assert streamed.streamed and not held.streamed
    for key in ("mean", "variance"):
        np.testing.assert_allclose(streamed.preprocess[key], held.preprocess[key], rtol=1e-5)


def test_class_ids_are_renumbered_to_the_models_own():
    data = Dataset(np.zeros((3, 1), np.float32), np.array([0, 1, 1], np.int32), None, None, "multiclass",
                   labels=["b", "c"])  # fmt: skip
    out = relabel(data, ["a", "b", "c"])
    assert out.y_train.tolist() == [1, 2, 2] and out.labels == ["a", "b", "c"] and out.n_classes == 3
    with pytest.raises(TrainerError, match=r"classes the model never saw: \['d'\]"):
        relabel(Dataset(np.zeros((1, 1)), np.array([0]), None, None, "multiclass", labels=["d"]), ["a", "b"])


def test_a_streamed_splits_class_ids_are_renumbered_in_its_rows_and_its_blocks():
    """`trainer evaluate` of a streamed file whose classes are a subset: both splits' ids shift, read either way."""
    from trainer.data import Stream
    from trainer.data.prepare import _as_streams

    held = Dataset(np.zeros((5, 1), np.float32), np.array([0, 1, 1, 0, 1], np.int32), np.zeros((2, 1), np.float32),
                   np.array([1, 0], np.int32), "multiclass", labels=["b", "c"])  # fmt: skip
    out = relabel(_as_streams(held), ["a", "b", "c"])
    assert isinstance(out.train, Stream) and out.labels == ["a", "b", "c"] and out.n_classes == 3
    assert [int(y) for _, y in out.train.read().as_numpy_iterator()] == [1, 2, 2, 1, 2]
    assert np.concatenate([y for _, y in out.val.blocks().as_numpy_iterator()]).tolist() == [2, 1]


def test_a_class_task_on_targets_that_are_no_class_ids_names_the_fix():
    ex = Examples(3, (1,), (1,), arrays=(np.zeros((3, 1), np.float32), np.array([[0.5], [1.0], [2.0]], np.float32)))
    with pytest.raises(TrainerError, match=r"data\.task=multiclass needs class ids .* set data\.task=regression"):
        prepare(ex, _settings(task="multiclass", val_fraction=0.0))


def test_augmentation_acts_on_training_batches_only(digits):
    """data.augment on held images: each training batch is flipped at random inside the step; evaluation and
    the logged model's layers see the images as they are."""
    import tensorflow as tf

    x = digits["x"][:64]
    pre = {"rescale": 1 / 255, "augment": {"flip": "horizontal"}}
    inputs = ArrayInput(x, digits["y"][:64], 64, shuffle=False, preprocess=pre)
    inputs.build()
    batch = inputs.batch(tf.constant(0, tf.int64))[0].numpy()
    plain = x.astype(np.float32) / 255
    mirrored = plain[:, :, ::-1, :]
    same = np.isclose(batch, plain, atol=1e-6).all(axis=(1, 2, 3))
    flipped = np.isclose(batch, mirrored, atol=1e-6).all(axis=(1, 2, 3))
    assert (same | flipped).all() and flipped[~same].any() and same.any()
    np.testing.assert_allclose(inputs.eval_arrays()[0].numpy(), plain, atol=1e-6)
    assert [type(layer).__name__ for layer in preprocessing_layers(pre)] == ["Rescaling"]


def test_a_class_task_on_whole_numbers_that_are_no_class_ids_names_the_fix():
    """Diabetes' targets 25..346 are whole numbers; data.task=multiclass on them is refused, not 347 classes."""
    y = np.arange(25.0, 346.0, 1.5).round()[:, None]
    ex = Examples(len(y), (1,), (1,), arrays=(np.zeros((len(y), 1), np.float32), y.astype(np.float32)))
    with pytest.raises(
        TrainerError, match=r"found \d+ values in \d+ rows \(25, 26, 28, 30, 31, \.\.\.\): set data\.task=regression"
    ):
        prepare(ex, _settings(task="multiclass", val_fraction=0.0))
