"""The data sources on real files: scikit-learn's digits written as PNG folders, TFRecord, Parquet, .npz/.npy
and CSV give the same examples in the same order, `read()` streams what `arrays` holds, and each bad input
is one line naming the file (and the row, column or feature) and the fix."""

from __future__ import annotations

import gzip
import inspect
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from hydra.utils import get_method
from omegaconf import OmegaConf
from PIL import Image
from sklearn.datasets import load_breast_cancer

from conftest import compose_config, option_kwargs
from trainer import data
from trainer.config import TrainerError, build, check
from trainer.data.core import Examples
from trainer.data.files import augmentation_layers
from trainer.data.prepare import shared_defaults

SHARED = tuple(shared_defaults())  # conf/data_defaults.yaml: the keys prepare.load applies, not the readers


def reader_kwargs(name: str, **changes) -> dict:
    """The YAML option's keys that the reader takes (the shared data settings it does not take are prepare's)."""
    takes = inspect.signature(getattr(data, name)).parameters
    return {k: v for k, v in option_kwargs("data", name, **changes).items() if k not in SHARED or k in takes}


def arrays(ex: Examples) -> tuple[np.ndarray, np.ndarray]:
    return ex.arrays() if callable(ex.arrays) else ex.arrays


def streamed(ex: Examples, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    ds = ex.read()
    parts = list((ds.take(n) if n else ds).batch(512).as_numpy_iterator())
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# --- the digits in five formats ------------------------------------------------------------------------------
TFRECORD_FEATURES = {"image": {"shape": [8, 8, 1], "dtype": "uint8"}, "label": {"shape": [], "dtype": "int64"}}


def _read(kind: str, root: Path) -> Examples:
    if kind == "image_folder":
        return data.image_folder(**reader_kwargs("image_folder", path=str(root / "png"), color_mode="grayscale"))
    if kind == "tfrecord":
        kw = {"path": str(root / "*.tfrecord.gz"), "features": TFRECORD_FEATURES, "inputs": "image", "target": "label"}
        return data.tfrecord(**reader_kwargs("tfrecord", **kw))
    if kind == "npz":
        return data.numpy(**reader_kwargs("numpy", path=str(root / "digits.npz"), x_key="images", y_key="labels"))
    if kind == "npy":
        return data.numpy(**reader_kwargs("numpy", path=str(root / "x.npy"), y=str(root / "y.npy")))
    if kind == "parquet":
        return data.parquet(**reader_kwargs("parquet", path=str(root / "*.parquet"), target="label"))
    return data.csv(**reader_kwargs("csv", path=str(root / "digits.csv"), target="label"))


KINDS = ["image_folder", "tfrecord", "npz", "npy", "parquet", "csv"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_format_gives_the_same_examples_in_the_same_order(digits, kind):
    ex = _read(kind, digits["root"])
    x, y = arrays(ex)
    assert ex.count == len(x) == len(y) == 1797
    assert (tuple(x.shape[1:]), tuple(y.shape[1:])) == (ex.x_shape, ex.y_shape)
    assert (str(x.dtype), str(y.dtype)) == (ex.x_dtype, ex.y_dtype)
    table = kind in ("parquet", "csv")
    want_x = digits["x"].reshape(1797, -1).astype(np.float32) if table else digits["x"]
    np.testing.assert_array_equal(x, want_x)  # exactly: uint8 pixels, or the same values as float32 columns
    np.testing.assert_array_equal(y.reshape(-1), digits["y"] if not table else digits["y"].astype(np.float32))
    sx, sy = streamed(ex, 64)  # the stream: the same rows, in the same order
    np.testing.assert_array_equal(sx, x[:64])
    np.testing.assert_array_equal(sy, y[:64])
    if kind == "image_folder":
        assert (ex.labels, ex.task, ex.rescale, ex.x_shape) == (
            [str(k) for k in range(10)],
            "multiclass",
            1 / 255,
            (8, 8, 1),
        )


def test_options_build_through_hydra_from_command_line_values(digits):
    """What the CLI gives the readers: ListConfig / DictConfig values, a plain `data.target=label`."""
    root = digits["root"]
    spec = "{image: {shape: [8, 8, 1], dtype: uint8}, label: {shape: [], dtype: int64}}"
    cases = [
        ["data=csv", f"data.path={root / 'digits.csv'}", "data.target=label"],
        ["data=parquet", f"data.path={root}", "data.target=[label]", "data.features=[p0,p1]"],
        ["data=tfrecord", f"data.path=[{root / 'digits.tfrecord.gz'}]", f"data.features={spec}", "data.inputs=[image]",
         "data.target=label"],
        ["data=image_folder", f"data.path={root / 'png'}", "data.image_size=[8,8]", "data.augment={crop: [6, 6]}"],
        ["data=numpy", f"data.path={root / 'digits.npz'}", "data.x_key=images", "data.y_key=labels"],
    ]  # fmt: skip
    for overrides in cases:
        cfg = compose_config(overrides)
        check(cfg)
        takes = inspect.signature(get_method(cfg.data._target_)).parameters
        node = OmegaConf.create({k: v for k, v in cfg.data.items() if k not in SHARED or k in takes})
        ex = build(node)
        assert ex.count == 1797, overrides
        assert np.array_equal(np.ravel(arrays(ex)[1]), digits["y"]), overrides
    assert ex.x_shape == (8, 8, 1)


def test_whole_streams_match_and_count(digits):
    """Every example of the streamed CSV (record batches) and Parquet (two files, 300-row groups)."""
    for kind in ("csv", "parquet", "tfrecord"):
        ex = _read(kind, digits["root"])
        sx, sy = streamed(ex)
        x, y = arrays(ex)
        assert len(sx) == ex.count == 1797, kind
        np.testing.assert_array_equal(sx, x)
        np.testing.assert_array_equal(sy, y)


def test_npy_pair_is_memory_mapped(digits):
    ex = _read("npy", digits["root"])
    assert isinstance(ex.arrays[0], np.memmap)  # not read into memory: rows are read as batches use them


def test_image_folder_resizes_and_converts_color(digits, tmp_path):
    kw = reader_kwargs("image_folder", path=str(digits["root"] / "png"), image_size=[16, 16], color_mode="rgb")
    ex = data.image_folder(**kw)
    x, _ = arrays(ex)
    assert ex.x_shape == x.shape[1:] == (16, 16, 3) and x.dtype == np.uint8
    assert np.array_equal(x[..., 0], x[..., 2])  # gray pixels: equal channels
    same = data.image_folder(**{**kw, "image_size": [8, 8], "color_mode": "grayscale"})
    np.testing.assert_array_equal(arrays(same)[0], digits["x"])  # resizing to the own size changes nothing


def test_augmentation_layers_keep_the_image_shape():
    layers = augmentation_layers({"flip": "horizontal", "rotation": 0.1, "zoom": 0.2, "crop": [6, 6]}, (8, 8, 1), 3)
    names = [type(layer).__name__ for layer in layers]
    assert names == ["RandomCrop", "Resizing", "RandomFlip", "RandomRotation", "RandomZoom"]
    x = tf.ones((2, 8, 8, 1))
    for layer in layers:
        x = layer(x, training=True) if "Random" in type(layer).__name__ else layer(x)
    assert tuple(x.shape) == (2, 8, 8, 1)
    assert augmentation_layers(None, (8, 8, 1)) == []
    with pytest.raises(TrainerError, match=r"data.augment.flip='sideways' is invalid: expected horizontal \|"):
        augmentation_layers({"flip": "sideways"}, (8, 8, 1))


# --- tables: labels, the index column, missing cells ------------------------------------------------------------
def test_string_labels_and_a_pandas_index_column(tmp_path):
    """The breast-cancer table as pandas writes it: an unnamed index column first, text class labels."""
    d = load_breast_cancer()
    names = [n.replace(" ", "_") for n in d.feature_names]
    labels = np.array(d.target_names)[d.target]  # 'malignant' | 'benign'
    path = tmp_path / "cancer.csv"
    try:
        import pandas as pd

        frame = pd.DataFrame(d.data, columns=names)
        frame["diagnosis"] = labels
        frame.to_csv(path)  # writes the index as a first column with an empty header cell
    except ImportError:
        rows = [",".join(["", *names, "diagnosis"])]
        rows += [",".join([str(i), *map(repr, r), lab]) for i, (r, lab) in enumerate(zip(d.data, labels, strict=True))]
        path.write_text("\n".join(rows) + "\n")
    assert path.read_text().startswith(",mean_radius,")
    for one_target in ("diagnosis", ["diagnosis"]):
        ex = data.csv(**reader_kwargs("csv", path=str(path), target=one_target))
        x, y = arrays(ex)
        assert ex.labels == ["benign", "malignant"]  # sorted: benign = 0, malignant = 1
        assert list(ex.columns) == [*names, "diagnosis"] and ex.x_shape == (30,)  # no index column among features
        np.testing.assert_allclose(x, d.data.astype(np.float32))
        np.testing.assert_array_equal(y, 1 - d.target)  # sklearn: 0 = malignant
        assert y.dtype == np.int64 and ex.y_shape == () and ex.numeric
        np.testing.assert_array_equal(streamed(ex, 64)[1], y[:64])
    one_hot = data.csv(**reader_kwargs("csv", path=str(path), target="diagnosis", one_hot=True))
    np.testing.assert_array_equal(arrays(one_hot)[1], np.eye(2)[1 - d.target])
    assert list(one_hot.columns)[-2:] == ["diagnosis=benign", "diagnosis=malignant"]


TABLE = "a,b,y\n1,2,10\n3,,20\n\n5,6,30\n7,nan,40\n"  # data rows 2 and 4 miss b; row 3 is on line 5


@pytest.mark.parametrize(
    ("missing", "held", "stream", "y"),
    [
        ("drop", [[1, 2], [5, 6]], [[1, 2], [5, 6]], [10, 30]),
        # held: the training split's mean and a missing-flag column, inside the model; a stream: the whole file's
        ("mean", [[1, 2, 0], [3, 4, 1], [5, 6, 0], [7, 4, 1]], [[1, 2], [3, 4], [5, 6], [7, 4]], [10, 20, 30, 40]),
    ],
)
def test_missing_cells_are_dropped_or_filled(tmp_path, missing, held, stream, y):
    (tmp_path / "t.csv").write_text(TABLE)
    pq.write_table(
        pa.table({"a": [1.0, 3, 5, 7], "b": [2.0, None, 6, float("nan")], "y": [10.0, 20, 30, 40]}),
        tmp_path / "t.parquet",
    )
    for reader, name in ((data.csv, "t.csv"), (data.parquet, "t.parquet")):
        kw = reader_kwargs(name.split(".")[1], path=str(tmp_path / name), target="y", missing=missing, val_fraction=0)
        ex = reader(**kw)
        assert ex.count == len(y)
        np.testing.assert_array_equal(arrays(ex)[0], np.array(held, np.float32))
        np.testing.assert_array_equal(arrays(ex)[1], np.array(y, np.float32)[:, None])
        got = streamed(reader(**{**kw, "in_memory": "false"}))
        np.testing.assert_array_equal(got[0], np.array(stream, np.float32))
        np.testing.assert_array_equal(got[1], np.array(y, np.float32)[:, None])


def test_missing_cells_under_missing_error_are_named_and_by_default_filled_or_left_out(tmp_path, capfd):
    (tmp_path / "t.csv").write_text(TABLE)
    with pytest.raises(TrainerError) as info:
        data.csv(**reader_kwargs("csv", path=str(tmp_path / "t.csv"), target="y", missing="error"))
    path = tmp_path / "t.csv"
    assert str(info.value) == (
        f"data.path='{path}': row 2 (line 3), column 'b' is not finite (nan); set data.missing=drop or mean, or "
        "fill such cells before training"
    )
    held = data.csv(**reader_kwargs("csv", path=str(tmp_path / "t.csv"), target="y", val_fraction=0))  # auto: filled
    np.testing.assert_array_equal(arrays(held)[0], [[1, 2, 0], [3, 4, 1], [5, 6, 0], [7, 4, 1]])
    (tmp_path / "u.csv").write_text("a,y\n1,2\n3,4\n5,\n")
    kept = data.csv(**reader_kwargs("csv", path=str(tmp_path / "u.csv"), target="y"))
    assert kept.count == 2 and list(arrays(kept)[1][:, 0]) == [2, 4]
    assert "data: 1 rows without a target value left out" in capfd.readouterr().err
    with pytest.raises(TrainerError, match=r"row 3 \(line 4\), column 'y' is not finite"):
        data.csv(**reader_kwargs("csv", path=str(tmp_path / "u.csv"), target="y", missing="error"))
    with pytest.raises(TrainerError, match=r"row 2 \(line 3\), column 'b' is not finite"):  # a stream: unfilled
        streamed(data.csv(**reader_kwargs("csv", path=str(tmp_path / "t.csv"), target="y", in_memory="false")))


def test_a_large_csv_streams_in_batches_with_errors_naming_the_far_row(tmp_path):
    """40,000 rows (pyarrow's 1 MB blocks: several batches); a bad cell near the end names its own row and line."""
    n = 40_000
    x = np.arange(n * 3, dtype=np.float64).reshape(n, 3)
    path = tmp_path / "big.csv"
    np.savetxt(path, np.column_stack([x, x.sum(1)]), fmt="%d", delimiter=",", header="a,b,c,y", comments="")
    ex = data.csv(**reader_kwargs("csv", path=str(path), target=["y"]))
    assert ex.count == n
    first = next(ex.read().batch(n // 7 + 1).as_numpy_iterator())
    assert len(first[0]) == n // 7 + 1
    sx, sy = streamed(ex)
    np.testing.assert_array_equal(sx, x.astype(np.float32))
    np.testing.assert_array_equal(sy[:, 0], x.sum(1).astype(np.float32))
    lines = path.read_text().splitlines()
    lines[39_000] = "1,inf,2,3"  # data row 39,000, file line 39,001
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TrainerError, match=r"row 39000 \(line 39001\), column 'b' is not finite \(inf\)"):
        data.csv(**reader_kwargs("csv", path=str(path), target="y"))


# --- bad input: one line each -------------------------------------------------------------------------------
def _csv(tmp_path, text: str, **kw) -> Examples:
    (tmp_path / "t.csv").write_text(text)
    return data.csv(**reader_kwargs("csv", path=str(tmp_path / "t.csv"), **{"target": "y", **kw}))


@pytest.mark.parametrize(
    ("text", "kw", "message"),
    [
        ("", {}, "the file is empty; expected a header row and data rows"),
        ("a,y\n1,2\n3\n", {}, "line 3 has 1 fields, the header has 2"),
        ("a,b,z\n1,2,3\n", {}, "no column 'y'; columns are a, b, z"),
        (
            "a,b,y\n1,2,3\n1,x,3\n",
            {},
            "column 'b' is not numeric: row 2 holds 'x'; fix the cell, or declare the column's type: "
            "data.columns={b: categorical} (or ignore)",
        ),
        ("a,y\n", {}, "no rows to train on"),
        ("a,,y\n1,2,3\n", {}, "column 2 has no name in the header; name it"),
        ("a,y\n1,1e308\n", {"missing": "drop"}, "row 1 (line 2), column 'y' is 1e+308, beyond 1.84e+19"),
        (
            "a,y\n1,2\n",
            {"missing": "sometimes"},
            "data.missing='sometimes' is invalid: expected auto | drop | mean | error",
        ),
        ("a,y\n1,2\n", {"features": ["y"]}, "column 'y' is both a feature and a target"),
    ],
)
def test_bad_csv_is_one_line(tmp_path, text, kw, message):
    with pytest.raises(TrainerError) as info:
        _csv(tmp_path, text, **kw)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_csv_paths(tmp_path):
    with pytest.raises(TrainerError, match=r"data.path='nope.csv': no such file \(working directory: "):
        data.csv(**reader_kwargs("csv", path="nope.csv", target="y"))
    (tmp_path / "houses.csv").write_text("a,y\n1,2\n")
    with pytest.raises(TrainerError, match=r"is a directory; expected a CSV file \(CSV files in it: houses.csv\)"):
        data.csv(**reader_kwargs("csv", path=str(tmp_path), target="y"))


def test_parquet_bad_input(tmp_path):
    pq.write_table(pa.table({"city": ["a", "b"], "rooms": [1, 2], "price": [1.0, 2.0]}), tmp_path / "h.parquet")
    kw = reader_kwargs("parquet", path=str(tmp_path / "h.parquet"), target="price")
    typed = data.parquet(**kw)  # a string column is categories: one-hot, with a column for values not seen
    assert [(c.name, c.kind) for c in typed.schema.columns] == [("city", "categorical"), ("rooms", "numeric")]
    assert arrays(typed)[0].shape == (2, 1 + 2 + 1 + 1)  # rooms, a, b, <other>, <missing>
    ex = data.parquet(**{**kw, "features": ["rooms"]})  # numbers only: read as before
    np.testing.assert_array_equal(arrays(ex)[0], [[1.0], [2.0]])
    labels = data.parquet(**{**kw, "features": ["rooms"], "target": "city"})  # strings as a target: class ids
    assert labels.labels == ["a", "b"] and list(arrays(labels)[1]) == [0, 1]
    with pytest.raises(TrainerError, match="no such file"):
        data.parquet(**{**kw, "path": str(tmp_path / "none.parquet")})
    with pytest.raises(TrainerError, match="no file matches the pattern"):
        data.parquet(**{**kw, "path": str(tmp_path / "*.pq")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainerError, match=r"is a directory without \.parquet files"):
        data.parquet(**{**kw, "path": str(tmp_path / "empty")})
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(TrainerError, match=r"bad.parquet is not a Parquet file"):
        data.parquet(**{**kw, "path": str(tmp_path / "bad.parquet")})


def test_tfrecord_bad_input_names_the_feature_and_file(digits, tmp_path):
    root = digits["root"]
    kw = reader_kwargs(
        "tfrecord", path=str(root / "digits.tfrecord.gz"), features=TFRECORD_FEATURES, inputs="image", target="label"
    )
    file = root / "digits.tfrecord.gz"
    cases = [
        ({"features": {**TFRECORD_FEATURES, "label": {"shape": [], "dtype": "float32"}}},
         f"feature 'label' of the first record of {file} is a int64_list, but data.features.label.dtype=float32 reads "
         "a float_list; set dtype: int64"),
        ({"features": {**TFRECORD_FEATURES, "image": {"shape": [28, 28, 1], "dtype": "uint8"}}},
         f"feature 'image' of the first record of {file} has 64 bytes; data.features.image.shape=[28, 28, 1] "
         "needs 784"),
        ({"features": {**TFRECORD_FEATURES, "pixels": {"shape": [64], "dtype": "uint8"}}, "inputs": "pixels"},
         f"the records of {file} have no feature 'pixels' (they have: image, label)"),
        ({"inputs": "img"}, "data.inputs='img' is not a key of data.features (they are: image, label)"),
        ({"compression": "none"}, "cannot be read as TFRecord"),
        ({"path": str(tmp_path / "*.tfrecord")}, "no file matches"),
    ]  # fmt: skip
    for change, message in cases:
        with pytest.raises(TrainerError) as info:
            data.tfrecord(**{**kw, **change})
        assert message in str(info.value) and "\n" not in str(info.value), change
    plain = tmp_path / "digits.tfrecord"  # gzip contents under a plain name: auto finds the compression
    with gzip.open(file, "rb") as src, plain.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copy(file, tmp_path / "copy.data")
    ex = data.tfrecord(**{**kw, "path": [str(plain), str(tmp_path / "copy.data")]})
    assert ex.count == 2 * 1797


def test_image_folder_bad_input(tmp_path):
    def read(path: Path, **kw) -> Examples:
        return data.image_folder(**reader_kwargs("image_folder", path=str(path), **kw))

    with pytest.raises(TrainerError, match=r"data.path='.*nope': no such folder"):
        read(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainerError, match=r"is empty; expected a subfolder of images per class"):
        read(tmp_path / "empty")
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(flat / f"{i}.png")
    with pytest.raises(TrainerError, match="has 3 images at its top level but no class subfolders; put each class's"):
        read(flat)
    mixed = tmp_path / "mixed"
    for name, size in (("cat", (4, 4)), ("dog", (6, 5))):
        (mixed / name).mkdir(parents=True)
        Image.fromarray(np.zeros(size, np.uint8)).save(mixed / name / "a.png")
    with pytest.raises(TrainerError) as info:
        read(mixed)
    assert str(info.value) == (
        f"data.path='{mixed}': images differ in size ({mixed}/cat/a.png is 4x4, {mixed}/dog/a.png is 6x5, "
        "height x width); "
        "set data.image_size=[height, width] to resize them all"
    )
    ex = read(mixed, image_size=[5, 5])
    assert arrays(ex)[0].shape == (2, 5, 5, 3) and ex.labels == ["cat", "dog"]
    (mixed / "dog" / "b.png").write_text("not an image")
    with pytest.raises(TrainerError, match=r"/dog/b.png is not an image that can be read \(.*\); remove or replace it"):
        read(mixed, image_size=[5, 5])


def test_numpy_bad_input(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((3, 2)), labels=np.zeros(2))
    kw = reader_kwargs("numpy", path=str(tmp_path / "d.npz"))
    with pytest.raises(TrainerError, match=r"has no array 'x' \(its keys: images, labels\); set data.x_key"):
        data.numpy(**kw)
    with pytest.raises(TrainerError, match=r"x has shape \(3, 2\) and y \(2,\); they need the same number of rows"):
        data.numpy(**{**kw, "x_key": "images", "y_key": "labels"})
    with pytest.raises(TrainerError, match=r"data.path='.*x.npy': no such file"):
        data.numpy(**reader_kwargs("numpy", path=str(tmp_path / "x.npy"), y=str(tmp_path / "y.npy")))
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    with pytest.raises(TrainerError, match=r"x.npy' is no .npz archive: name the .npy file of the targets with data.y"):
        data.numpy(**reader_kwargs("numpy", path=str(tmp_path / "x.npy")))
    (tmp_path / "y.npy").write_text("text")
    with pytest.raises(TrainerError, match=r"data.y='.*y.npy' is not an .npy array file \("):
        data.numpy(**reader_kwargs("numpy", path=str(tmp_path / "x.npy"), y=str(tmp_path / "y.npy")))
