"""TensorBoard event files of a run's metrics (`tracking.tensorboard=true`), written by the metric sink's writer thread.

What they hold: each batch of series that the sink's writer thread has just written to the store (sink.py), right
after the store took it, so the event files hold the points of the run's MLflow history, at the same steps, with the
same timestamps: train/loss, train/lr and train/grad_norm at every step `tracking.log_every` keeps; the per-variable
norms (train/grad_norm_by_var/...) where the store gets them (`tracking.log_grad_norms`, `per_variable_every`);
train/skipped_steps; val/*, perf/*, early_stopping/* and the window extremes. Not in them: system/* (MLflow's own
sampler thread), the last, partial window of `tracking.window_extremes` (logged as the run closes, after the sink),
and points the store never took (then lost, and counted, for both).

How: one `Event` record a point (a scalar as `simple_value`, the float32 the step computed), appended through
`tf.io.TFRecordWriter` to `events.out.tfevents.<time>.<host>.<pid>.<n>.v2`, the file name and layout
`tf.summary.create_file_writer` uses, flushed after each batch (a TensorBoard that is open shows the run as it
trains) and closed with the sink. A resumed run appends a new file to the same directory, which TensorBoard reads
after the earlier ones (the names sort by time), led by a SessionLog START record at the resumed step: on reading one,
TensorBoard's event accumulator drops every point it read before at or after that step, as the store drops what the
resume runs again (SqlBulkWriter.delete_after); the points the store keeps at that very step (an evaluation there)
follow the START record again, so the files still hold the store's history.

Why not `tf.summary.scalar`: it is TensorBoard's own code (without the `tensorboard` package it raises), and the
op under it, `tf.summary.write`, costs a TensorFlow op call a point. Measured on these 2 shared cores, 50,000 points of
one tag: eagerly 200 us a point; as one tf.function looping over a series 9 us, and a tf.function's kernels run on
TensorFlow's inter-op threads, at the training's own priority, not on the sink's deprioritised thread; one
protobuf Event reused (its step, time and value set in place) and serialised, then `TFRecordWriter.write`, 1.3 us,
all on the sink's thread. The files are in the format `tf.summary` writes (`tf.compat.v1.train.summary_iterator` reads
them), each scalar in the `simple_value` form, which TensorBoard's Scalars tab shows as it shows its own.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from pathlib import Path

import tensorflow as tf

from trainer.tracking.writers import Series

FILE_VERSION = "brain.Event:2"  # what tf.summary's writers put first: TensorBoard then honours SessionLog START
_FILE_NUMBERS = itertools.count()  # one process may open several (a sweep's jobs, a run after the LR finder)


class TensorBoardWriter:
    """One run's event file in `directory`. `write` is called by the sink's writer thread; `restart` by the
    training thread before any point is submitted (Run.resume_at); `close` once the writer thread has ended."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{next(_FILE_NUMBERS)}.v2"
        self.path = directory / name
        self._file = tf.io.TFRecordWriter(str(self.path))
        self._lock = threading.Lock()
        self._event = tf.compat.v1.Event(summary=tf.compat.v1.Summary(value=[tf.compat.v1.Summary.Value()]))
        self._value = self._event.summary.value[0]  # the one record every point is written through
        self._record(tf.compat.v1.Event(wall_time=time.time(), file_version=FILE_VERSION))

    def restart(self, step: int, kept: list[Series]) -> None:
        """A resumed run goes on from `step`: a START record, after which TensorBoard forgets what it read at and
        after `step`, then `kept`, the points at `step` itself that the store keeps (Run.resume_at)."""
        start = tf.compat.v1.SessionLog(status=tf.compat.v1.SessionLog.START)
        self._record(tf.compat.v1.Event(wall_time=time.time(), step=step, session_log=start))
        self.write(kept)

    def write(self, series: list[Series]) -> None:
        """Each point of `series` (key, steps, values, timestamps in ms) as one record, then a flush."""
        event, value = self._event, self._value
        with self._lock:
            for key, steps, values, stamps in series:
                value.tag = key
                for step, v, ms in zip(steps.tolist(), values.tolist(), stamps.tolist(), strict=True):
                    event.step, event.wall_time, value.simple_value = step, ms / 1000, v
                    self._file.write(event.SerializeToString())
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def _record(self, event: tf.compat.v1.Event) -> None:
        with self._lock:
            self._file.write(event.SerializeToString())
            self._file.flush()
