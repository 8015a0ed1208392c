"""model=cnn, model=sequential, model=keras_app and the new losses, on real Keras/TensorFlow.

The images are scikit-learn's `load_digits` (1,797 8x8 grey images of 10 classes) as a [n, 8, 8, 1] array;
models are composed from conf/ as the CLI composes them, `units` set as the trainer sets it from the data.
"""

from __future__ import annotations

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf
from sklearn.datasets import load_digits

from conftest import compose_config
from trainer import loop, losses, models
from trainer.config import SCHEMAS, TrainerError, build, check, trusted_config

N_CLASSES = 10
CONV_LAYERS = (
    "model.layers=[{_target_: keras.layers.Conv2D, filters: 8, kernel_size: 3, activation: relu},"
    "{_target_: keras.layers.MaxPooling2D}, {_target_: keras.layers.Flatten}]"
)
# Per model option: the overrides of a small model, and the shape of one example it is tried on
SMALL = {
    "cnn": (["model=cnn", "model.filters=[8,16]", "model.hidden=[32]", "model.dropout=0.1"], (8, 8, 1)),
    "sequential": (["model=sequential", CONV_LAYERS], (8, 8, 1)),
    "keras_app": (["model=keras_app", "model.input_shape=[32,32,3]"], (32, 32, 3)),
}


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """The first 256 digits: images [256, 8, 8, 1] scaled to [0, 1], integer labels [256]."""
    data = load_digits()
    x = (data.images[:256] / 16.0).astype(np.float32)[..., None]
    return x, data.target[:256].astype(np.int64)


def _images(name: str, digits) -> np.ndarray:
    """Digits at the option's input shape: keras_app's 32x32x3 are the 8x8 digits scaled up, in 3 channels."""
    x = digits[0]
    if name == "keras_app":
        x = np.repeat(np.repeat(np.repeat(x, 4, axis=1), 4, axis=2), 3, axis=3) * 255.0  # MobileNet rescales itself
    return x


def _model(name: str, *extra: str):
    """The option built as the trainer builds it, with `units` (null in the YAML) set from the data."""
    overrides, _ = SMALL[name]
    cfg = compose_config([*overrides, f"model.units={N_CLASSES}", *extra])
    check(cfg)
    return build(cfg.model)


def _train(model, x: np.ndarray, y: np.ndarray, steps: int, lr: float) -> list[float]:
    """`steps` GradientTape steps with Adam on one batch; the loss before each step."""
    loss_fn = build(compose_config(["loss=sparse_categorical_crossentropy"]).loss)
    optimizer = keras.optimizers.Adam(lr)
    history = []
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        history.append(float(loss))
    return history


# --- each model builds and learns ----------------------------------------------------------------
@pytest.mark.parametrize(("name", "steps", "lr"), [("cnn", 40, 1e-2), ("sequential", 40, 1e-2), ("keras_app", 2, 1e-3)])
def test_each_model_trains_on_digits(name, steps, lr, digits):
    x, y = _images(name, digits)[:64], digits[1][:64]
    keras.utils.set_random_seed(0)  # the weights it starts from: not whatever the tests before it left the RNG at
    model = _model(name)
    models.check_fits(model, x.shape[1:])
    out = model(x)
    assert tuple(out.shape) == (64, N_CLASSES)
    assert out.dtype == tf.float32
    history = _train(model, x, y, steps, lr)
    assert np.all(np.isfinite(history))
    # cnn, sequential: 40 steps on one batch of 64 fit it (30 steps measured 2.8 -> 0.17, 2.4 -> 0.46); keras_app: 2
    # steps still lower it
    assert history[-1] < (0.3 if steps > 2 else history[0])


def test_cnn_takes_grey_images_without_a_channel_axis_and_uint8_pixels(digits):
    model = _model("cnn")
    x = digits[0][:4]
    np.testing.assert_array_equal(np.asarray(model(x[..., 0])), np.asarray(model(x)))
    pixels = np.round(x * 16).astype(np.uint8)
    np.testing.assert_allclose(np.asarray(model(pixels)), np.asarray(model(pixels.astype(np.float32))), rtol=1e-6)


def test_cnn_layers_follow_the_option(digits):
    model = _model("cnn", "model.batch_norm=false", "model.pool=null", "model.dropout=0.0", "model.hidden=[]")
    model(digits[0][:2])
    shapes = {loop.variable_path(v, model.name): tuple(v.shape) for v in model.variables}
    # no pooling: 8x8x16 reaches the head; no BatchNorm: the convs keep their biases
    assert shapes == {
        "conv_0/kernel": (3, 3, 1, 8),
        "conv_0/bias": (8,),
        "conv_1/kernel": (3, 3, 8, 16),
        "conv_1/bias": (16,),
        "head/kernel": (8 * 8 * 16, N_CLASSES),
        "head/bias": (N_CLASSES,),
    }


def test_sequential_runs_an_lstm_over_sequences():
    """A [b, T, F] sequence model declared in YAML alone: LSTM then the head; no channel axis is added."""
    layers = "model.layers=[{_target_: keras.layers.LSTM, units: 16}]"
    cfg = compose_config(["model=sequential", layers, "model.units=1"])
    model = build(cfg.model)
    t = np.linspace(0, 1, 12, dtype=np.float32)
    x = np.stack([np.sin(2 * np.pi * (t + s))[:, None] for s in np.linspace(0, 1, 32)]).astype(np.float32)
    y = x[:, -1, :] * 2.0  # [32, 1]: learnable from the sequence
    models.check_fits(model, x.shape[1:])
    optimizer = keras.optimizers.Adam(1e-2)
    first = last = None
    for _ in range(40):
        with tf.GradientTape() as tape:
            loss = losses.mse(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        first, last = first or float(loss), float(loss)
    assert loop.variable_path(model.trainable_variables[0], model.name) == "lstm_0/lstm_cell/kernel"
    assert last < 0.1 * first


def test_variable_paths_are_the_same_for_every_model_a_process_builds(digits):
    """Keras numbers unnamed layers per process (conv2d, conv2d_1, ...); metric names must not follow."""
    for name in SMALL:
        x = _images(name, digits)[:2]
        paths = []
        for _ in range(2):
            model = _model(name)
            model(x)
            # Dropout's seed state is the one variable Keras names per process (seed_generator_7); it is no metric
            # (the loop logs trainable variables) and checkpoints keep variables by position
            paths.append(
                [p for v in model.variables if "seed_generator" not in (p := loop.variable_path(v, model.name))]
            )
        assert paths[0] == paths[1], name
        assert len(set(paths[0])) == len(paths[0]), name
    assert paths[0][:2] == ["conv/kernel", "conv_bn/gamma"]  # keras_app: MobileNetV3Small's own layer names


def test_sequential_names_its_layers_by_place(digits):
    model = _model("sequential")
    model(digits[0][:2])
    assert [layer.name for layer in model.stack] == ["conv2d_0", "max_pooling2d_1", "flatten_2", "head"]


# --- BatchNorm and dropout follow the training flag ---------------------------------------------
def test_batchnorm_moving_statistics_change_in_training_mode_only(digits):
    model = _model("cnn", "model.dropout=0.0")
    x = digits[0][:32]
    model(x)  # builds: moving mean 0, variance 1
    bn = next(layer for layer in model.stack if isinstance(layer, keras.layers.BatchNormalization))
    before = [np.asarray(v).copy() for v in bn.non_trainable_variables]
    inference = np.asarray(model(x, training=False))
    for v, b in zip(bn.non_trainable_variables, before, strict=True):
        np.testing.assert_array_equal(np.asarray(v), b)
    np.testing.assert_array_equal(np.asarray(model(x)), inference)  # training defaults to False
    model(x, training=True)
    mean = np.asarray(bn.moving_mean)
    assert not np.allclose(mean, before[0])
    # Keras' update: moving = 0.99 * moving + 0.01 * batch mean (of conv_0's outputs)
    conv = model.stack[0](x)
    np.testing.assert_allclose(mean, 0.01 * np.mean(np.asarray(conv), axis=(0, 1, 2)), rtol=1e-4, atol=1e-7)
    assert {loop.variable_path(v, model.name) for v in model.non_trainable_variables} >= {
        "bn_0/moving_mean",
        "bn_0/moving_variance",
    }  # non-trainable: train.py checkpoints them with the model


def test_dropout_is_active_in_training_mode_only(digits):
    model = _model("cnn", "model.dropout=0.5", "model.batch_norm=false")
    x = digits[0][:8]
    a, b = np.asarray(model(x, training=False)), np.asarray(model(x, training=False))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(np.asarray(model(x, training=True)), a)


# --- a saved model loads back and predicts the same ---------------------------------------------
@pytest.mark.parametrize("name", list(SMALL))
def test_keras_file_round_trip_predicts_the_same(name, digits, tmp_path):
    model = _model(name)
    x = _images(name, digits)[:16]
    _train(model, x, digits[1][:16], steps=1, lr=1e-3)  # weights (and BatchNorm statistics) away from their init
    expected = np.asarray(model(x))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(model)
    as_saved = json.loads(json.dumps({**model.get_config(), "name": loaded.get_config()["name"]}))  # tuples: lists
    assert json.loads(json.dumps(loaded.get_config())) == as_saved
    np.testing.assert_array_equal(np.asarray(loaded(x)), expected)


TABLE_MODELS = {  # a table's models, fresh: a Linear (with the targets' units after it), an MLP, embeddings
    "linear": lambda: models.Linear(2, None, 1.0),
    "mlp": lambda: models.MLP([8, 4], 3, "relu", 0.2, None),
    "embedded": lambda: models.Embedded(models.MLP([8], 2, "relu", 0.5, None), [1], [5], 6),
}


def _fresh(name: str):
    return _model(name) if name in SMALL else TABLE_MODELS[name]()


@pytest.fixture(scope="module")
def built_ins(digits) -> dict[str, tuple]:
    """Each built-in model, one step away from its init, with examples it takes and what sits around it."""
    found = {}
    for name in SMALL:
        model, x = _model(name), _images(name, digits)[:8]
        _train(model, x, digits[1][:8], steps=1, lr=1e-3)
        found[name] = (model, x, [keras.layers.Rescaling(0.5, name="rescale")], [])
    table = digits[0][:8].reshape(8, -1)[:, :6] * 10
    table[:, 1] = np.arange(8) % 5  # the ids of an embedded column
    after = {"linear": [keras.layers.Normalization(axis=-1, mean=[3.0, 1.0], variance=[4.0, 9.0], invert=True,
                                                   name="target_units")]}  # fmt: skip
    for name, make in TABLE_MODELS.items():
        found[name] = (make(), table, [], after.get(name, []))
    return found


def test_the_logged_keras_file_of_each_built_in_model_loads_with_keras_alone(built_ins, tmp_path):
    """models.portable: the file a run logs names Keras' own classes only, so a new process that never imports
    trainer loads it (a file naming trainer.models.CNN could not: "Could not locate class 'CNN'"), and it answers
    exactly as the trained model, with its preprocessing; the graph shares the model's weights."""
    expected = {}
    for name, (model, x, before, after) in built_ins.items():
        graph = models.portable(model, x.shape[1:], str(x.dtype), before, after)
        out = np.asarray(model(before[0](x) if before else x))
        expected[name] = np.asarray(after[0](out)) if after else out
        np.testing.assert_array_equal(np.asarray(graph(x)), expected[name])
        shared = {id(v) for v in model.weights}
        assert name == "linear" or all(id(v) in shared for v in graph.weights)  # a Linear's w and b: copied
        graph.save(tmp_path / f"{name}.keras")
        np.save(tmp_path / f"{name}.npy", x)
    code = (
        "import sys, json, keras, numpy as np\n"
        "out = {}\n"
        f"for name in {sorted(expected)!r}:\n"
        f"    model = keras.saving.load_model({str(tmp_path)!r} + f'/{{name}}.keras')\n"
        f"    out[name] = np.asarray(model(np.load({str(tmp_path)!r} + f'/{{name}}.npy'))).tolist()\n"
        "out['imported'] = sorted(m for m in sys.modules if m.split('.')[0] == 'trainer')\n"
        "print(json.dumps(out))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got.pop("imported") == []
    for name, out in expected.items():
        np.testing.assert_allclose(np.asarray(got[name], np.float32), out, rtol=0, atol=0, err_msg=name)


def test_init_from_a_portable_file_copies_each_built_in_models_weights(built_ins, tmp_path):
    """trainer.init_from reads the portable file layer by layer, by name, into a fresh model of the same kind."""
    from trainer import finetune

    for name, (model, x, before, after) in built_ins.items():
        (tmp_path / name).mkdir()
        models.portable(model, x.shape[1:], str(x.dtype), before, after).save(tmp_path / name / "model.keras")
        fresh = _fresh(name)
        fresh(x[:1])
        assert not all(np.array_equal(a, b) for a, b in zip(fresh.get_weights(), model.get_weights(), strict=True))
        finetune.init_from(fresh, str(tmp_path / name), None)
        for ours, theirs in zip(fresh.get_weights(), model.get_weights(), strict=True):
            np.testing.assert_array_equal(ours, theirs, err_msg=name)


def test_init_from_a_portable_file_of_another_model_is_one_line(built_ins, tmp_path):
    """A run of another model: a layer it lacks, or examples this model cannot take, named in one line."""
    from trainer import finetune

    model, x, _, _ = built_ins["mlp"]
    models.portable(model, x.shape[1:], str(x.dtype)).save(tmp_path / "model.keras")
    deeper = models.MLP([8, 4, 4], 3, "relu", 0.2, None)
    deeper(x[:1])
    with pytest.raises(TrainerError, match="its model has no layer 'dense_2', which this one has"):
        finetune.init_from(deeper, str(tmp_path), None)
    cnn = _model("cnn")
    cnn(np.zeros((1, 8, 8, 1), np.float32))
    with pytest.raises(TrainerError, match=r"its model takes examples of shape \(6,\), which this CNN cannot") as e:
        finetune.init_from(cnn, str(tmp_path), None)
    assert "\n" not in str(e.value)


def test_keras_app_from_a_saved_config_downloads_nothing():
    config = {
        "name": "MobileNetV3Small",
        "weights": "imagenet",
        "pooling": "avg",
        "units": 3,
        "input_shape": [32, 32, 3],
    }
    model = models.KerasApp.from_config(config)  # with weights=imagenet this would reach for the network
    assert model.get_config()["weights"] is None


# --- losses ------------------------------------------------------------------------------------
LOGITS = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, -0.3], [-1.5, 3.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
LABELS = np.array([0, 2, 1, 1])


@pytest.mark.parametrize("label_shape", [(4,), (4, 1)])
@pytest.mark.parametrize("from_logits", [True, False])
def test_sparse_categorical_crossentropy_equals_keras_and_tf(label_shape, from_logits):
    fn = build(compose_config(["loss=sparse_categorical_crossentropy", f"loss.from_logits={from_logits}"]).loss)
    y_pred = LOGITS if from_logits else tf.nn.softmax(LOGITS).numpy()
    y_true = LABELS.reshape(label_shape).astype(np.float32)  # the data's arrays are floats
    value = float(fn(tf.constant(y_true), tf.constant(y_pred)))
    keras_value = float(keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)(LABELS, y_pred))
    tf_value = float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(LABELS, LOGITS)))
    z = LOGITS.astype(np.float64)
    log_p = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    numpy_value = -np.mean(log_p[np.arange(4), LABELS])
    assert value == pytest.approx(keras_value, rel=1e-6)
    assert value == pytest.approx(tf_value, rel=1e-6)
    assert value == pytest.approx(numpy_value, rel=1e-6)


def test_sparse_categorical_crossentropy_trains_like_keras():
    """Same gradients as Keras' loss, with respect to the logits."""
    fn = build(compose_config(["loss=sparse_categorical_crossentropy"]).loss)
    z = tf.Variable(LOGITS)
    with tf.GradientTape(persistent=True) as tape:
        ours = fn(tf.constant(LABELS, tf.float32), z)
        theirs = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(LABELS, z)
    np.testing.assert_allclose(tape.gradient(ours, z), tape.gradient(theirs, z), rtol=1e-6, atol=1e-7)
    assert losses.sparse_categorical_crossentropy.__name__ == "sparse_categorical_crossentropy"


Y_TRUE = np.array([[1.0, -2.0], [0.5, 3.0], [4.0, 0.0]], np.float32)
Y_PRED = np.array([[0.0, -1.0], [2.5, 3.5], [0.0, 0.1]], np.float32)  # errors 1, 1, 2, 0.5, 4, 0.1


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["loss.name=Huber"], keras.losses.Huber()),
        (["loss.name=huber", "+loss.settings.delta=2.0"], keras.losses.Huber(delta=2.0)),
        (["loss.name=mean_squared_error"], keras.losses.MeanSquaredError()),
        (["loss.name=mse"], keras.losses.MeanSquaredError()),
        (["loss.name=LogCosh"], keras.losses.LogCosh()),
    ],
)
def test_keras_loss_by_name_equals_the_keras_object(overrides, expected):
    fn = build(compose_config(["loss=keras", *overrides]).loss)
    assert type(fn) is type(expected)
    assert fn.get_config() == expected.get_config()
    value = fn(tf.constant(Y_TRUE), tf.constant(Y_PRED))
    assert value.shape == ()
    assert float(value) == float(expected(Y_TRUE, Y_PRED))


def test_keras_huber_equals_the_built_in_huber():
    """Two homes of one formula agree: loss=huber (trainer.losses) and loss=keras loss.name=huber."""
    ours = build(compose_config(["loss=huber", "loss.delta=2.0"]).loss)
    theirs = build(compose_config(["loss=keras", "loss.name=huber", "+loss.settings.delta=2.0"]).loss)
    assert float(ours(Y_TRUE, Y_PRED)) == pytest.approx(float(theirs(Y_TRUE, Y_PRED)), rel=1e-6)


def test_keras_loss_errors_are_one_line():
    with pytest.raises(TrainerError) as info:
        build(compose_config(["loss=keras", "loss.name=hubber"]).loss)
    assert str(info.value) == "loss.name='hubber' is no keras.losses loss: did you mean Huber?"
    with pytest.raises(TrainerError) as info:
        build(compose_config(["loss=keras", "+loss.settings.delt=2.0"]).loss)
    assert str(info.value).startswith("loss.settings={'delt': 2.0} do not fit keras.losses.Huber: ")
    assert "delt" in str(info.value) and "\n" not in str(info.value)


# --- bad models: one line naming the layer and the fix ------------------------------------------
def _error(overrides: list[str], input_shape=None) -> str:
    with pytest.raises(TrainerError) as info:
        model = build(compose_config(overrides).model)
        models.check_fits(model, input_shape)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_keras_app_lists_close_names():
    message = _error(["model=keras_app", "model.name=MobileNetV3", "model.units=3", "model.input_shape=[32,32,3]"])
    assert message == (
        "model.name='MobileNetV3' is no keras.applications model: did you mean MobileNetV2, MobileNet, "
        "MobileNetV3Small, MobileNetV3Large?"
    )


def test_a_layer_list_that_does_not_fit_names_the_layer():
    layers = (
        "model.layers=[{_target_: keras.layers.Conv2D, filters: 16, kernel_size: 3}, {_target_: keras.layers.Flatten},"
        "{_target_: keras.layers.Dense, units: 32}, {_target_: keras.layers.Conv2D, filters: 8, kernel_size: 3}]"
    )
    message = _error(["model=sequential", layers, "model.units=3"], (8, 8, 1))
    assert message.startswith("model.layers[3] (Conv2D 'conv2d_3') cannot take input of shape (None, 32): ")
    assert "expected min_ndim=4, found ndim=2" in message
    assert message.endswith(
        "; it takes inputs of rank 4: move it before the layer that flattens, or add a keras.layers.Reshape"
    )


def test_a_layer_list_that_ends_unflattened_names_the_head():
    layers = "model.layers=[{_target_: keras.layers.Conv2D, filters: 4, kernel_size: 3}]"
    message = _error(["model=sequential", layers, "model.units=3"], (8, 8, 1))
    assert message == (
        "the head model.layers[1] (Dense 'head') gets input of shape (None, 6, 6, 4), not one vector per example; "
        "end model.layers with a keras.layers.Flatten or GlobalAveragePooling2D"
    )


def test_an_lstm_on_images_says_to_reshape():
    message = _error(
        ["model=sequential", "model.layers=[{_target_: keras.layers.LSTM, units: 4}]", "model.units=3"], (8, 8, 1)
    )
    assert message.startswith("model.layers[0] (LSTM 'lstm_0') cannot take input of shape (None, 8, 8, 1): ")
    assert message.endswith("; it takes inputs of rank 3: add a keras.layers.Reshape before it")  # not a Flatten


def test_cnn_that_pools_images_away_names_the_pool():
    message = _error(["model=cnn", "model.filters=[4,4,4,4]", "model.units=3"], (8, 8, 1))
    assert message.startswith(  # four blocks of conv, bn, act, pool: the fourth pool halves 1x1
        "layers[15] (MaxPooling2D 'pool_3') cannot take input of shape (None, 1, 1, 4): Computed output size would be "
        "zero or negative. Received: `inputs.shape=[None 1 1 4]`"
    )


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        (
            "{_target_: keras.layers.Conv2F, filters: 4, kernel_size: 3}",
            "model.layers[0]._target_='keras.layers.Conv2F' is no Keras layer: did you mean Conv2D, Conv3D, Conv1D, "
            "ConvLSTM2D?",
        ),
        (
            "{_target_: nosuch.Layer}",
            "model.layers[0]._target_='nosuch.Layer' cannot be imported: No module named 'nosuch'",
        ),
        (
            "{_target_: keras.layers.Dense, units: 4, activation: relux}",
            "model.layers[0]: cannot build keras.layers.Dense: Could not interpret activation function identifier: "
            "relux",
        ),
        (
            "{_target_: builtins.dict}",
            "model.layers[0]._target_='builtins.dict' built a dict, not a Keras layer; name a class such as "
            "keras.layers.Dense",
        ),
    ],
)
def test_a_bad_layer_is_named(layer, expected):
    assert _error(["model=sequential", f"model.layers=[{layer}]", "model.units=3"]) == expected


def test_null_units_not_filled_in_is_one_line():
    assert _error(["model=cnn"]) == (
        "model.units=null: the number of outputs was not filled in from the data; set model.units=N"
    )
    assert _error(["model=keras_app", "model.units=3"]) == (
        "model.input_shape=null: the image shape was not filled in from the data; set model.input_shape=[H,W,C]"
    )


# --- composition: the options, their overrides and their range checks ----------------------------
def test_options_compose_with_overrides():
    cfg = compose_config(["model=cnn", "model.filters=[16,32,64]", "model.pool=null", "model.hidden=[128]"])
    check(cfg)
    assert OmegaConf.get_type(cfg.model) is SCHEMAS["model"]["cnn"]
    assert (list(cfg.model.filters), cfg.model.pool, list(cfg.model.hidden), cfg.model.units) == (
        [16, 32, 64],
        None,
        [128],
        None,
    )
    cfg = compose_config(["model=sequential", CONV_LAYERS, "model.units=4"])
    check(cfg)
    assert OmegaConf.get_type(cfg.model) is SCHEMAS["model"]["sequential"]
    assert [layer["_target_"] for layer in cfg.model.layers] == [
        "keras.layers.Conv2D",
        "keras.layers.MaxPooling2D",
        "keras.layers.Flatten",
    ]
    cfg = compose_config(["model=keras_app", "model.name=ResNet50", "model.input_shape=[64,64,3]", "model.pooling=max"])
    check(cfg)
    assert OmegaConf.get_type(cfg.model) is SCHEMAS["model"]["keras_app"]
    assert (cfg.model.name, list(cfg.model.input_shape), cfg.model.weights) == ("ResNet50", [64, 64, 3], None)
    cfg = compose_config(["loss=keras", "loss.name=Poisson"])
    check(cfg)
    assert OmegaConf.get_type(cfg.loss) is SCHEMAS["loss"]["keras"]
    assert isinstance(build(cfg.loss), keras.losses.Poisson)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=cnn", "model.pool=0"], "model.pool=0 is invalid: expected null (no pooling) or an integer >= 1"),
        (
            ["model=cnn", "model.filters=[]"],
            "model.filters=[] is invalid: expected at least one block, each with >= 1 filters",
        ),
        (["model=cnn", "model.units=0"], "model.units=0 is invalid: expected null (from the data) or an integer >= 1"),
        (["model=keras_app", "model.pooling=mean"], "model.pooling='mean' is invalid: expected avg | max"),
        (
            ["model=keras_app", "model.input_shape=[32]"],
            "model.input_shape=[32] is invalid: expected null (from the data) or [H, W, C]",
        ),
        (
            ["model=sequential", "model.layers=[relu]"],
            "model.layers[0]='relu' is invalid: expected a layer such as {_target_: keras.layers.Dense, units: 64}",
        ),
    ],
)
def test_bad_values_are_one_line_before_tensorflow_work(overrides, message):
    with pytest.raises(TrainerError) as info:
        check(compose_config(overrides))
    assert str(info.value) == message


# --- run data: a sequential run's layers resume without a trusted_targets entry -------------------
def _stored_sequential(layer_target: str, where: str = "layer") -> dict:
    plain = OmegaConf.to_container(compose_config(["model=sequential", CONV_LAYERS, "model.units=3"]))
    node = {"_target_": layer_target}
    if where == "layer":
        plain["model"]["layers"].append(node)
    elif where == "nested":
        plain["model"]["layers"].append({"_target_": "keras.layers.Bidirectional", "layer": node})
    else:
        plain["data"]["extra"] = node
    return plain


def test_a_sequential_runs_keras_layers_are_trusted_where_the_model_lists_them():
    for target, where in (("keras.layers.LayerNormalization", "layer"), ("keras.layers.LSTM", "nested")):
        cfg = trusted_config(OmegaConf.create(_stored_sequential(target, where)), [], "resume: run.json")
        assert target in str(OmegaConf.to_container(cfg.model))


@pytest.mark.parametrize(
    ("target", "where", "key"),
    [
        ("keras.layers.Lambda", "layer", "model.layers.3._target_"),  # its arguments are code
        ("keras.layers.TFSMLayer", "layer", "model.layers.3._target_"),  # runs a SavedModel's graph
        ("keras.layers.Conv2D", "data", "data.extra._target_"),  # a layer anywhere else is no layer
        ("os.system", "layer", "model.layers.3._target_"),
        ("keras.layers.Dense.from_config", "layer", "model.layers.3._target_"),
    ],
)
def test_other_targets_of_a_sequential_run_are_refused(target, where, key):
    with pytest.raises(TrainerError) as info:
        trusted_config(OmegaConf.create(_stored_sequential(target, where)), [], "resume: run.json")
    assert str(info.value).startswith(f"resume: run.json: {key}={target!r} is not built in")
    trusted_config(OmegaConf.create(_stored_sequential(target, where)), [target], "resume: run.json")  # if you say so


def test_the_readme_model_example_composes_builds_and_fits(tmp_path, repo_root):
    """README's Models section: its YAML, as a user's own option file, composes, checks and takes the digits."""
    text = (repo_root / "README.md").read_text()
    section = text[text.index("## Models") :]
    block = section[section.index("```yaml\n") + len("```yaml\n") : section.index("```\n", section.index("```yaml"))]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "small_convnet.yaml").write_text(block)
    cfg = compose_config([f"hydra.searchpath=[file://{tmp_path}]", "model=small_convnet", "model.units=10"])
    check(cfg)
    model = build(cfg.model)
    models.check_fits(model, (8, 8, 1))
    assert [layer.name for layer in model.stack] == ["conv2d_0", "max_pooling2d_1", "flatten_2", "dense_3", "head"]
