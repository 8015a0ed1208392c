"""Nothing lost: signals, resume, bitwise-equal determinism, non-finite steps, early stopping, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from trainer.actions import EarlyStopper
from trainer.config import TrainerError, register
from trainer.train import train

CONF = str(Path(__file__).resolve().parents[1] / "conf")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def cfg_for(tmp_path: Path, *overrides: str):
    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        return compose("config", [f"tracking.uri={uri}", "trainer.progress=false", *overrides])


def only_run(tmp_path: Path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def steps_of(client, run, key="train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def cli(tmp_path: Path, *args: str, **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "trainer", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *args]
    return subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # 8-22 s of CLI runs: the fast suite stays under 10 minutes (make test-slow runs it)
def test_sigint_checkpoints_flushes_marks_killed_and_resume_continues_the_same_run(tmp_path):
    proc = cli(tmp_path, "model=mlp", "trainer.max_steps=1000000", "trainer.checkpoint_every=500",
               "hydra.run.dir=run")  # fmt: skip
    deadline = time.time() + 120
    while not list((tmp_path / "run" / "checkpoints").glob("ckpt-500.index")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resume=" in err
    client, run = only_run(tmp_path)
    assert run.info.status == "KILLED"
    stopped = max(int(p.stem.split("-")[1]) for p in (tmp_path / "run" / "checkpoints").glob("ckpt-*.index"))
    assert stopped >= 500
    assert steps_of(client, run) == list(range(stopped))  # every step up to the stop, none after it
    assert len(client.get_metric_history(run.info.run_id, "train/grad_norm_by_var/dense_0/kernel")) == stopped

    total = stopped + 300
    proc = cli(tmp_path, f"resume={run.info.run_id}", f"trainer.max_steps={total}")
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    client, run = only_run(tmp_path)  # still one run: the same one went on
    assert run.info.status == "FINISHED"
    assert steps_of(client, run) == list(range(total))
    assert run.data.tags["resumed_at_step"] == str(stopped)


@pytest.mark.slow  # 8-18 s of CLI runs: the fast suite stays under 10 minutes (make test-slow runs it)
def test_interrupted_and_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path):
    common = ["model=mlp", "model.dropout=0.1", "data.n_samples=640", "trainer.batch_size=32",
              "trainer.deterministic=true", "trainer.steps_per_loop=7", "tracking.log_model=false"]  # fmt: skip
    train(cfg_for(tmp_path / "a", *common, "trainer.max_steps=90"), output_dir=tmp_path / "a")
    first = cfg_for(tmp_path / "b", *common, "trainer.max_steps=40")  # an epoch is 16 steps: stop mid-epoch
    train(first, output_dir=tmp_path / "b")
    train(cfg_for(tmp_path / "b", f"resume={tmp_path / 'b'}"), overrides=["trainer.max_steps=90"])

    def final_weights(d: Path) -> list[np.ndarray]:
        import tensorflow as tf

        reader = tf.train.load_checkpoint(str(d / "checkpoints"))
        names = sorted(n for n in reader.get_variable_to_shape_map() if n.startswith("model/"))
        return [reader.get_tensor(n) for n in names]

    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)  # bitwise, not approximately


@pytest.mark.slow  # 8-22 s of CLI runs: the fast suite stays under 10 minutes (make test-slow runs it)
def test_nonfinite_step_stops_with_the_step_and_variable_named(tmp_path):
    """lr 1.0 on the tape example multiplies the residual by -9 a step: float32 overflows at step 20."""
    proc = cli(tmp_path, "experiment=tape_example", "optimizer.lr=1.0", "trainer.max_steps=100",
               "trainer.checkpoint_every=10", "hydra.run.dir=run")  # fmt: skip
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in err
    assert "non-finite loss or gradient at step 20; first non-finite gradient: w" in err
    client, run = only_run(tmp_path)
    assert run.info.status == "FAILED"
    assert "step 20" in run.data.tags["error"]
    assert steps_of(client, run) == list(range(20))
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("ckpt-*.index"))
    assert kept == ["ckpt-0.index", "ckpt-10.index", "ckpt-20.index"]  # none after the blow-up


def test_skip_step_leaves_weights_untouched_and_counts_the_skips(tmp_path):
    objective = train(
        cfg_for(tmp_path, "experiment=tape_example", "optimizer.lr=1.0", "trainer.max_steps=30",
                "trainer.on_nonfinite=skip_step", "trainer.max_skipped_fraction=0.5", "tracking.log_model=false"),
        output_dir=tmp_path,
    )  # fmt: skip
    client, run = only_run(tmp_path)
    skipped = client.get_metric_history(run.info.run_id, "train/skipped_steps")
    assert [m.value for m in sorted(skipped, key=lambda m: m.step)][-1] == 10  # steps 20..29
    assert np.isfinite(objective)


def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path):
    train(
        cfg_for(tmp_path, "optimizer=sgd", "optimizer.lr=1e-9", "data.n_samples=512", "trainer.max_steps=1000",
                "trainer.eval_every=10", "trainer.early_stopping.patience=2",
                "trainer.early_stopping.min_delta=1e-3", "tracking.log_model=false"),
        output_dir=tmp_path,
    )  # fmt: skip
    client, run = only_run(tmp_path)
    assert run.data.tags["early_stopped_at"] == "30"  # best at 10, no better at 20 and 30
    assert steps_of(client, run) == list(range(30))
    assert run.data.metrics["early_stopping/best_step"] == 10


def test_early_stopper_restores_the_best_weights():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    stopper = EarlyStopper("val/loss", patience=2, min_delta=0.0)
    model.layers[0].kernel.assign([[1.0]])
    assert not stopper.should_stop(10, {"loss": 0.5}, model)
    model.layers[0].kernel.assign([[2.0]])
    assert not stopper.should_stop(20, {"loss": 0.7}, model)
    assert stopper.should_stop(30, {"loss": 0.6}, model)
    stopper.restore(model)
    assert model.layers[0].kernel.numpy().item() == 1.0 and stopper.best_step == 10
    acc = EarlyStopper("val/accuracy", patience=1, min_delta=0.0)
    assert not acc.should_stop(1, {"accuracy": 0.5}, model)
    assert not acc.should_stop(2, {"accuracy": 0.9}, model)  # higher is better for accuracy


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["resume=/nonexistent/run"], "resume='/nonexistent/run': neither a run directory nor an MLflow run id"),
        (["model.units=3"], "outputs of shape (3,) per example but the data's targets need (1,) (regression)"),
        (["loss=categorical_crossentropy"], "needs class targets but data trainer.data.regression has continuous ones"),
        (
            ["trainer.batch_size=5000"],
            "trainer.batch_size=5000 is larger than the training set (3277 examples): set trainer.batch_size=32",
        ),
        (["data=csv"], "data.path must be set"),
        (["trainer.device=gpu"], "TensorFlow sees no GPU"),
        (["trainer.inter_op_threads=7"], "trainer.inter_op_threads=7: TensorFlow already started"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, overrides, message):
    with pytest.raises(TrainerError) as info:
        train(cfg_for(tmp_path, *overrides), output_dir=tmp_path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "the file is empty"),
        ("a,b,y\n1,2,3\n1,x,3\n", "column 'b' is not numeric: row 2 holds 'x'"),
        ("a,b,z\n1,2,3\n", "no column 'y'; columns are a, b, z"),
        ("a,y\n1,2\n3\n", "line 3 has 1 fields, the header has 2"),
    ],
)
def test_bad_csv_names_the_file_and_column(tmp_path, content, message):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(TrainerError, match=None) as info:
        train(cfg_for(tmp_path, "data=csv", f"data.path={path}", "data.target=[y]"), output_dir=tmp_path)
    assert message in str(info.value)


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    train(cfg_for(tmp_path, "experiment=tape_example", "tracking.log_model=false"), output_dir=tmp_path)
    for data_file in (tmp_path / "checkpoints").glob("ckpt-*.data-*"):
        data_file.write_bytes(b"garbage")
    with pytest.raises(TrainerError, match=r"no checkpoint in .* can be restored: .*ckpt-10 \(.*ckpt-0 \("):
        train(cfg_for(tmp_path, f"resume={tmp_path}"))


def test_unwritable_tracking_store_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(TrainerError, match="cannot open the MLflow store"):
        train(cfg_for(tmp_path, f"tracking.uri=sqlite:///{tmp_path}/file/m.db"), output_dir=tmp_path)


BLOCKING_CALLBACK = '''
import pathlib
import tensorflow as tf
from trainer.callbacks import Callback


@tf.function
def spin(seconds):
    start = tf.timestamp()
    _, x = tf.while_loop(lambda i, x: tf.timestamp() - start < seconds,
                         lambda i, x: (i + 1, tf.tanh(tf.matmul(x, x) / 64.0)), (0, tf.ones((64, 64))))
    return x


class Block(Callback):
    """At step >= 40: one compiled call of 300 s, as a huge model's chunk or validation pass is."""

    every = 20

    def on_chunk_end(self, ctx, step, arrays):
        if step >= 40:
            pathlib.Path("blocking").write_text(str(step))
            spin(tf.constant(300.0, tf.float64)).numpy()
'''


@pytest.mark.slow  # a 25-60 s CLI run
def test_sigterm_inside_one_long_compiled_call_ends_the_process_within_the_grace_period(tmp_path):
    """Before: Python's handler waits for the main thread to leave TensorFlow's call, so a 610,368-class model
    took 295 s to exit after SIGTERM, printing nothing, the run left RUNNING. Now a thread hears the signal at
    once, says so, and after STOP_GRACE_SECONDS without the round's end marks the run KILLED and exits; the
    resume starts from the newest durable checkpoint."""
    from trainer.process import STOP_GRACE_SECONDS

    (tmp_path / "blocker.py").write_text(BLOCKING_CALLBACK)
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "trainer", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "model=mlp",
           "trainer.max_steps=100000", "trainer.checkpoint_every=20", "trainer.progress=false",
           "trainer.callbacks=[{_target_: blocker.Block}]", "hydra.run.dir=run"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "blocking").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(1.0)  # inside the call
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 143, err[-3000:]
    assert STOP_GRACE_SECONDS <= elapsed < STOP_GRACE_SECONDS + 10, elapsed
    assert "SIGTERM: stopping after this chunk" in err and "Traceback" not in err, err[-3000:]
    [line] = [x for x in err.splitlines() if x.startswith("stopped: SIGTERM")]
    assert f"did not end within {STOP_GRACE_SECONDS:g} s" in line and f"resume={tmp_path / 'run'}" in line
    _, run = only_run(tmp_path)
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["stopped_by"]
    durable = int(json.loads((tmp_path / "run" / "checkpoints" / "durable.json").read_text())["step"])
    assert durable >= 20 and f"durable checkpoint is at step {durable}" in line
