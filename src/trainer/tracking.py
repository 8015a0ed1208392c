"""MLflow: the run's lifecycle, its params and artifacts, and the per-step metric sink.

The training thread only hands each chunk's device tensors to `MetricSink.submit`; a writer thread turns
them into numbers and MLflow points and writes them in batches. The queue between the two is bounded:
if the store falls behind, the loop waits (back-pressure) instead of memory growing without limit.
Whatever has been submitted is written before the run is closed, on success, error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from trainer import lifecycle
from trainer.config import TrainerError, causes, first_line
from trainer.lifecycle import retry_busy
from trainer.store import index_for_charts


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"optimizer.lr": "0.001", ...}: MLflow params, one per leaf."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


@dataclass
class Chunk:
    """Per-step values of one compiled call: `first_step` is the global step of row 0."""

    first_step: int
    values: dict[str, Any]  # metric name -> [k] tensor (device) or array; or name prefix -> [k, n]
    names: Sequence[str] = ()  # column names of the 2-D values, appended to their prefix
    t_start: float = 0.0
    t_end: float = 0.0
    per_step: bool = True  # training steps, thinned by log_every; False: evaluations and summaries, all kept
    barrier: int | None = None  # a checkpoint's step, no values: reported durable once all before it is written


Series = tuple[str, np.ndarray, np.ndarray, np.ndarray]  # metric key, steps, values, timestamps (ms)
Pending = tuple[list[Series], int, int | None]  # series, their point count, the newest barrier among them


class LogBatchWriter:
    """Any tracking store (HTTP servers included) through MLflow's public `log_batch`."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def write(self, series: list[Series]) -> None:
        metrics = [
            Metric(key, float(v), int(t), int(s))
            for key, steps, values, stamps in series
            for s, v, t in zip(steps.tolist(), values.tolist(), stamps.tolist(), strict=True)
        ]
        self.client.log_batch(self.run_id, metrics=metrics)  # the client splits it into <= 1000-point calls


class SqlBulkWriter:
    """SQL-backed stores: one Core `INSERT ... executemany` of MLflow's own metric rows per batch.

    `log_batch` builds and validates an ORM object per point (~90 us each), four times too slow for
    every step of a fast loop. This writes the same rows through the store's own engine and session,
    and lets the store update its latest-metric table with its own code, so everything reading the
    run through the public API (the UI, `get_metric_history`, `search_runs`) sees what `log_batch`
    would have written. Checked against the pinned MLflow by tests/test_tracking.py.
    """

    def __init__(self, store, run_id: str, store_uri: str):
        self.store, self.run_id, self.store_uri = store, run_id, store_uri

    @classmethod
    def for_client(cls, client: MlflowClient, run_id: str) -> SqlBulkWriter | None:
        try:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        except ImportError:
            return None
        store = client._tracking_client.store
        return cls(store, run_id, client.tracking_uri) if isinstance(store, SqlAlchemyStore) else None

    def write(self, series: list[Series]) -> None:
        from sqlalchemy.exc import IntegrityError

        try:
            self._insert(series)
        except IntegrityError:  # a point already stored (a retried batch): MLflow's own path skips those
            LogBatchWriter(MlflowClient(self.store_uri), self.run_id).write(series)

    def _insert(self, series: list[Series]) -> None:
        from mlflow.store.tracking.dbmodels.models import SqlMetric

        columns, latest = [], []  # columns: (key, value, timestamp, step, is_nan) per point
        for key, steps, values, stamps in series:
            is_nan = np.isnan(values)
            clean = np.where(is_nan, 0.0, np.clip(values, -_FLOAT_MAX, _FLOAT_MAX))  # as MLflow stores them
            keys = [key] * len(steps)
            columns += zip(keys, clean.tolist(), stamps.tolist(), steps.tolist(), is_nan.tolist(), strict=True)
            last = int(np.argmax(steps))
            latest.append(
                SqlMetric(run_uuid=self.run_id, key=key, step=int(steps[last]), value=float(clean[last]),
                          timestamp=int(stamps[last]), is_nan=bool(is_nan[last]))
            )  # fmt: skip
        if not columns:
            return
        with self.store.ManagedSessionMaker(read_only=False) as session:
            self.store._check_run_is_active(self.store._get_run(run_uuid=self.run_id, session=session))
            self._execute_many(session, columns)
            self.store._update_latest_metrics_if_necessary(latest, session)

    def _execute_many(self, session, columns: list[tuple]) -> None:
        """SQLite: the driver's own executemany on the session's connection (same transaction), about 1 us a
        row; other databases: a SQLAlchemy Core insert of the same rows."""
        from mlflow.store.tracking.dbmodels.models import SqlMetric
        from sqlalchemy import insert

        connection = session.connection()
        if connection.dialect.name == "sqlite":
            rows = [(*c, self.run_id) for c in columns]
            cursor = connection.connection.dbapi_connection.cursor()
            cursor.executemany(
                "INSERT INTO metrics (key, value, timestamp, step, is_nan, run_uuid) VALUES (?, ?, ?, ?, ?, ?)", rows
            )
            cursor.close()
            return
        names = ("key", "value", "timestamp", "step", "is_nan")
        connection.execute(insert(SqlMetric.__table__), [{**dict(zip(names, c, strict=True)), "run_uuid": self.run_id}
                                                          for c in columns])  # fmt: skip

    def delete_after(self, step: int, finished: bool = False) -> None:
        """Remove what the resumed run redoes: train/* points at steps >= `step`, others past it, and the
        end-of-run summary at `step` (perf/*, early_stopping/*; val/* too when the run had `finished` there,
        since evaluations during training never fall on the last step)."""
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
        from sqlalchemy import and_, delete, or_

        summary = [SqlMetric.key.like(f"{prefix}%") for prefix in SUMMARY_PREFIXES + (("val/",) if finished else ())]
        redone = or_(
            and_(SqlMetric.key.like("train/%"), SqlMetric.step >= step),
            SqlMetric.step > step,
            and_(SqlMetric.step == step, or_(*summary)),
        )
        with self.store.ManagedSessionMaker(read_only=False) as session:
            session.execute(delete(SqlMetric).where(SqlMetric.run_uuid == self.run_id, redone))
            stale = and_(SqlLatestMetric.run_uuid == self.run_id, SqlLatestMetric.step >= step)
            session.execute(delete(SqlLatestMetric).where(stale))  # rewritten by the next points

    def stored_through(self, log_every: int) -> int:
        """The step after the newest train/loss point (plus the steps log_every leaves unlogged): no record of
        durability can honestly go past it."""
        from mlflow.store.tracking.dbmodels.models import SqlMetric
        from sqlalchemy import func, select

        with self.store.ManagedSessionMaker() as session:
            newest = session.execute(
                select(func.max(SqlMetric.step)).where(SqlMetric.run_uuid == self.run_id, SqlMetric.key == "train/loss")
            ).scalar()
        return 0 if newest is None else int(newest) + log_every


SUMMARY_PREFIXES = ("perf/", "early_stopping/")  # metrics only the end of a run logs (fit._finish)
_FLOAT_MAX = 1.7976931348623157e308


def stored_through(uri: str, run_id: str, log_every: int) -> int | None:
    """What the store at `uri` holds of run `run_id`'s train/loss (see SqlBulkWriter.stored_through); None
    for stores that cannot say cheaply (HTTP, files)."""
    client = MlflowClient(uri)
    writer = SqlBulkWriter.for_client(client, run_id)
    return retry_busy(writer.stored_through, log_every) if writer else None


def disk_full(error: BaseException | None) -> bool:
    """A full disk or quota, whichever layer saw it (SQLite, the OS, TensorFlow's file writer)."""
    for e in causes(error):
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(e) for words in ("database or disk is full", "No space left on device", "Disk quota")):
            return True
    return False


def _yield_cpu() -> None:
    """Run this sink thread at the lowest CPU priority (Linux: per thread), so training keeps the cores and
    the sink uses what they leave; it catches up at the end or when the pending bound pushes back."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


@dataclass
class MetricSink:
    """Writes metric points to one run from background threads, in batches, never blocking on a dead store.

    A collector thread turns each submitted chunk into numbers (the one device-to-host copy) and appends it
    to a pending buffer; a writer thread writes what is pending, up to `batch_points` at a time, once that
    many are waiting or `linger_seconds` have passed, so the store gets few, large transactions. While the
    store keeps up or is merely slow, a full buffer makes the training thread wait (back-pressure: no point
    is ever dropped). When writes fail (a server gone away, SQLite locked by parallel jobs), the writer
    retries with exponential backoff and training goes on; past `max_pending_points` the oldest points are
    dropped and counted in `points_lost`, which the run reports at its end. Nothing is dropped silently.

    Barriers (`barrier(step)`, sent after each checkpoint) travel through the same FIFO; once everything
    submitted before one is committed, `on_durable(step)` is called from the writer thread, so the
    checkpoint at that step becomes one a resume may start from. After any point is lost no later barrier
    is reported: a resume then goes back to before the hole and redoes the steps.
    """

    client: MlflowClient
    run_id: str
    log_every: int = 1
    max_chunks: int = 64
    per_variable_every: int = 1  # the per-variable columns (2-D values) at steps >= per_variable_after: every n-th
    per_variable_after: int | None = None
    bulk: bool = True  # use the SQL bulk path when the store is SQL-backed
    batch_points: int = 50_000
    # Wait this long for more points before writing fewer than batch_points: a transaction costs ~6 ms of
    # CPU on SQLite (commit, run check, latest-metric upkeep) whatever its size, so a transaction per
    # chunk was ~8% of a core beside a fast loop. Short, because what is pending when training ends is
    # written after it (at 1 s that flush was ~0.25 s of a 6 s run). The UI sees points this much later.
    linger_seconds: float = 0.25
    max_pending_points: int = 2_000_000  # ~100 MB of points held while the store is away
    stall_seconds: float = 10.0  # a write in flight this long counts as the store being away
    max_backoff: float = 30.0
    close_timeout: float = 60.0  # at the end: how long to keep retrying a store that is away
    on_durable: Callable[[int], None] | None = None  # called with a barrier's step once it is durable
    latest: dict[str, float] = field(default_factory=dict)  # last value of each metric (the progress bar)
    points_written: int = 0
    points_lost: int = 0
    error: BaseException | None = None

    def __post_init__(self) -> None:
        sql = SqlBulkWriter.for_client(self.client, self.run_id) if self.bulk else None
        self.writer = sql or LogBatchWriter(self.client, self.run_id)
        self._queue: queue.Queue[Chunk | None] = queue.Queue(maxsize=self.max_chunks)
        self._cond = threading.Condition()
        self._pending: deque[Pending] = deque()
        self._pending_points = 0
        self._healthy, self._call_started, self._deadline = True, None, None
        self._threads = [
            threading.Thread(target=self._collect, name="metric-sink-collect", daemon=True),
            threading.Thread(target=self._write_loop, name="metric-sink-write", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, chunk: Chunk) -> None:
        self._queue.put(chunk)  # blocks only when the collector is max_chunks behind

    def barrier(self, step: int) -> None:
        """After a checkpoint at `step`: report it durable once every point submitted before is written."""
        self._queue.put(Chunk(step, {}, barrier=step))

    def close(self) -> None:
        """Write everything submitted so far (retrying an absent store up to close_timeout), then stop."""
        self._queue.put(None)
        self._threads[0].join()
        with self._cond:
            self._deadline = time.monotonic() + self.close_timeout
            self._cond.notify_all()
        self._threads[1].join()

    def _store_ok(self) -> bool:
        stalled = self._call_started is not None and time.monotonic() - self._call_started > self.stall_seconds
        return self._healthy and not stalled

    def _collect(self) -> None:
        _yield_cpu()
        while (chunk := self._queue.get()) is not None:
            series = [] if chunk.barrier is not None else self._series(chunk)
            n = sum(len(s[1]) for s in series)
            if n == 0 and chunk.barrier is None:  # log_every kept no step of this chunk
                continue
            with self._cond:
                while self._pending and self._pending_points + n > self.max_pending_points and self._store_ok():
                    self._cond.wait(0.5)  # back-pressure: the store is alive, training waits for it
                self._pending.append((series, n, chunk.barrier))
                self._pending_points += n
                while self._pending_points > self.max_pending_points and not self._store_ok():  # away: oldest go
                    _, dropped, _ = self._pending.popleft()
                    self._pending_points -= dropped
                    self.points_lost += dropped
                self._cond.notify_all()

    def _write_loop(self) -> None:
        _yield_cpu()
        backoff = 0.0
        while True:
            with self._cond:
                while not self._pending and self._deadline is None:
                    self._cond.wait()
                self._cond.wait_for(self._batch_ready, timeout=self.linger_seconds)
                if not self._pending:
                    return
                batch, n, barrier = self._take()
                self._call_started = time.monotonic()
            try:
                if batch:
                    self.writer.write(batch)
            except Exception as e:
                backoff = min(max(2 * backoff, 0.05), self.max_backoff)
                if self._failed(e, (batch, n, barrier), backoff):
                    return
                continue
            backoff = 0.0
            with self._cond:
                self._healthy, self._call_started = True, None
                self.points_written += n
                self._cond.notify_all()
            self._durable(barrier)

    def _durable(self, barrier: int | None) -> None:
        if barrier is None or self.on_durable is None or self.points_lost:
            return
        try:
            self.on_durable(barrier)
        except OSError as e:  # a full disk: the marker stays where it was, which is safe (a resume redoes more)
            self.error = e

    def _batch_ready(self) -> bool:
        return self._pending_points >= self.batch_points or self._deadline is not None

    def _take(self) -> Pending:
        batch, n, barrier = [], 0, None
        while self._pending and n < self.batch_points:
            series, m, b = self._pending.popleft()
            batch, n, barrier = batch + series, n + m, b if b is not None else barrier
        self._pending_points -= n
        return batch, n, barrier

    def _failed(self, error: Exception, pending: Pending, backoff: float) -> bool:
        """Put the batch back, wait `backoff`; True when closing and out of time (what is left is lost).

        A full disk is not waited for at the end: space does not come back within the minute."""
        with self._cond:
            self.error, self._healthy, self._call_started = error, False, None
            self._pending.appendleft(pending)
            self._pending_points += pending[1]
            self._cond.notify_all()
            closing = self._deadline is not None
            if closing and (time.monotonic() + backoff > self._deadline or disk_full(error)):
                self.points_lost += self._pending_points
                self._pending.clear()
                self._pending_points = 0
                return True
            self._cond.wait(backoff)
        return False

    def _series(self, chunk: Chunk) -> list[Series]:
        arrays = {k: np.atleast_1d(np.asarray(v)) for k, v in chunk.values.items()}  # the device->host copy
        k = len(next(iter(arrays.values())))
        steps = chunk.first_step + np.arange(k)
        stamps = np.linspace(chunk.t_start, chunk.t_end, k) * 1000 if k > 1 else np.array([chunk.t_end * 1000])
        stamps = stamps.astype(np.int64)
        every = self._kept(steps, chunk.per_step)
        per_variable = every & self._per_variable_kept(steps) if chunk.per_step else every
        out = []
        for name, values in arrays.items():
            if values.ndim == 2:
                columns, keep = [(f"{name}{col}", values[:, j]) for j, col in enumerate(chunk.names)], per_variable
            else:
                columns, keep = [(name, values)], every
            for key, series in columns:
                self.latest[key] = float(series[-1])
                if keep.any():
                    out.append((key, steps[keep], series[keep].astype(np.float64), stamps[keep]))
        return out

    def _kept(self, steps: np.ndarray, per_step: bool) -> np.ndarray:
        """Which steps are logged: every log_every-th training step; every evaluation and summary."""
        return steps % self.log_every == 0 if per_step else np.ones(len(steps), dtype=bool)

    def _per_variable_kept(self, steps: np.ndarray) -> np.ndarray:
        """Per-variable norms: every step before `per_variable_after`, then every `per_variable_every`-th.

        A function of the step alone, so a resumed run logs exactly the steps an uninterrupted one does. Only
        these are thinned: on an MLP they are 6 of the 9 points a step, and what a chart of them must show is
        a layer's trend (1M steps at 1 in 10 past 100k leave 190k points, ~600 per point the UI draws), while
        the loss, the learning rate and the global norm stay exact at every step.
        """
        if self.per_variable_after is None or self.per_variable_every == 1:
            return np.ones(len(steps), dtype=bool)
        return (steps < self.per_variable_after) | (steps % self.per_variable_every == 0)


class Run:
    """One MLflow run: params and artifacts at the start, metrics through a sink, status at the end.

    Used as a context manager so the status is right however training ends: FINISHED, FAILED (with the
    error in the `error` tag) or KILLED on Ctrl-C, and the sink is flushed before the status is set.
    """

    def __init__(
        self,
        cfg: DictConfig,
        overrides: Sequence[str] = (),
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
    ):
        self.cfg, self.overrides = cfg, list(overrides)
        self.tags = {**lifecycle.process_tags(), **(tags or {})}  # who trains it: a kill is found out later
        self.sink: MetricSink | None = None
        self.run_id, self.resumed = run_id or "", run_id is not None
        self.lost_before = 0  # metric points a resumed run had already lost (tag metric_points_lost)
        self.previous_error = ""

    def __enter__(self) -> Run:
        t = self.cfg.tracking
        if t.uri:
            mlflow.set_tracking_uri(t.uri)
        self.uri = mlflow.get_tracking_uri()
        probe(self.uri)  # before MLflow's own client, which retries a dead server for minutes
        try:
            lifecycle.prepare_store(self.uri, lifecycle.use_wal, index_for_charts)  # WAL: readers never block
            # writes; the index: the MLflow UI's charts of long runs (trainer/store.py)
        except Exception as e:
            raise TrainerError(_open_error(self.uri, t.experiment, e)) from e
        if self.resumed:
            self._claim()
        try:
            if self.resumed:  # the same run goes on: params and artifacts are already there
                run = retry_busy(mlflow.start_run, run_id=self.run_id, tags=self.tags)
            else:
                retry_busy(mlflow.set_experiment, t.experiment)
                tags = {"overrides": " ".join(self.overrides), **self.tags}
                run = retry_busy(mlflow.start_run, run_name=self._name(), tags=tags)
        except Exception as e:
            raise TrainerError(_open_error(self.uri, t.experiment, e)) from e
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self.client = MlflowClient(self.uri)
        if self.resumed:
            self._forget_failure()
        with contextlib.suppress(Exception):  # housekeeping: never a reason not to train
            lifecycle.reap_dead_runs(self.client, skip=self.run_id)
        if not self.resumed:
            retry_busy(mlflow.log_params, flatten(OmegaConf.to_container(self.cfg, resolve=True)))
            retry_busy(mlflow.log_text, OmegaConf.to_yaml(self.cfg, resolve=True), "config.yaml")
            retry_busy(mlflow.log_text, OmegaConf.to_yaml(OmegaConf.create(self.overrides)), "overrides.yaml")
        thinning = {k: t.get(k) for k in ("per_variable_every", "per_variable_after") if t.get(k) is not None}
        self.sink = MetricSink(self.client, self.run_id, t.log_every, t.queue_chunks, **thinning)  # absent: a
        # run resumed from a config written before these keys logs on as it began, every step
        return self

    def _claim(self) -> None:
        """A resume takes over a run only if no live process trains it; one that died is closed first."""
        client = MlflowClient(self.uri)
        try:
            info = retry_busy(client.get_run, self.run_id)
        except Exception as e:
            raise TrainerError(f"resume: run {self.run_id} is not in {self.uri} ({first_line(e)})") from e
        tags = info.data.tags
        if info.info.status == "RUNNING":
            alive = lifecycle.owner_alive(tags)
            if alive:
                raise TrainerError(f"resume: run {self.run_id} is still being trained by process "
                                   f"{tags.get(lifecycle.PID_TAG)} on this host; stop it first")  # fmt: skip
            if alive is False:
                lifecycle.mark_died(client, self.run_id, tags)
                lifecycle.say(f"resume: the process that trained run {self.run_id} had died; it goes on from here")
                tags = retry_busy(client.get_run, self.run_id).data.tags
        self.lost_before = int(tags.get("metric_points_lost", "0") or 0)
        self.previous_error = tags.get("error", "")

    def _forget_failure(self) -> None:
        """The resumed run is alive again: its last failure moves to tag `previous_error`."""
        if not self.previous_error:
            return
        retry_busy(self.client.set_tag, self.run_id, "previous_error", self.previous_error)
        for key in ("error", lifecycle.DIED_TAG):
            with contextlib.suppress(Exception):  # absent tags raise
                self.client.delete_tag(self.run_id, key)

    def __exit__(self, exc_type, exc, tb) -> None:
        lost = 0
        if self.sink is not None:
            self.sink.close()
            lost = self._report_delivery()
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            status = RunStatus.KILLED
        elif exc_type is None and not lost:
            status = RunStatus.FINISHED
        else:  # an error, or points the store never took: a run with a hole in its history is not finished
            status = RunStatus.FAILED
            with contextlib.suppress(Exception):
                retry_busy(mlflow.set_tag, "error", (first_line(exc) if exc else self._lost_message(lost))[:5000])
        name = RunStatus.to_string(status)
        try:
            retry_busy(self.client.set_terminated, self.run_id, name)
        except Exception as e:  # the store is away or full: the next trainer run closes it (trainer.died)
            logging.getLogger(__name__).warning("could not mark run %s %s: %s", self.run_id, name, first_line(e))
        with contextlib.suppress(Exception):
            mlflow.end_run(name)  # leaves the fluent API's stack (it pops before it writes)
        if exc_type is None and lost:
            raise TrainerError(self._lost_message(lost))

    def _lost_message(self, lost: int) -> str:
        return (f"{lost} metric points could not be written to {self.uri} ({first_line(self.sink.error)}); "
                "the run is marked FAILED; once the store works again, resume it: the steps are redone from the "
                "last checkpoint whose history is complete")  # fmt: skip

    def _report_delivery(self) -> int:
        """Never silent: points the store did not take are counted on the console and, if possible, a tag
        (added to what an earlier attempt of a resumed run lost, never overwriting it)."""
        lost = self.sink.points_lost
        if not lost:
            return 0
        logging.getLogger(__name__).warning(
            "%d metric points could not be delivered to %s (last error: %s)", lost, self.uri,
            first_line(self.sink.error),
        )  # fmt: skip
        with contextlib.suppress(Exception):  # the store may be the thing that is away
            mlflow.set_tag("metric_points_lost", str(self.lost_before + lost))
        return lost

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """A handful of values at one step (validation, summaries): through the sink, so in step order."""
        now = time.time()
        self.sink.submit(Chunk(step, dict(metrics), t_start=now, t_end=now, per_step=False))

    def _name(self) -> str:
        """The configured name; else the overrides, which tell a sweep's runs apart in the UI's lists.

        (MLflow's own random names would all be the same here: set_random_seed seeds Python's `random`.)
        """
        ignore = ("tracking.", "hydra.", "resume=")
        shown = [o for o in self.overrides if not o.startswith(ignore)]
        return self.cfg.tracking.run_name or " ".join(shown)[:250] or time.strftime("run-%Y%m%d-%H%M%S")

    def resume_at(self, step: int, finished: bool = False) -> None:
        """Drop points logged past the checkpoint (a crash after it leaves some), so no step appears twice;
        `finished`: the checkpoint is the run's last step, whose summary is written again."""
        self.set_tag("resumed_at_step", str(step))
        if isinstance(self.sink.writer, SqlBulkWriter):
            retry_busy(self.sink.writer.delete_after, step, finished)
        else:
            logging.getLogger(__name__).warning(
                "resume: %s cannot delete metric points; steps after %d logged before the stop may appear twice",
                self.uri, step,
            )  # fmt: skip

    def set_tag(self, key: str, value: str) -> None:
        retry_busy(mlflow.set_tag, key, value)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        retry_busy(mlflow.log_artifact, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        retry_busy(mlflow.log_text, text, name)

    @property
    def where(self) -> str:
        """A line telling the user where to look at this run."""
        if self.uri.startswith("http"):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"run {self.run_id} in {self.uri} (view: mlflow ui --backend-store-uri {self.uri})"


PROBE_TIMEOUT_S = 3.0  # one request, no retries: a server that is there answers /health in milliseconds


def probe(uri: str) -> None:
    """An http(s) tracking URI: fail in seconds, naming it, when no server answers there.

    MLflow's client retries a refused connection with backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7 by
    default): `tracking.uri=http://127.0.0.1:1` took 257 s before its error. One request through MLflow's
    own HTTP layer (so its TLS and auth settings apply), without retries; any HTTP answer, even an error
    status, means a server is there and MLflow's own calls take over from here.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0, timeout=PROBE_TIMEOUT_S,
                     raise_on_status=False)  # fmt: skip
    except Exception as e:
        chain = [e]
        while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 10:
            chain.append(nxt)
        if not any(isinstance(x, requests.exceptions.RequestException) for x in chain):
            return  # not the network (e.g. a credentials setting): MLflow's own call says what it is
        raise TrainerError(f"tracking.uri={uri!r}: no MLflow server answers ({_network_reason(e)})") from e


def _network_reason(error: BaseException) -> str:
    """`[Errno 111] Connection refused` deep in urllib3's wording -> `Connection refused`."""
    import re

    text = str(error)
    if found := re.search(r"\[Errno -?\d+\] ([^'\")]+)", text):
        return found.group(1).strip()
    if "timed out" in text.lower():
        return f"no answer within {PROBE_TIMEOUT_S:g} s"
    return first_line(error)[:300]


def _open_error(uri: str, experiment: str, error: BaseException) -> str:
    """Opening the run failed: blame the experiment when it is the deleted one, else the store."""
    from mlflow.entities import LifecycleStage

    with contextlib.suppress(Exception):
        found = MlflowClient(uri).get_experiment_by_name(experiment)
        if found is not None and found.lifecycle_stage == LifecycleStage.DELETED:
            return (f"tracking.experiment={experiment!r} is deleted in {uri}: restore it with "
                    f"`MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {found.experiment_id}` "
                    "or choose another tracking.experiment")  # fmt: skip
    return f"tracking.uri={uri!r}: cannot open the MLflow store ({first_line(error)})"


class QuietRun:
    """Stands in for `Run` on a worker that is not the chief: it trains in step with the others and
    logs nothing, so one MLflow run holds the metrics of a multi-worker job (the chief's)."""

    run_id, uri, where = "", "", "not logged here: this worker is not the chief"

    def __init__(self) -> None:
        self.sink = _NoSink()

    def __enter__(self) -> QuietRun:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def log(self, *args, **kwargs) -> None: ...

    def set_tag(self, *args, **kwargs) -> None: ...

    def resume_at(self, *args, **kwargs) -> None: ...

    def log_artifact(self, *args, **kwargs) -> None: ...

    def log_text(self, *args, **kwargs) -> None: ...


class _NoSink:
    latest: dict[str, float] = {}

    def submit(self, chunk: Chunk) -> None: ...

    def barrier(self, step: int) -> None: ...
