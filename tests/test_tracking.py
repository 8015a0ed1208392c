"""The metric sink and the run lifecycle against a real MLflow SQLite store in a temp dir."""

from __future__ import annotations

import math
import time

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from trainer.config import TrainerError
from trainer.tracking import Chunk, LogBatchWriter, MetricSink, Run, SqlBulkWriter, flatten


@pytest.fixture
def client(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)


def new_run(client: MlflowClient, name: str = "r") -> str:
    exp = client.get_experiment_by_name("t") or client.get_experiment(client.create_experiment("t"))
    return client.create_run(exp.experiment_id, run_name=name).info.run_id


def chunk(first: int, k: int, names=("a/w", "a/b")) -> Chunk:
    steps = np.arange(first, first + k, dtype=np.float32)
    values = {
        "train/loss": 1.0 / (1.0 + steps),
        "train/lr": np.full(k, 0.01, np.float32),
        "train/grad_norm_by_var/": np.stack([steps, 2 * steps], axis=1),
    }
    return Chunk(first, values, names, t_start=1000.0 + first, t_end=1000.0 + first + k)


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))


def test_sql_bulk_path_writes_what_log_batch_writes(client):
    """Same points through both writers: identical histories and latest metrics, read via the public API."""
    bulk_run, batch_run = new_run(client, "bulk"), new_run(client, "batch")
    bulk, plain = MetricSink(client, bulk_run), MetricSink(client, batch_run, bulk=False)
    assert isinstance(bulk.writer, SqlBulkWriter) and isinstance(plain.writer, LogBatchWriter)
    for sink in (bulk, plain):
        for first in range(0, 300, 50):
            sink.submit(chunk(first, 50))
        special = {"val/loss": np.array([np.nan]), "val/big": np.array([np.inf]), "val/small": np.array([-np.inf])}
        sink.submit(Chunk(300, special, t_start=2000.0, t_end=2000.0))
        sink.close()
        assert sink.error is None and sink.points_written == 300 * 4 + 3
    keys = [
        "train/loss",
        "train/lr",
        "train/grad_norm_by_var/a/w",
        "train/grad_norm_by_var/a/b",
        "val/big",
        "val/small",
    ]
    for key in keys:
        assert history(client, bulk_run, key) == history(client, batch_run, key), key
    assert len(history(client, bulk_run, "train/loss")) == 300
    assert [s for s, _, _ in history(client, bulk_run, "train/loss")] == list(range(300))
    assert math.isnan(client.get_metric_history(bulk_run, "val/loss")[0].value)
    assert client.get_metric_history(bulk_run, "val/big")[0].value == pytest.approx(1.7976931348623157e308)
    latest_bulk, latest_batch = client.get_run(bulk_run).data.metrics, client.get_run(batch_run).data.metrics
    assert latest_bulk.keys() == latest_batch.keys()
    for key, value in latest_batch.items():
        assert latest_bulk[key] == pytest.approx(value, nan_ok=True), key
    assert latest_bulk["train/loss"] == pytest.approx(1.0 / 300)
    assert latest_bulk["train/grad_norm_by_var/a/b"] == pytest.approx(2 * 299)


def test_one_bulk_write_of_whole_and_partial_insert_statements_equals_log_batch(client):
    """411 points in one write: four ROWS_PER_INSERT-row statements and 11 single rows, as log_batch stores them."""
    from trainer.tracking.writers import ROWS_PER_INSERT

    steps = np.arange(137)
    series = [(key, steps, np.sin(steps + i), 5_000 + steps) for i, key in enumerate(("x/a", "x/b", "x/c"))]
    assert 3 * len(steps) // ROWS_PER_INSERT == 4 and 3 * len(steps) % ROWS_PER_INSERT == 11
    bulk_run, batch_run = new_run(client, "bulk"), new_run(client, "batch")
    SqlBulkWriter.for_client(client, bulk_run).write(series)
    LogBatchWriter(client, batch_run).write(series)
    for key, *_ in series:
        assert len(history(client, bulk_run, key)) == 137
        assert history(client, bulk_run, key) == history(client, batch_run, key), key


def test_log_every_keeps_every_nth_step(client):
    run_id = new_run(client)
    sink = MetricSink(client, run_id, log_every=7)
    for first in range(0, 100, 30):
        sink.submit(chunk(first, min(30, 100 - first)))
    sink.close()
    assert [s for s, _, _ in history(client, run_id, "train/loss")] == list(range(0, 100, 7))
    assert sink.latest["train/loss"] == pytest.approx(1.0 / 100)  # the progress bar still sees the last step


def test_a_failing_store_never_stops_training_and_its_losses_are_counted(client):
    run_id = new_run(client)
    sink = MetricSink(client, run_id, close_timeout=0.5)
    client.set_terminated(run_id)
    client.delete_run(run_id)  # writes to a deleted run fail in the store
    for first in range(0, 50, 10):
        sink.submit(chunk(first, 10))  # never raises, never blocks: training goes on
    sink.close()
    assert sink.error is not None and sink.points_lost == 50 * 4 and sink.points_written == 0


def test_points_held_while_the_store_is_away_are_bounded(client):
    run_id = new_run(client)
    sink = MetricSink(client, run_id, max_pending_points=100, close_timeout=0.3)
    client.set_terminated(run_id)
    client.delete_run(run_id)
    for first in range(0, 300, 10):
        sink.submit(chunk(first, 10))  # 1200 points into a 100-point buffer: the oldest are dropped, counted
    assert sink._pending_points <= 100
    sink.close()
    assert sink.points_lost == 300 * 4 and sink.points_written == 0


@pytest.mark.slow  # 8-22 s of CLI runs: the fast suite stays under 10 minutes (make test-slow runs it)
def test_a_healthy_store_loses_no_point_however_close_the_buffer_runs_to_its_bound(client):
    """Chunks that would take the buffer past its bound wait while the store works; only a store that is
    away makes the oldest go (before: one chunk over the bound dropped the oldest with the store healthy)."""
    run_id = new_run(client)
    sink = MetricSink(client, run_id, max_pending_points=10_000)
    for first in range(0, 30 * 2_000, 2_000):
        sink.submit(chunk(first, 2_000))  # 8,000 points each: two never fit the buffer together
    sink.close()
    assert sink.points_lost == 0 and sink.error is None
    assert sink.points_written == 30 * 2_000 * 4
    assert len(client.get_metric_history(run_id, "train/loss")) == 60_000


def test_chunks_arriving_within_the_linger_share_one_transaction(client):
    """Twenty chunks inside `linger_seconds` are one write (a transaction costs the same at any size);
    then a chunk after a quiet spell is written within the linger without waiting for close()."""
    run_id = new_run(client)
    sink = MetricSink(client, run_id, linger_seconds=2.0)
    writes = []
    write = sink.writer.write
    sink.writer.write = lambda batch: (writes.append(sum(len(s[1]) for s in batch)), write(batch))
    for first in range(0, 200, 10):
        sink.submit(chunk(first, 10))
    deadline = time.monotonic() + 10
    while not writes and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writes == [200 * 4]  # every point so far, in one transaction
    sink.submit(chunk(200, 10))
    while len(writes) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writes == [200 * 4, 10 * 4]  # written by the linger, before close()
    sink.close()
    assert [s for s, _, _ in history(client, run_id, "train/loss")] == list(range(210))


def test_the_queue_is_bounded(client):
    sink = MetricSink(client, new_run(client), max_chunks=3)
    assert sink._queue.maxsize == 3
    sink.close()


def cfg(tmp_path):
    return OmegaConf.create(
        {
            "optimizer": {"lr": 0.1, "_target_": "keras.optimizers.SGD"},
            "model": {"hidden": [4, 4]},
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "e", "run_name": "x",
                         "log_every": 1, "queue_chunks": 4},
        }
    )  # fmt: skip


def test_run_logs_params_artifacts_and_status(tmp_path, client):
    with Run(cfg(tmp_path), overrides=["optimizer.lr=0.1"]) as run:
        run.sink.submit(chunk(0, 5))
        run.log(5, {"val/loss": 0.5})
    r = client.get_run(run.run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params["optimizer.lr"] == "0.1" and r.data.params["model.hidden"] == "[4, 4]"
    assert r.data.tags["overrides"] == "optimizer.lr=0.1"
    artifacts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"config.yaml", "overrides.yaml"} <= artifacts
    assert len(client.get_metric_history(run.run_id, "train/loss")) == 5
    assert client.get_metric_history(run.run_id, "val/loss")[0].step == 5


@pytest.mark.parametrize(("error", "status"), [(ValueError("boom\nmore"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_a_run_that_dies_is_marked_and_keeps_its_points(tmp_path, client, error, status):
    with pytest.raises(type(error)), Run(cfg(tmp_path)) as run:
        for first in range(0, 40, 10):
            run.sink.submit(chunk(first, 10))
        raise error
    r = client.get_run(run.run_id)
    assert r.info.status == status
    assert len(client.get_metric_history(run.run_id, "train/loss")) == 40
    if status == "FAILED":
        assert r.data.tags["error"] == "boom"


def test_unreachable_store_fails_before_training(tmp_path):
    c = cfg(tmp_path)
    (tmp_path / "a-file").write_text("not a directory")
    c.tracking.uri = f"sqlite:///{tmp_path}/a-file/mlflow.db"  # no store can be made under a file, even by root
    with pytest.raises(TrainerError, match=r"tracking\.uri"), Run(c):
        pass


def test_flatten_gives_dotted_params():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": "1", "a.c.d": "[1, 2]", "e": "None"}
