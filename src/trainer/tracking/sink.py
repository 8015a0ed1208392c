"""The metric sink: per-step values from the training thread to the store, off the training thread.

The training thread only hands each chunk's device tensors to `MetricSink.submit`; a collector thread turns
them into numbers and series, and a writer thread writes them in batches (writers.py), and with
tracking.tensorboard each batch the store took to TensorBoard event files too (tensorboard.py). The queue between
them is bounded: if the store falls behind, the loop waits (back-pressure) instead of memory growing without
limit; if the store is away, writes are retried with backoff. Whatever has been submitted is written before
the run is closed, on success, error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from trainer.config import causes, first_line

if TYPE_CHECKING:  # MLflow is imported when a sink starts, not with Chunk or disk_full
    from mlflow.tracking import MlflowClient

    from trainer.tracking.curves import CurveRecorder, WindowExtremes
    from trainer.tracking.tensorboard import TensorBoardWriter
    from trainer.tracking.writers import Series


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


Pending = tuple[list["Series"], int, int | None]  # series, their point count, the newest barrier among them


def disk_full(error: BaseException | None) -> bool:
    """A full disk or quota, whichever layer saw it (SQLite, the OS, TensorFlow's file writer)."""
    for e in causes(error):
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(e) for words in ("database or disk is full", "No space left on device", "Disk quota")):
            return True
    return False


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
    # chunk was ~8% of a core beside a fast loop. The stream bench's run (20,000 steps, 9 points each, ~6 s):
    # the writer thread's CPU 1.18 s at 0.25 s, 0.99 s at 0.5 s with 100-row inserts (medians of 3), ~1.0 s at
    # 1 s. Short, because what is pending when training ends is written after it (at 1 s that flush was ~0.25 s
    # of a 6 s run). The UI sees points this much later.
    linger_seconds: float = 0.5
    max_pending_points: int = 2_000_000  # ~100 MB of points held while the store is away
    stall_seconds: float = 10.0  # a write in flight this long counts as the store being away
    max_backoff: float = 30.0
    close_timeout: float = 60.0  # at the end: how long to keep retrying a store that is away
    on_durable: Callable[[int], None] | None = None  # called with a barrier's step once it is durable
    recorder: CurveRecorder | None = None  # every step's loss, grad norm and lr, for the end-of-run plot (curves.py)
    windows: WindowExtremes | None = None  # tracking.window_extremes: each N-step window's min and max (curves.py)
    tensorboard: TensorBoardWriter | None = None  # tracking.tensorboard: each batch the store took, as event files too
    latest: dict[str, float] = field(default_factory=dict)  # last value of each metric (the progress bar)
    points_written: int = 0
    points_lost: int = 0
    error: BaseException | None = None
    tensorboard_error: BaseException | None = None  # why the event files stopped (the store's points are whole)

    def __post_init__(self) -> None:
        from trainer.tracking.writers import writer_for

        self.writer = writer_for(self.client, self.run_id, self.bulk)
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
        if self.tensorboard is not None:
            self._to_tensorboard(self.tensorboard.close)

    def _store_ok(self) -> bool:
        stalled = self._call_started is not None and time.monotonic() - self._call_started > self.stall_seconds
        return self._healthy and not stalled

    def _collect(self) -> None:
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
            if batch and self.tensorboard is not None:  # what the store took, once: a retried batch is written
                self._to_tensorboard(self.tensorboard.write, batch)  # here only after it succeeds
            self._durable(barrier)

    def _to_tensorboard(self, call: Callable[..., None], *args: Any) -> None:
        """`call` of the event files' writer; a failure (a full disk) ends the event files, never the run: the
        store holds every point, and the warning says where the files stop."""
        try:
            call(*args)
        except Exception as e:
            self.tensorboard_error, writer, self.tensorboard = e, self.tensorboard, None
            with contextlib.suppress(Exception):
                writer.close()
            logging.getLogger(__name__).warning(
                "the TensorBoard event files in %s end here, at %d metric points written: %s",
                writer.directory, self.points_written, first_line(e),
            )  # fmt: skip

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
        out = self._curves(steps, arrays, stamps) if chunk.per_step else []
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

    def _curves(self, steps: np.ndarray, arrays: dict[str, np.ndarray], stamps: np.ndarray) -> list[Series]:
        """Training steps to the curve recorder and the window extremes (this thread, not the training one);
        returns the series of the windows this chunk completed (measured: 4 ms of this thread per 100k steps in
        1000-step chunks, 31 ms in 100-step ones)."""
        if self.recorder is not None:
            self.recorder.add(steps, arrays)
        if self.windows is None:
            return []
        return [(key, at, values, stamps[at - steps[0]]) for key, at, values in self.windows.add(steps, arrays)]

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
