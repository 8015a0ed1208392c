"""Streamed data (tf.data) in the compiled K-step loop: the same numbers as the device-resident path, clean
epoch ends inside a call, exact resume, evaluation on streams, and one trace for the whole run."""

from __future__ import annotations

from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf

from test_resilience import cfg_for, only_run, steps_of  # the same in-process run helpers
from trainer.data import Stream, regression
from trainer.data.prepare import _as_streams
from trainer.inputs import ArrayInput, StreamInput
from trainer.loop import PER_VARIABLE, StepLoop
from trainer.metrics import Metrics
from trainer.models import MLP
from trainer.train import train


def _loop(inputs, seed: int = 0) -> StepLoop:
    keras.utils.set_random_seed(seed)
    model = MLP([16], 1, "relu", 0.0, None)
    return StepLoop(model, keras.losses.MeanSquaredError(), keras.optimizers.SGD(0.05), inputs, None, 32)


def test_stream_without_shuffle_trains_exactly_as_the_in_memory_path():
    """shuffle off: both paths see the file's rows in order, so the per-step losses agree over two epochs."""
    data = regression(1024, 8, 1, 0.1, "linear", 0.25, 3, None, 0)
    streams = _as_streams(data)
    in_memory = _loop(ArrayInput(data.x_train, data.y_train, 32, 0, shuffle=False))
    streamed = _loop(StreamInput(streams.train, 32, 0, shuffle=False))
    assert in_memory.steps_per_epoch == streamed.steps_per_epoch == 24
    a, b = in_memory.run(60), streamed.run(60)
    assert int(a["steps"]) == int(b["steps"]) == 60
    np.testing.assert_allclose(b["train/loss"].numpy(), a["train/loss"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(b[PER_VARIABLE].numpy(), a[PER_VARIABLE].numpy(), rtol=1e-5)
    ev_a = in_memory.evaluate(data.x_val, data.y_val, Metrics(["mean_absolute_error"]))
    ev_b = streamed.evaluate(streams.val, None, Metrics(["mean_absolute_error"]))
    assert abs(float(ev_a["loss"]) - float(ev_b["loss"])) < 1e-6 * float(ev_a["loss"])
    assert abs(float(ev_a["mean_absolute_error"]) - float(ev_b["mean_absolute_error"])) < 1e-5


def test_a_stream_that_runs_dry_inside_a_call_ends_its_epoch_there_without_retracing():
    """A source whose real length is below its count (a generator that stops early): the call stops at the last
    batch, its steps are all returned, the next call starts the next epoch, and nothing traces again."""
    data = regression(640, 8, 1, 0.1, "linear", 0.0, 0, None, 0)
    x, y = data.x_train, data.y_train
    short = Stream(lambda: tf.data.Dataset.from_tensor_slices((x[:480], y[:480])), count=640)  # 15 real batches
    loop = _loop(StreamInput(short, 32, 0, shuffle=False))
    assert loop.steps_per_epoch == 20
    first = loop.run(20)  # the first call stops dry after 15 steps; the next takes 5 of the new epoch
    assert int(first["steps"]) == 20 and len(first["train/loss"]) == 20
    assert int(loop.input.epoch.numpy()) == 1 and int(loop.input.epoch_start.numpy()) == 15
    assert loop.call_limit(20) == 15  # the rest of the (counted) epoch
    second = loop.run(15)
    assert int(second["steps"]) == 15 and int(loop.step.numpy()) == 35
    assert int(loop.input.epoch.numpy()) == 2 and int(loop.input.epoch_start.numpy()) == 30
    assert loop._chunk.experimental_get_tracing_count() == 1


def test_streamed_run_logs_every_step_and_counts_real_epochs(tmp_path):
    """trainer.epochs on a stream: epochs * (train examples // batch) steps, each logged once, val on the stream."""
    objective = train(
        cfg_for(tmp_path, "model=mlp", "data.n_samples=800", "data.in_memory=false", "trainer.epochs=3",
                "trainer.batch_size=32", "trainer.eval_every=20", "tracking.log_model=false"),
        output_dir=tmp_path,
    )  # fmt: skip
    client, run = only_run(tmp_path)
    assert steps_of(client, run) == list(range(3 * (640 // 32)))
    assert steps_of(client, run, "val/loss") == [20, 40, 60]
    assert run.data.tags["data.held"] == "streamed"
    assert np.isfinite(objective) and objective == run.data.metrics["val/loss"]


@pytest.mark.slow  # 8-22 s of CLI runs: the fast suite stays under 10 minutes (make test-slow runs it)
def test_interrupted_and_resumed_streamed_run_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path):
    """The input position is checkpointed (epoch and its first step); a resume rebuilds the epoch's shuffled
    pipeline and skips what was taken, so the resumed run sees the very same batches."""
    common = ["model=mlp", "model.dropout=0.1", "data.n_samples=640", "data.in_memory=false", "data.shuffle_buffer=64",
              "trainer.batch_size=32", "trainer.deterministic=true", "trainer.steps_per_loop=7",
              "tracking.log_model=false"]  # fmt: skip
    train(cfg_for(tmp_path / "a", *common, "trainer.max_steps=90"), output_dir=tmp_path / "a")
    train(cfg_for(tmp_path / "b", *common, "trainer.max_steps=40"), output_dir=tmp_path / "b")  # mid-epoch 3
    train(cfg_for(tmp_path / "b", f"resume={tmp_path / 'b'}"), overrides=["trainer.max_steps=90"])

    def final(d: Path) -> dict[str, np.ndarray]:
        reader = tf.train.load_checkpoint(str(d / "checkpoints"))
        return {
            n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map() if n.startswith(("model/", "input"))
        }

    a, b = final(tmp_path / "a"), final(tmp_path / "b")
    assert len(a) == len(b) > 2 and any(n.startswith("input_epoch") for n in a)
    for name in a:
        assert np.array_equal(a[name], b[name]), name  # bitwise, not approximately
    losses = {}
    for d in ("a", "b"):
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / d}/mlflow.db")
        (run,) = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
        history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(90))
        losses[d] = [m.value for m in history]
    assert losses["a"] == losses["b"]


def test_cached_streams_train_as_the_uncached_one(tmp_path):
    """data.cache: memory, or a file prefix (tf.data writes it on the first epoch, reads it after): same losses."""
    data = regression(640, 8, 1, 0.1, "linear", 0.0, 1, None, 0)
    streams = _as_streams(data)
    runs = {}
    for cache in (None, "memory", str(tmp_path / "cache")):
        loop = _loop(StreamInput(streams.train, 32, 5, shuffle=True, shuffle_buffer=100, cache=cache))
        runs[cache] = loop.run(60)["train/loss"].numpy()  # three epochs: the cache is read from the second on
    np.testing.assert_array_equal(runs["memory"], runs[None])
    np.testing.assert_array_equal(runs[str(tmp_path / "cache")], runs[None])
    assert any(p.name.startswith("cache") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_trainer_evaluate_reproduces_a_streamed_runs_validation(tmp_path):
    import json

    from conftest import run_cli

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["model=classifier", "data=classification", "loss=categorical_crossentropy", "data.in_memory=false",
            "data.n_samples=1000", "trainer.max_steps=100", "trainer.val_metrics=[accuracy,top_2_accuracy,auc]",
            f"tracking.uri={uri}", "hydra.run.dir=run"]  # fmt: skip
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    _, run = only_run(tmp_path)
    logged = run.data.metrics
    assert logged["val/top_2_accuracy"] >= logged["val/accuracy"] > 0.5
    assert 0.5 < logged["val/auc"] <= 1.0
    report = run_cli(["evaluate", f"run_id={run.info.run_id}", f"uri={uri}", "format=json"], tmp_path)
    assert report.returncode == 0, report.stderr
    evaluated = json.loads(report.stdout)
    assert evaluated["split"] == "validation" and evaluated["examples"] == 200
    for key in ("loss", "accuracy", "top_2_accuracy", "auc"):
        assert evaluated[key] == pytest.approx(logged[f"val/{key}"], rel=1e-5), key


@pytest.mark.slow
def test_a_resumed_run_with_augmentation_draws_on_as_the_uninterrupted_one(tmp_path, digits):
    """The augmentation layers' random states are checkpointed with the input position: streamed digits PNGs
    with random flips and rotations, stopped mid-epoch and resumed, end bitwise equal."""
    common = ["model=cnn", "model.filters=[4]", "loss=sparse_categorical_crossentropy", "data=image_folder",
              f"data.path={digits['root'] / 'png'}", "data.color_mode=grayscale", "data.in_memory=false",
              "data.augment={flip: horizontal, rotation: 0.1}", "trainer.batch_size=64",
              "trainer.deterministic=true", "trainer.steps_per_loop=7", "tracking.log_model=false"]  # fmt: skip
    train(cfg_for(tmp_path / "a", *common, "trainer.max_steps=50"), output_dir=tmp_path / "a")
    train(cfg_for(tmp_path / "b", *common, "trainer.max_steps=30"), output_dir=tmp_path / "b")  # epoch 2 of 22 steps
    train(cfg_for(tmp_path / "b", f"resume={tmp_path / 'b'}"), overrides=["trainer.max_steps=50"])
    readers = {d: tf.train.load_checkpoint(str(tmp_path / d / "checkpoints")) for d in ("a", "b")}
    names = [n for n in readers["a"].get_variable_to_shape_map() if n.startswith(("model/", "augment_seeds"))]
    assert any(n.startswith("augment_seeds") for n in names)
    for name in names:
        assert np.array_equal(readers["a"].get_tensor(name), readers["b"].get_tensor(name)), name


# --- blocks: the .npy read by TensorFlow, the windowed shuffle -------------------------------------------------
def _concat(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    parts = list(ds.as_numpy_iterator())
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


@pytest.mark.parametrize("y_kind", ["class ids", "targets"])
def test_an_npy_pair_is_read_by_tensorflow_in_the_generators_blocks(tmp_path, y_kind):
    """Two .npy files in C order are read by FixedLengthRecordDataset (no Python in the pipeline): the same rows,
    the same blocks and dtypes as the generator of `_rows`, which big-endian files still take."""
    from trainer.data.core import BLOCK
    from trainer.data.files import _raw_blocks, numpy

    n = 2 * BLOCK + 1234  # two whole blocks and a short one
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3, 2)).astype(np.float32)
    y = rng.integers(0, 5, n) if y_kind == "class ids" else rng.normal(size=(n, 2))  # int64 / float64 on disk
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "xb.npy", x.astype(">f4"))  # big-endian: the generator's path
    raw = numpy(str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), "x", "y", None)
    generated = numpy(str(tmp_path / "xb.npy"), str(tmp_path / "y.npy"), "x", "y", None)
    assert _raw_blocks(raw.arrays[0]) is not None and _raw_blocks(generated.arrays[0]) is None
    sizes = [len(xb) for xb, _ in raw.blocks().as_numpy_iterator()]
    assert sizes == [BLOCK, BLOCK, 1234] == [len(xb) for xb, _ in generated.blocks().as_numpy_iterator()]
    (xa, ya), (xg, yg) = _concat(raw.blocks()), _concat(generated.blocks())
    np.testing.assert_array_equal(xa, x)
    np.testing.assert_array_equal(xg, x)
    expected = y.astype(np.int64) if y_kind == "class ids" else y.astype(np.float32)
    np.testing.assert_array_equal(ya, expected)
    np.testing.assert_array_equal(yg, expected)
    assert ya.dtype == yg.dtype == expected.dtype and xa.dtype == np.float32
    assert raw.blocks().element_spec == generated.blocks().element_spec


def test_the_windowed_shuffle_takes_every_row_once_within_its_window_and_is_a_function_of_seed_and_epoch():
    """data.shuffle_buffer=W: each epoch every row once (the ragged last batch dropped), no row farther from its
    place than its window, each window's order fresh per epoch and the same for the same (seed, epoch)."""
    n, batch, window = 10_000, 32, 1_000
    rows = np.arange(n, dtype=np.float32).reshape(-1, 1)
    stream = Stream(lambda: tf.data.Dataset.from_tensor_slices((rows, rows)), n)

    def epoch(seed: int, e: int) -> np.ndarray:
        inputs = StreamInput(stream, batch, seed, shuffle=True, shuffle_buffer=window)
        return np.concatenate([x[:, 0] for x, _ in inputs.dataset(e, batch).as_numpy_iterator()]).astype(int)

    first = epoch(0, 0)
    assert len(first) == n // batch * batch and len(set(first)) == len(first)  # each row at most once
    assert set(first) <= set(range(n)) and (np.arange(n)[: len(first)] != first).mean() > 0.9  # shuffled
    assert (first // window == np.arange(len(first)) // window).all()  # within its window
    np.testing.assert_array_equal(epoch(0, 0), first)  # a function of (seed, epoch): a resume sees it again
    assert (epoch(0, 1) != first).mean() > 0.9 and (epoch(1, 0) != first).mean() > 0.9
    unshuffled = StreamInput(stream, batch, 0, shuffle=False).dataset(0, batch)
    np.testing.assert_array_equal(np.concatenate([x[:, 0] for x, _ in unshuffled.as_numpy_iterator()]),
                                  np.arange(len(first)))  # fmt: skip


def test_an_npy_cut_or_removed_while_streamed_is_one_line_naming_it(tmp_path):
    """Before the file-size check: `reading the data failed: {{function_node __wrapped__IteratorGetNext...}}
    Excluding the header (128 bytes) and footer ...`, TensorFlow's record lengths instead of the file's story."""
    from trainer.config import TrainerError
    from trainer.data.files import numpy
    from trainer.inputs import reading

    np.save(tmp_path / "x.npy", np.ones((20_000, 4), np.float32))
    np.save(tmp_path / "y.npy", np.zeros(20_000, np.float32))
    for cut, said in ((128 + 4096 * 16 * 2, "is 131,200 bytes where its 20,000 rows need 320,128"), (None, "is gone")):
        np.save(tmp_path / "x.npy", np.ones((20_000, 4), np.float32))
        ex = numpy(str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), "x", "y", None)
        batches = ex.blocks()
        if cut is None:
            (tmp_path / "x.npy").unlink()
        else:
            with open(tmp_path / "x.npy", "r+b") as f:
                f.truncate(cut)
        with pytest.raises(TrainerError) as e, reading(Stream(None, 20_000, ex.diagnose, blocks=ex.blocks)):
            sum(len(x) for x, _ in batches.as_numpy_iterator())
        assert str(e.value) == (f"data.path={tmp_path / 'x.npy'} {said}: it changed while the run read it; restore "
                                "it and resume the run")  # fmt: skip
