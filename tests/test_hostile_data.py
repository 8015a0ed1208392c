"""Issue 13's sources and models tried as a new user gets them wrong (real files from scikit-learn's datasets in
tmp dirs, real TensorFlow, the real CLI): each mistake is one line naming the problem and the fix, and what
trained silently wrong (a streamed class-id column scored as a binary logit) trains right."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf
from PIL import Image
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits

from conftest import new_store, option_kwargs, run_cli
from trainer.config import TrainerError
from trainer.data import csv, image_folder, numpy, parquet, tfrecord
from trainer.data.prepare import load, prepare, shared_defaults
from trainer.models import CNN, KerasApp, Sequential, check_fits

DIGIT_FEATURES = {"image": {"shape": [8, 8, 1], "dtype": "uint8"}, "label": {"shape": [], "dtype": "int64"}}


def _settings(**changes):
    return OmegaConf.create({**shared_defaults(), **changes})


def _one_line(call, *args, **kwargs) -> str:
    with pytest.raises(TrainerError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def _digit_pngs(folder: Path, n: int = 60) -> None:
    d = load_digits()
    for i, (image, label) in enumerate(zip(d.images[:n], d.target[:n], strict=True)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8), mode="L").save(folder / str(label) / f"{i:03d}.png")


# --- silently wrong before ----------------------------------------------------------------------------------
def test_a_streamed_column_of_class_ids_is_class_ids(tmp_path):
    """digits.csv's label column (numbers 0..9, read as floats) streamed: y was float [1] per example, so the
    validation accuracy compared a logit > 0 with y > 0.5 (0.13 at val loss 0.06; held: 0.98)."""
    d = load_digits(as_frame=True).frame
    d.to_csv(tmp_path / "digits.csv", index=False)
    data = prepare(
        csv(**option_kwargs("data", "csv", path=str(tmp_path / "digits.csv"), target="target", missing="error")),
        _settings(in_memory="false"),
    )
    assert data.task == "multiclass" and data.n_classes == 10 and data.y_shape == () and data.y_dtype == "int32"
    _, y = next(iter(data.val.read().batch(400)))
    assert y.dtype == tf.int32 and y.shape == (359,)
    held = prepare(
        csv(**option_kwargs("data", "csv", path=str(tmp_path / "digits.csv"), target="target", missing="error")),
        _settings(in_memory="true"),
    )
    np.testing.assert_array_equal(y.numpy(), held.y_val)


def test_parquet_files_may_store_a_column_as_different_number_types(tmp_path):
    """pandas writes an int column as int64 in one file and double in the next: pa.concat_tables refused it
    (a traceback); both are numbers, read file by file."""
    frame = load_diabetes(as_frame=True, scaled=False).frame
    (tmp_path / "shards").mkdir()
    frame.iloc[:200].to_parquet(tmp_path / "shards" / "a.parquet")
    frame.iloc[200:].astype({"age": "int64"}).to_parquet(tmp_path / "shards" / "b.parquet")
    for in_memory in ("true", "false"):
        source = parquet(
            **option_kwargs("data", "parquet", path=str(tmp_path / "shards"), target="target", missing="error")
        )
        data = prepare(source, _settings(in_memory=in_memory, val_fraction=0.0))
        x = data.x_train if in_memory == "true" else next(iter(data.train.read().batch(1000)))[0].numpy()
        np.testing.assert_array_equal(x, frame.drop(columns="target").to_numpy(np.float32))
    text = frame.iloc[200:].copy()
    text["sex"] = np.where(text.sex == 1, "m", "f")
    text.to_parquet(tmp_path / "shards" / "b.parquet")
    message = _one_line(parquet, **option_kwargs("data", "parquet", path=str(tmp_path / "shards"), target="target"))
    assert message == (
        f"data.path='{tmp_path / 'shards'}': column 'sex' holds large_string values in {tmp_path / 'shards/b.parquet'} "
        f"but double in {tmp_path / 'shards/a.parquet'}; write it with one type in every file"
    )


# --- one line, before training ------------------------------------------------------------------------------
def test_arrays_of_text_and_objects_are_one_line(tmp_path):
    np.savez(tmp_path / "text.npz", x=np.array([["a", "b"]] * 20), y=np.zeros(20))
    np.savez(tmp_path / "objects.npz", x=np.array([[1, "b"]] * 20, dtype=object), y=np.zeros(20))
    source = f"data.path='{tmp_path / 'text.npz'}'"
    assert _one_line(numpy, str(tmp_path / "text.npz"), None, "x", "y", None) == (
        f"{source} holds x of dtype <U1; x and y must be numbers (class names: map them to ids 0..k-1, or write a "
        "CSV and use data=csv, which does)"
    )
    assert _one_line(numpy, str(tmp_path / "objects.npz"), None, "x", "y", None) == (
        f"data.path='{tmp_path / 'objects.npz'}': Object arrays cannot be loaded when allow_pickle=False (a pickle "
        "could run code); save arrays of numbers, e.g. x.astype(np.float32)"
    )
    message = _one_line(prepare, (np.array([["a"]] * 5), np.zeros(5)), _settings(), "data._target_=mine.f")
    assert message.startswith("data._target_=mine.f returned x of dtype <U1; x and y must be numbers")


def test_a_key_no_built_in_reader_takes_is_an_error(tmp_path):
    """`+data.augment=...` on a table was dropped without a word (the reader gets only the keys it takes)."""
    node = OmegaConf.create({"_target_": "trainer.data.csv", **option_kwargs("data", "csv", path="x.csv", target="y")})
    node.augment = {"flip": "horizontal"}
    message = _one_line(load, node)
    assert message.startswith(
        "data.augment is no setting of data._target_=trainer.data.csv (it takes columns, features, "
    )
    assert message.endswith("); remove it")


def test_a_tfrecord_record_past_the_first_that_does_not_match_the_spec(tmp_path):
    """Only each file's first record is checked before training; a later one was a reshape traceback."""
    for name, bad in (("bytes", {"image": bytes(63)}), ("count", {"label": [1, 2]})):
        with tf.io.TFRecordWriter(str(tmp_path / f"{name}.tfrecord")) as writer:
            for i in range(40):
                values = {"image": bytes(64), "label": [i % 3], **(bad if i == 30 else {})}
                feature = {
                    "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[values["image"]])),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=values["label"])),
                }
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    expected = {
        "bytes": f"data.path='{tmp_path / 'bytes.tfrecord'}': a record's feature 'image' has another number of "
        "bytes than data.features.image.shape=[8, 8, 1] needs (64); every record must match the spec",
        "count": "data.path: a record's feature 'label' does not match data.features.label (Number of int64 values "
        "!= expected. Values size: 2); every record must match the spec",
    }
    for name, message in expected.items():
        for in_memory in ("true", "false"):
            source = tfrecord(str(tmp_path / f"{name}.tfrecord"), DIGIT_FEATURES, "image", "label", "auto", None)
            assert _one_line(prepare, source, _settings(in_memory=in_memory)) == message


def test_an_image_tensorflow_cannot_decode_is_named_before_training(tmp_path):
    _digit_pngs(tmp_path / "digits", 20)
    tiff = tmp_path / "digits" / "0" / "tiff.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tiff, format="TIFF")  # PIL opens it; tf.io.decode_image not
    assert _one_line(image_folder, str(tmp_path / "digits"), None, "grayscale", None, None) == (
        f"data.path='{tmp_path / 'digits'}': {tiff} is a TIFF image, which TensorFlow cannot decode; convert it to "
        "PNG, JPEG, GIF, BMP, WEBP, or remove it"
    )


def test_image_models_on_a_table_and_layers_on_the_wrong_rank():
    assert _one_line(check_fits, CNN([8], 3, 2, False, 0.0, [], "relu", 3, None), (13,)) == (
        "model=cnn takes images [height, width, channels] (or [height, width]), but the examples have shape (13,): "
        "use model=mlp for a table, or model=sequential"
    )  # was: a hint to move Conv2D "before the layer that flattens", where nothing flattens
    assert _one_line(KerasApp, "MobileNetV2", None, "avg", 3, [13], None) == (
        "model=keras_app takes images [height, width, channels] (or [height, width]), but the examples have shape "
        "(13,): use model=mlp for a table, or model=sequential"
    )  # was: "cannot build trainer.models.KerasApp: tuple index out of range"
    assert _one_line(KerasApp, "MobileNetV2", None, "avg", 10, [8, 8, 1], None) == (
        "model.name='MobileNetV2' cannot take images of shape (8, 8, 1): Input size must be at least 32x32; "
        "Received: input_shape=(8, 8, 1); resize the images (data=image_folder: data.image_size=[32, 32])"
    )
    conv_first = Sequential([{"_target_": "keras.layers.Conv2D", "filters": 4, "kernel_size": 3}], 3, None)
    assert _one_line(check_fits, conv_first, (13,)).endswith(
        "; it takes inputs of rank 4 and the examples have shape (13,): start model.layers with a keras.layers."
        "Reshape, or use data whose examples have that rank"
    )


CLI_CASES = {
    # an MLP on images kept their axes: "outputs of shape (8, 8, 10) ... set model.units=10", a wrong fix
    "mlp_on_images": (
        ["data=numpy", "data.path=digits.npz", "model=mlp", "loss=sparse_categorical_crossentropy"],
        "error: model trainer.models.MLP gives outputs of shape (8, 8, 10) per example: it keeps the axes of "
        "examples of shape (8, 8, 1); use model=cnn for images, or model=sequential starting with a "
        "keras.layers.Flatten",
    ),
    # a 1-D x: the message said what failed, not what to do
    "one_number_per_example": (
        ["data=numpy", "data.path=flat.npz", "model=mlp"],
        "error: model MLP cannot take input of shape (None,): Input 0 with name 'None' of layer 'dense_0' is "
        "incompatible with the layer: expected min_ndim=2, found ndim=1. Full shape received: (1,); the examples "
        "are single numbers (x of shape [n]): give x a feature axis, shape [n, 1] (x[:, None])",
    ),
    # a PNG cut short passes the header check; streamed, its decode error was "model ... cannot take inputs"
    # (first batch) or a traceback (later)
    "damaged_png_streamed": (
        ["data=image_folder", "data.path=damaged", "data.color_mode=grayscale", "data.in_memory=false", "model=cnn",
         "loss=sparse_categorical_crossentropy", "trainer.batch_size=4"],
        "error: data.path='damaged': damaged/1/001.png cannot be decoded as an image; remove or replace it",  # named
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory, mlflow_template) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    new_store(root, mlflow_template)
    d = load_digits()
    np.savez(root / "digits.npz", x=(d.images[..., None] * 255 / 16).astype(np.uint8), y=d.target)
    np.savez(root / "flat.npz", x=d.target.astype(np.float32), y=d.target.astype(np.float32))
    _digit_pngs(root / "damaged", 20)
    png = root / "damaged" / "1" / "001.png"
    png.write_bytes(png.read_bytes()[:59])
    return root


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_says_what_is_wrong_in_one_line(cli_dir, case):
    args, message = CLI_CASES[case]
    proc = run_cli([*args, f"tracking.uri=sqlite:///{cli_dir / 'mlflow.db'}", "trainer.max_steps=5"], cli_dir)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == message


@pytest.mark.slow
def test_evaluate_a_binary_run_on_a_file_of_one_class(tmp_path, mlflow_template):
    """cancer.csv (malignant/benign) trains a binary run; a file of malignant rows only has one label, which the
    task rule reads as a one-class multiclass task: the loss failed on shapes with a traceback. The run's task
    (its data.task tag) reads it now."""
    uri = new_store(tmp_path, mlflow_template)
    frame = load_breast_cancer(as_frame=True).frame
    frame["diagnosis"] = np.where(frame.pop("target") == 0, "malignant", "benign")
    frame.to_csv(tmp_path / "cancer.csv")
    frame[frame.diagnosis == "malignant"].to_csv(tmp_path / "malignant.csv")
    train = run_cli(["data=csv", "data.path=cancer.csv", "data.target=diagnosis", "model=mlp",
                     "loss=binary_crossentropy", "trainer.epochs=5", f"tracking.uri={uri}"], tmp_path)  # fmt: skip
    assert train.returncode == 0, train.stderr
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    run_id = run.info.run_id
    proc = run_cli(["evaluate", f"run_id={run_id}", f"tracking.uri={uri}", "data.path=malignant.csv",
                    "data.val_fraction=0", "format=json"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    import json

    report = json.loads(proc.stdout)
    assert report["examples"] == 212 and report["split"] == "train"
    assert 0.0 <= report["loss"] < 1.0 and report["accuracy"] > 0.8  # malignant rows, scored against id 1


@pytest.mark.slow  # ~10-35 s on 2 cores: the fast suite's time (the slow suite runs it)
def test_a_fifo_where_data_should_be_is_named_not_read(tmp_path):
    """A named pipe blocks whoever opens it: inside an image folder, a TFRecord or Parquet glob it hung the loading
    forever with no output, and as the CSV path it said "no such file". Each is one line naming the FIFO."""
    import os
    import signal

    _digit_pngs(tmp_path / "digits", 20)
    pipes = {name: tmp_path / name for name in ("rows.csv", "x.npy", "p/b.parquet", "t/b.tfrecord", "digits/0/z.png")}
    for pipe in pipes.values():
        pipe.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(pipe)
    calls = {
        "rows.csv": lambda: csv(
            **option_kwargs("data", "csv", path=str(pipes["rows.csv"]), target="y", missing="drop")
        ),
        "x.npy": lambda: numpy(str(pipes["x.npy"]), str(tmp_path / "y.npy"), "x", "y", None),
        "p/b.parquet": lambda: parquet(
            **option_kwargs("data", "parquet", path=str(tmp_path / "p" / "*.parquet"), target="y", missing="drop")
        ),
        "t/b.tfrecord": lambda: tfrecord(
            str(tmp_path / "t" / "*.tfrecord"), DIGIT_FEATURES, "image", "label", "auto", None
        ),
        "digits/0/z.png": lambda: image_folder(str(tmp_path / "digits"), None, "grayscale", None, None),
    }
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the loading blocked on a FIFO"))
    try:
        for name, call in calls.items():
            signal.alarm(20)
            message = _one_line(call)
            assert f"{pipes[name]} is a FIFO (named pipe), not a regular file" in message, message
    finally:
        signal.alarm(0)
