"""Beyond one plain float32 step: gradient accumulation and mixed precision."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.migration import MigrationContext
from alembic.operations import Operations
from mlflow.store.db.utils import _get_alembic_config
from omegaconf import OmegaConf

from conftest import compose_config, new_store, option_kwargs, sqlite_uri
from trainer import losses
from trainer.config import TrainerError, check
from trainer.data import regression
from trainer.loop import PER_VARIABLE, StepLoop
from trainer.models import MLP, Linear
from trainer.store import CHART_COLUMNS, CHART_INDEX, MLFLOW_COLUMNS, index_for_charts
from trainer.tracking import Chunk, MetricSink, Run

DATA = regression(**option_kwargs("data", "regression", n_samples=256, n_features=4, val_fraction=0.0, seed=2))


def linear_loop(batch_size: int, accumulate: int) -> StepLoop:
    keras.utils.set_random_seed(0)
    model = Linear(**option_kwargs("model", "linear", units=1))
    return StepLoop(model, losses.mse, keras.optimizers.SGD(0.1), DATA.x_train, DATA.y_train, batch_size,
                    seed=5, accumulate_steps=accumulate)  # fmt: skip


def test_accumulating_4_batches_of_8_is_one_batch_of_32():
    """Same examples per update (the order is a function of the batch number), same mean gradient."""
    big, small = linear_loop(32, 1), linear_loop(8, 4)
    a, b = big.run(20), small.run(20)  # 20 updates: 2.5 epochs of 256 examples
    np.testing.assert_allclose(b["train/loss"].numpy(), a["train/loss"].numpy(), rtol=1e-5)
    np.testing.assert_allclose(b[PER_VARIABLE].numpy(), a[PER_VARIABLE].numpy(), rtol=1e-5)
    for x, y in zip(big.model.weights, small.model.weights, strict=True):
        np.testing.assert_allclose(y.numpy(), x.numpy(), rtol=1e-5, atol=1e-7)
    assert int(small.step.numpy()) == 20


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains_and_reports_unscaled_gradient_norms(policy):
    def loop_for(p: str) -> StepLoop:
        keras.config.set_dtype_policy(p)
        keras.utils.set_random_seed(0)
        optimizer = keras.optimizers.Adam(1e-2)
        if p == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        return StepLoop(
            MLP(**option_kwargs("model", "mlp", hidden=[16], units=1)),
            losses.mse,
            optimizer,
            DATA.x_train,
            DATA.y_train,
            32,
        )

    try:
        reference, mixed = loop_for("float32"), loop_for(policy)
    finally:
        keras.config.set_dtype_policy("float32")
    assert mixed.model.layers[0].compute_dtype == policy.removeprefix("mixed_")
    first_ref, first = reference.run(1), mixed.run(1)
    # the first step sees the same weights and batch: norms agree to the half type's precision, not x2^15
    np.testing.assert_allclose(first[PER_VARIABLE].numpy(), first_ref[PER_VARIABLE].numpy(), rtol=0.05)
    losses_mixed = mixed.run(200)["train/loss"].numpy()
    assert np.all(np.isfinite(losses_mixed))
    assert losses_mixed[-20:].mean() < 0.3 * float(first["train/loss"].numpy()[0])


def _cli_losses(tmp_path, name: str, *args: str) -> np.ndarray:
    import os
    import subprocess
    import sys

    import mlflow

    uri = f"sqlite:///{tmp_path}/{name}.db"
    cmd = [sys.executable, "-m", "trainer", "model=mlp", "data.n_samples=640", "trainer.max_steps=40",
           "trainer.batch_size=32", "tracking.log_model=false", f"tracking.uri={uri}",
           f"hydra.run.dir={tmp_path}/{name}", *args]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    return np.array([m.value for m in history])


@pytest.mark.slow
def test_mirrored_on_two_logical_cpus_matches_one_device_on_the_same_global_batch(tmp_path):
    single = _cli_losses(tmp_path, "single")
    mirrored = _cli_losses(tmp_path, "mirrored", "trainer.strategy=mirrored", "trainer.logical_cpus=2")
    assert len(single) == len(mirrored) == 40
    np.testing.assert_allclose(mirrored, single, rtol=1e-4, atol=1e-6)


def _free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# --- long runs in the MLflow UI: thinned per-variable norms, the charts' index (trainer/store.py) -------------
VARIABLES = ("dense_0/kernel", "dense_0/bias", "dense_1/kernel", "dense_1/bias", "dense_2/kernel", "dense_2/bias")
PER_STEP_KEYS = ("train/loss", "train/lr", "train/grad_norm")


def _mlp_chunk(first: int, k: int) -> Chunk:
    """One compiled call's values as fit.py submits them: loss, lr, global norm, an MLP's 6 per-variable norms."""
    steps = np.arange(first, first + k, dtype=np.float64)
    values = {"train/loss": 1.0 / (1.0 + steps), "train/lr": np.full(k, 1e-3), "train/grad_norm": np.sqrt(steps),
              PER_VARIABLE: np.stack([steps + j for j in range(len(VARIABLES))], axis=1)}  # fmt: skip
    return Chunk(first, values, VARIABLES, t_start=1e6 + first * 1e-3, t_end=1e6 + (first + k) * 1e-3)


def _log_steps(sink: MetricSink, start: int, stop: int, k: int = 37) -> None:
    """Steps [start, stop) in chunks of k (37: not a divisor of the thresholds, so chunks straddle them)."""
    for first in range(start, stop, k):
        sink.submit(_mlp_chunk(first, min(k, stop - first)))


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


def _new_run(uri: str) -> str:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("scale")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("scale")
    return client.create_run(experiment_id).info.run_id


def _sink(uri: str, run_id: str, **kwargs) -> MetricSink:
    return MetricSink(mlflow.MlflowClient(uri), run_id, close_timeout=5.0, **kwargs)


def _index_columns(uri: str, name: str = CHART_INDEX) -> tuple[str, ...]:
    with contextlib.closing(sqlite3.connect(uri.removeprefix("sqlite:///"))) as c:
        return tuple(row[2] for row in c.execute(f"PRAGMA index_info({name})"))


@pytest.mark.parametrize("log_every", [1, 4])
def test_per_variable_norms_are_thinned_past_the_threshold_and_nothing_else(tmp_path, mlflow_template, log_every):
    uri = new_store(tmp_path, mlflow_template)
    run_id = _new_run(uri)
    sink = _sink(uri, run_id, log_every=log_every, per_variable_every=10, per_variable_after=50)
    _log_steps(sink, 0, 130)
    sink.submit(Chunk(130, {"val/loss": np.array([0.5])}, per_step=False))
    sink.close()
    assert sink.error is None and sink.points_lost == 0
    every = list(range(0, 130, log_every))
    for key in PER_STEP_KEYS:
        assert _steps(uri, run_id, key) == every, key
    thinned = [s for s in every if s < 50 or s % 10 == 0]  # log_every=4: 0, 4, ..., 48, 60, 80, 100, 120
    for name in VARIABLES:
        assert _steps(uri, run_id, f"{PER_VARIABLE}{name}") == thinned, name
    assert _steps(uri, run_id, "val/loss") == [130]  # summaries are never thinned


def test_thinned_run_resumed_from_a_checkpoint_logs_each_step_exactly_once(tmp_path, mlflow_template):
    """The rule is a function of the step: a run stopped at 93 with its checkpoint at 60, resumed there,
    holds exactly the points of an uninterrupted run, none twice (lists are compared, not sets)."""
    uri = new_store(tmp_path, mlflow_template)
    whole, broken = _new_run(uri), _new_run(uri)
    thinning = {"per_variable_every": 7, "per_variable_after": 40}
    sink = _sink(uri, whole, **thinning)
    _log_steps(sink, 0, 150)
    sink.close()
    first = _sink(uri, broken, **thinning)
    _log_steps(first, 0, 93)  # points past the checkpoint at 60 were written before the stop
    first.close()
    resumed = _sink(uri, broken, **thinning)
    resumed.writer.delete_after(60)  # what Run.resume_at does
    _log_steps(resumed, 60, 150, k=23)
    resumed.close()
    for key in (*PER_STEP_KEYS, *(f"{PER_VARIABLE}{v}" for v in VARIABLES)):
        assert _steps(uri, broken, key) == _steps(uri, whole, key), key
    assert _steps(uri, whole, f"{PER_VARIABLE}dense_0/bias") == [*range(40), *range(42, 150, 7)]
    assert _steps(uri, whole, "train/loss") == list(range(150))


def test_tracking_keys_reach_the_sink_and_the_store_gets_the_chart_index(tmp_path, mlflow_template):
    defaults = compose_config([]).tracking
    assert (defaults.per_variable_every, defaults.per_variable_after) == (10, 100_000)
    with pytest.raises(TrainerError, match=r"tracking.per_variable_every=0 is invalid"):
        check(compose_config(["tracking.per_variable_every=0"]))
    uri = new_store(tmp_path, mlflow_template)
    assert _index_columns(uri) == MLFLOW_COLUMNS
    cfg = compose_config(["tracking.per_variable_every=3", "tracking.per_variable_after=7", f"tracking.uri={uri}"])
    with Run(cfg) as run:
        assert (run.sink.per_variable_every, run.sink.per_variable_after) == (3, 7)
    assert _index_columns(uri) == CHART_COLUMNS
    old = OmegaConf.create(OmegaConf.to_container(cfg))  # a run.json written before these keys existed
    del old.tracking["per_variable_every"], old.tracking["per_variable_after"]
    with Run(old, run_id=run.run_id) as resumed:
        assert (resumed.sink.per_variable_every, resumed.sink.per_variable_after) == (1, None)  # logs on as it began


def _chart_query(uri: str, run_id: str, key: str) -> tuple[list[tuple[int, float]], list[str]]:
    """What the UI's chart request runs: MLflow's own get_metric_history_bulk_interval with max_results=320
    (as the UI asks), its SQL captured on the store's engine, and SQLite's plan of each statement on metrics."""
    store = mlflow.MlflowClient(uri)._tracking_client.store
    seen: list[tuple[str, tuple]] = []

    def capture(conn, cursor, statement, parameters, context, executemany) -> None:
        if "FROM metrics" in statement:
            seen.append((statement, tuple(parameters)))

    sa.event.listen(store.engine, "before_cursor_execute", capture)
    try:
        points = store.get_metric_history_bulk_interval([run_id], key, 320, None, None)
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", capture)
    with contextlib.closing(sqlite3.connect(uri.removeprefix("sqlite:///"))) as c:
        plans = [" | ".join(row[3] for row in c.execute(f"EXPLAIN QUERY PLAN {s}", p)) for s, p in seen]
    return [(m.step, m.value) for m in points], plans


def test_the_ui_chart_query_reads_the_covering_index_in_order(tmp_path, mlflow_template):
    """Structural, so it holds on any machine: with the widened index SQLite searches it for (run, key) and
    reads it in the charts' order; the sort of all the metric's points and the last-point sort are gone."""
    stock, wide = tmp_path / "stock", tmp_path / "wide"
    for directory in (stock, wide):
        directory.mkdir()
        shutil.copyfile(mlflow_template, directory / "mlflow.db")
    assert index_for_charts(sqlite_uri(wide)) and index_for_charts(sqlite_uri(wide))  # idempotent
    assert not index_for_charts("http://127.0.0.1:1") and not index_for_charts(f"sqlite:///{tmp_path}/none.db")
    results = {}
    for directory in (stock, wide):
        uri = sqlite_uri(directory)
        run_id = _new_run(uri)
        sink = _sink(uri, run_id)
        _log_steps(sink, 0, 1000, k=100)
        sink.close()
        results[directory.name] = _chart_query(uri, run_id, "train/loss")
    (stock_points, stock_plans), (wide_points, (window, last)) = results["stock"], results["wide"]
    assert wide_points == stock_points and len(wide_points) == 320 and wide_points[-1][0] == 999
    search = "SEARCH metrics USING COVERING INDEX index_metrics_run_uuid_key_step (run_uuid=? AND key=?)"
    assert search in window and search in last
    assert "TEMP B-TREE" not in last  # the last point: one index seek, not a sort of every point
    assert window.count("TEMP B-TREE") == stock_plans[0].count("TEMP B-TREE") - 1 == 2  # ntile's sort gone


@pytest.mark.filterwarnings("ignore:Unnamed CHECK constraint")  # alembic on MLflow's own unnamed is_nan check
def test_widened_index_survives_mlflow_migrations(tmp_path, mlflow_template):
    """MLflow's schema check and migrations accept the widened index: a downgrade past the index's migration
    (it drops the index by name), `mlflow db upgrade` back to head, and an alembic rebuild of the table."""
    uri = new_store(tmp_path, mlflow_template)
    assert index_for_charts(uri)
    engine = sa.create_engine(uri)
    config = _get_alembic_config(uri)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "c3d6457b6d8a")  # the revision before MLflow added the index
    assert _index_columns(uri) == ()
    upgrade = subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade", uri], capture_output=True, text=True)
    assert upgrade.returncode == 0, upgrade.stderr[-2000:]
    assert _index_columns(uri) == MLFLOW_COLUMNS
    assert index_for_charts(uri) and _index_columns(uri) == CHART_COLUMNS  # the next run widens it again
    with engine.begin() as connection:  # a migration that rebuilds metrics (as 181f10493468 did) keeps it
        operations = Operations(MigrationContext.configure(connection))
        with operations.batch_alter_table("metrics", recreate="always") as batch:
            batch.alter_column("value", type_=sa.types.Float(precision=53), nullable=False)
    assert _index_columns(uri) == CHART_COLUMNS
    run_id = _new_run(uri)  # MLflow's schema check passes and the store works
    mlflow.MlflowClient(uri).log_metric(run_id, "train/loss", 1.0, step=0)
    assert _steps(uri, run_id, "train/loss") == [0]


class _ChartServer:
    """A real `mlflow server` (one worker) over a SQLite store; `chart` sends the UI's request for one chart."""

    def __init__(self, uri: str, log: Path):
        self.base = f"http://127.0.0.1:{_free_ports(1)[0]}"
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", self.base.rsplit(":", 1)[1], "--workers", "1"]  # fmt: skip
        # MLflow's job runner (7 huey consumers, each importing MLflow) takes ~20 s of CPU in the first ~10 s after
        # /health answers: timings taken then measured it, not the charts. It serves no chart.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not start")

    def chart(self, run_id: str, key: str) -> tuple[float, list[int]]:
        """GET get-history-bulk-interval as MLflow 3.17's charts (its sampled-history hook) send it."""
        query = urllib.parse.urlencode({"run_ids": run_id, "metric_key": key, "max_results": 320})
        url = f"{self.base}/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval?{query}"
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=300) as response:
            body = json.load(response)
        return time.perf_counter() - started, [m.get("step", 0) for m in body["metrics"]]

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


# A 1M-step MLP run (9M points, 2.76 GB) took 2.7 s of server CPU per chart with MLflow's index and 2.1 s
# widened (~2 us a point of SQLite window functions). This run is 1/5 of that: its charts took 0.43 s (loss)
# and 0.24 s (a per-variable norm) here, with other jobs running; the bound is ~10x that.
LONG_RUN_STEPS, CHART_SECONDS = 200_000, 4.0


@pytest.mark.slow
def test_a_long_runs_charts_answer_quickly_through_a_real_mlflow_server(tmp_path, mlflow_template):
    """A 200k-step MLP run logged as the trainer logs it (Run: default thinning, the store's index), then the
    UI's chart requests through `mlflow server`: 320 points spanning the run, fast, per-variable ones thinned."""
    uri = new_store(tmp_path, mlflow_template)
    with Run(compose_config([f"tracking.uri={uri}"])) as run:
        run.sink.max_pending_points = 10**8  # this writes faster than any training loop: keep every point
        _log_steps(run.sink, 0, LONG_RUN_STEPS, k=1000)
    assert run.sink.points_lost == 0 and _index_columns(uri) == CHART_COLUMNS
    assert len(_steps(uri, run.run_id, f"{PER_VARIABLE}dense_1/kernel")) == 100_000 + 10_000
    server = _ChartServer(uri, tmp_path / "server.log")
    try:
        server.wait()
        for key, every in (("train/loss", 1), (f"{PER_VARIABLE}dense_1/kernel", 10)):
            timings = []
            for _ in range(3):
                seconds, steps = server.chart(run.run_id, key)
                timings.append(seconds)
            assert len(steps) == 320 and (steps[0], steps[-1]) == (0, LONG_RUN_STEPS - every), key
            assert all(s < 100_000 or s % every == 0 for s in steps), key
            assert statistics.median(timings) < CHART_SECONDS, (key, timings)
    finally:
        server.stop()


@pytest.mark.slow
def test_mirrored_streams_give_each_replica_its_share_of_the_same_global_batch(tmp_path):
    """Streamed data under MirroredStrategy: distribute_datasets_from_function hands each of the 2 replicas 16 of
    the 32 examples one device takes (shuffle off), so the per-step losses agree with a single device's."""
    streamed = ["data.in_memory=false", "data.shuffle=false"]
    single = _cli_losses(tmp_path, "single_stream", *streamed)
    mirrored = _cli_losses(
        tmp_path, "mirrored_stream", *streamed, "trainer.strategy=mirrored", "trainer.logical_cpus=2"
    )
    assert len(single) == len(mirrored) == 40
    np.testing.assert_allclose(mirrored, single, rtol=1e-4, atol=1e-6)
