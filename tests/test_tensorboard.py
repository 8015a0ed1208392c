"""tracking.tensorboard=true: real training runs into a real MLflow SQLite store, their TensorBoard event files read
back with TensorFlow's own reader, point for point against the run's MLflow history; off, none; a resume appends."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient

from conftest import compose_config, new_store, run_cli
from trainer.config import TrainerError, check
from trainer.tracking.run import TENSORBOARD_TAG
from trainer.train import train

BASE = [
    "model=mlp",
    "model.hidden=[4]",
    "data=regression",
    "data.n_samples=256",
    "trainer.steps_per_loop=4",
    "trainer.eval_every=10",
    "trainer.progress=false",
    "tracking.system_metrics=false",
    "tracking.log_model=false",
    "tracking.log_plots=false",
]


def event_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if "tfevents" in p.name)


def read_events(directory: Path) -> tuple[dict[str, dict[int, float]], list[int]]:
    """{tag: {step: value}} as TensorBoard's loader sees the directory: its files in name order, and on a SessionLog
    START the points read before at and after its step dropped; and the START records' steps."""
    points: dict[str, dict[int, float]] = {}
    starts = []
    for path in event_files(directory):
        events = list(tf.compat.v1.train.summary_iterator(str(path)))
        assert events[0].file_version == "brain.Event:2", path
        for event in events[1:]:
            if event.HasField("session_log"):
                assert event.session_log.status == tf.compat.v1.SessionLog.START
                starts.append(event.step)
                points = {tag: {s: v for s, v in seen.items() if s < event.step} for tag, seen in points.items()}
                continue
            [value] = event.summary.value
            assert value.WhichOneof("value") == "simple_value"
            assert event.step not in points.setdefault(value.tag, {}), (value.tag, event.step)  # once a step
            points[value.tag][event.step] = value.simple_value
    return points, starts


def history(client: MlflowClient, run_id: str) -> dict[str, dict[int, float]]:
    """Every metric of the run, as {key: {step: value}}."""
    keys = client.get_run(run_id).data.metrics
    return {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in keys}


def assert_same(events: dict[str, dict[int, float]], stored: dict[str, dict[int, float]]) -> None:
    """The same tags, steps and values; values to float32 (the step's own precision: MLflow keeps a double)."""
    assert sorted(events) == sorted(stored)
    for key, points in stored.items():
        assert sorted(events[key]) == sorted(points), key
        steps = sorted(points)
        expected = np.array([points[s] for s in steps], np.float32)
        np.testing.assert_array_equal(np.array([events[key][s] for s in steps], np.float32), expected, err_msg=key)


def only_run(client: MlflowClient) -> str:
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    return run.info.run_id


def test_event_files_hold_the_runs_mlflow_history(tmp_path, mlflow_template, capsys):
    """23 steps in chunks of 4, logged every 2nd step: the event files hold exactly the points of the MLflow history,
    train/loss, train/lr and train/grad_norm at steps 0, 2, ..., 22, the per-variable norms, val/* at 10, 20 and 23."""
    uri = new_store(tmp_path, mlflow_template)
    overrides = [*BASE, f"tracking.uri={uri}", "trainer.max_steps=23", "tracking.log_every=2"]
    overrides.append("tracking.tensorboard=true")
    train(compose_config(overrides), overrides=overrides, output_dir=tmp_path / "run")
    mlflow.set_tracking_uri(None)
    client = MlflowClient(uri)
    run_id = only_run(client)
    directory = tmp_path / "run" / "tensorboard"
    assert f"TensorBoard: tensorboard --logdir {directory.resolve()}\nMLflow: " in capsys.readouterr().err
    assert client.get_run(run_id).data.tags[TENSORBOARD_TAG] == str(directory.resolve())
    [path] = event_files(tmp_path)  # one file, in the run's directory
    assert path.parent == directory and path.name.startswith("events.out.tfevents.")
    events, starts = read_events(directory)
    assert starts == []
    stored = history(client, run_id)
    logged = list(range(0, 23, 2))
    for key in ("train/loss", "train/lr", "train/grad_norm"):
        assert sorted(events[key]) == logged, key
    assert sorted(events["val/loss"]) == [10, 20, 23]
    assert any(key.startswith("train/grad_norm_by_var/") for key in events)
    assert_same(events, stored)


def test_a_resumed_run_appends_to_the_same_directory(tmp_path, mlflow_template):
    """A finished 14-step run resumed to 30 steps from another output dir: a second file beside the first, led by a
    START record at step 14 and the evaluation at step 14 again (the store keeps it; after the START TensorBoard would
    not); read as TensorBoard reads them, the files hold the MLflow history of the whole run, perf/* at 30 only."""
    uri = new_store(tmp_path, mlflow_template)
    first = [*BASE, f"tracking.uri={uri}", "trainer.max_steps=14", "tracking.tensorboard=true"]
    train(compose_config(first), overrides=first, output_dir=tmp_path / "run")
    resume = [*BASE, f"tracking.uri={uri}", f"resume={tmp_path / 'run'}", "trainer.max_steps=30"]
    train(compose_config(resume), overrides=resume, output_dir=tmp_path / "resumed")
    mlflow.set_tracking_uri(None)
    client = MlflowClient(uri)
    run_id = only_run(client)
    directory = tmp_path / "run" / "tensorboard"
    assert client.get_run(run_id).data.tags[TENSORBOARD_TAG] == str(directory.resolve())
    assert [p.parent for p in event_files(tmp_path)] == [directory, directory]
    events, starts = read_events(directory)
    assert starts == [14]
    assert sorted(events["train/loss"]) == list(range(30)) and sorted(events["val/loss"]) == [10, 14, 20, 30]
    assert sorted(events["perf/steps_per_sec"]) == [30]
    assert_same(events, history(client, run_id))


def test_off_writes_no_event_file(tmp_path, mlflow_template):
    uri = new_store(tmp_path, mlflow_template)
    overrides = [*BASE, f"tracking.uri={uri}", "trainer.max_steps=4"]
    assert compose_config(overrides).tracking.tensorboard is False  # off unless asked for
    train(compose_config(overrides), overrides=overrides, output_dir=tmp_path / "run")
    mlflow.set_tracking_uri(None)
    client = MlflowClient(uri)
    assert event_files(tmp_path) == [] and not (tmp_path / "run" / "tensorboard").exists()
    assert TENSORBOARD_TAG not in client.get_run(only_run(client)).data.tags


def test_a_bad_value_is_one_error_line(tmp_path):
    """Rejected while composing, before TensorFlow starts: one line, exit 1, no run."""
    proc = run_cli(["tracking.tensorboard=maybe", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "tracking.tensorboard=maybe" in lines[0] and "not a valid bool" in lines[0], lines[0]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tracking.tensorboard_dir=/tmp/tb"], "tracking.tensorboard_dir='/tmp/tb' is invalid: expected null "
         "unless tracking.tensorboard=true"),
        (["tracking.tensorboard=true", "tracking.tensorboard_dir=' '"], "tracking.tensorboard_dir=' ' is invalid: "
         "expected a directory, or null"),
    ],
)  # fmt: skip
def test_a_directory_without_the_setting_is_one_line(overrides, message):
    with pytest.raises(TrainerError) as info:
        check(compose_config(overrides))
    assert str(info.value) == message


def test_an_unwritable_directory_is_one_line_and_no_run(tmp_path, mlflow_template):
    """tracking.tensorboard_dir under a file: one line naming the key and the directory, and no run left RUNNING."""
    uri = new_store(tmp_path, mlflow_template)
    (tmp_path / "file").write_text("")
    where = tmp_path / "file" / "tb"
    overrides = [*BASE, f"tracking.uri={uri}", "trainer.max_steps=2", "tracking.tensorboard=true",
                 f"tracking.tensorboard_dir={where}"]  # fmt: skip
    with pytest.raises(TrainerError) as info:
        train(compose_config(overrides), overrides=overrides, output_dir=tmp_path / "run")
    assert str(info.value).startswith(f"tracking.tensorboard_dir: cannot write TensorBoard event files in {where} (")
    mlflow.set_tracking_uri(None)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tape-trainer")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []


def test_the_lr_finders_event_files_go_beside_the_runs(tmp_path):
    """optimizer.lr=auto with a tensorboard_dir: the range test, a run of its own, writes in <dir>/lr_find, so its
    steps never mix with the run's in one directory (without a tensorboard_dir each has its own run directory)."""
    from trainer.lr_find import finder_config

    overrides = ["tracking.tensorboard=true", f"tracking.tensorboard_dir={tmp_path / 'tb'}"]
    found = finder_config(compose_config(overrides), overrides)
    assert found.tracking.tensorboard_dir == str(tmp_path / "tb" / "lr_find")
