"""Your own data by `_target_`: the documented contract (examples/my_data.py), and one line for anything else."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf

from conftest import run_cli
from trainer.config import TrainerError
from trainer.data import Examples
from trainer.data.prepare import load

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _node(target: str, **keys):
    return OmegaConf.create({"_target_": target, **keys})


@pytest.mark.slow
def test_the_worked_example_trains_on_wine_and_beats_the_majority_class(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["hydra.searchpath=[file://my_conf]", "data=wine", "model=mlp", "loss=sparse_categorical_crossentropy",
            "trainer.epochs=60", "trainer.batch_size=16", f"tracking.uri={uri}",
            f"hydra.run.dir={tmp_path}/run"]  # fmt: skip
    proc = run_cli(args, EXAMPLES)
    assert proc.returncode == 0, proc.stderr
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    assert run.data.tags["data.task"] == "multiclass"
    # 178 wines, 36 held out; the largest class is 40% of them. Standardized inside the model, an MLP gets ~0.97.
    assert run.data.metrics["val/accuracy"] >= 0.9
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 60 * (142 // 16)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_data.py").write_text(
        "import numpy as np, tensorflow as tf\n"
        "rng = np.random.default_rng(0)\n"
        "X, Y = rng.standard_normal((200, 3)).astype('float32'), rng.integers(0, 2, 200)\n"
        "def triple(): return X, Y, None\n"
        "def arrays(): return X, Y\n"
        "def pair(): return (X[:150], Y[:150]), (X[150:], Y[150:])\n"
        "def datasets(): return tf.data.Dataset.from_tensor_slices((X[:150], Y[:150])), "
        "tf.data.Dataset.from_tensor_slices((X[150:], Y[150:]))\n"
        "def batched(): return tf.data.Dataset.from_tensor_slices((X, Y)).batch(32)\n"
        "def repeated(): return tf.data.Dataset.from_tensor_slices((X, Y)).repeat()\n"
        "def filtered(): return tf.data.Dataset.from_tensor_slices((X, Y)).filter(lambda x, y: x[0] > 0)\n"
        "def broken(): raise KeyError('label')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("user_data", None)


def test_each_accepted_return_gives_the_same_examples(user_module):
    x, y = np.asarray(__import__("user_data").X), __import__("user_data").Y
    for name in ("arrays", "batched"):
        data = load(_node(f"user_data.{name}", val_fraction=0.25))
        assert data.task == "binary" and data.n_train + len(data.x_val) == 200
        np.testing.assert_array_equal(np.concatenate([data.x_train, data.x_val]).shape, x.shape)
    for name in ("pair", "datasets"):
        data = load(_node(f"user_data.{name}"))  # the explicit validation set wins over val_fraction
        np.testing.assert_array_equal(data.x_train, x[:150])
        np.testing.assert_array_equal(data.x_val, x[150:])
        np.testing.assert_array_equal(data.y_val.reshape(-1), y[150:])
    streamed = load(_node("user_data.datasets", in_memory="false"))
    assert streamed.streamed and streamed.train.count == 150 and streamed.val.count == 50
    first = next(iter(streamed.train.read().batch(150)))
    np.testing.assert_array_equal(first[0].numpy(), x[:150])
    unknown = load(_node("user_data.filtered"))  # unknown cardinality: counted once
    assert unknown.n_train + len(unknown.x_val) == int((x[:, 0] > 0).sum())


def test_anything_else_is_one_line_naming_the_function(user_module):
    cases = {
        "triple": "data._target_=user_data.triple returned a tuple of 3 items; expected trainer.data.Examples",
        "repeated": "returned an infinite tf.data.Dataset; drop its .repeat()",
        "broken": "data._target_=user_data.broken failed: KeyError: 'label'",
    }
    for name, message in cases.items():
        with pytest.raises(TrainerError) as info:
            load(_node(f"user_data.{name}"))
        assert message in str(info.value) and "\n" not in str(info.value)


def test_examples_from_your_own_reader_stream_when_they_do_not_fit(user_module):
    """An Examples with only a `read` and a tight data.memory_limit_mb: streamed, split by the same rule."""
    from trainer.data import val_mask

    x = np.arange(1000, dtype=np.float32).reshape(500, 2)
    y = (np.arange(500) % 2).astype(np.int64)
    ex = Examples(500, (2,), (), "float32", "int64", read=lambda: tf.data.Dataset.from_tensor_slices((x, y)))
    from trainer.data.prepare import prepare, settings

    s = settings(_node("x", memory_limit_mb=0.001, val_fraction=0.2, seed=4))
    data = prepare(ex, s, "test")
    assert data.streamed and data.task == "binary"
    val = np.concatenate([b[0].numpy() for b in data.val.read().batch(64)])
    np.testing.assert_array_equal(val, x[val_mask(500, 0.2, 4)])
    assert data.train.count == 400 == sum(len(b[0]) for b in data.train.read().batch(64))
