"""One MLflow run: its lifecycle (open, claim on resume, close with the right status), params, artifacts, tags.

Metrics go through the run's sink (sink.py). `QuietRun` stands in on workers that are not the chief.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from omegaconf import DictConfig, OmegaConf

from trainer import lifecycle
from trainer.config import TrainerError, first_line
from trainer.lifecycle import retry_busy
from trainer.secrets import redact, redact_tree
from trainer.store import index_for_charts
from trainer.tracking import curves, ui
from trainer.tracking.connect import brief_http, open_error, probe
from trainer.tracking.lineage import code_tags
from trainer.tracking.sink import Chunk, MetricSink
from trainer.tracking.writers import Series, SqlBulkWriter

if TYPE_CHECKING:  # TensorFlow's import, only where TensorBoard event files are asked for
    from trainer.tracking.tensorboard import TensorBoardWriter

TENSORBOARD_TAG = "tensorboard_dir"  # where a run's TensorBoard event files are (tracking.tensorboard=true)


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


def open_store(uri: str, experiment: str) -> None:
    """Reach the store at `uri`, making or migrating a SQLite one; a TrainerError naming the reason if it cannot be.

    Also resolves MLflow's run-context tags (user, source, git commit) for the process. The trainer calls it
    before TensorFlow is imported, where this work is cheaper: with TensorFlow's thousands of classes loaded,
    every first isinstance() against an ABC walks them (measured: `import git`, done by MLflow's git context,
    0.03 s before TensorFlow's import and 0.34 s after; the store's SQLAlchemy set-up likewise).
    """
    probe(uri)  # before MLflow's own client, which retries a dead server for minutes
    try:
        lifecycle.prepare_store(uri, lifecycle.use_wal, index_for_charts)  # WAL: readers never block writes;
        # the index: the MLflow UI's charts of long runs (trainer/store.py)
    except Exception as e:
        raise TrainerError(open_error(uri, experiment, e)) from e
    resolve_tags()  # cached per process by MLflow's providers


class Run:
    """One MLflow run: params and artifacts at the start, metrics through a sink, status at the end.

    Used as a context manager so the status is right however training ends: FINISHED, FAILED (with the
    error in the `error` tag) or KILLED on Ctrl-C, and the sink is flushed before the status is set.
    `directory`: the run's own (its checkpoints' parent, a resume's too), home of its TensorBoard event files
    unless tracking.tensorboard_dir says otherwise; None: the working directory.
    """

    def __init__(
        self,
        cfg: DictConfig,
        overrides: Sequence[str] = (),
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
        directory: Path | None = None,
    ):
        self.cfg, self.overrides, self.directory = cfg, list(overrides), directory
        self.tensorboard_dir: Path | None = None  # where its TensorBoard event files are (tracking.tensorboard=true)
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
        os.environ.setdefault(ui.QUIET_URL_ENV, "true")  # the run's link is printed once, by the trainer
        open_store(self.uri, t.experiment)  # done already before TensorFlow's import (trainer.startup): cheap
        if self.resumed:
            self._claim()
        tensorboard = self._tensorboard(t) if t.get("tensorboard") else None  # absent: a run.json from before it
        try:
            if self.resumed:  # the same run goes on: params and artifacts are already there
                run = retry_busy(mlflow.start_run, run_id=self.run_id, tags=self.tags)
            else:
                retry_busy(mlflow.set_experiment, t.experiment)
                tags = redact_tree({"overrides": " ".join(self.overrides), **code_tags(), **self.tags})
                run = retry_busy(mlflow.start_run, run_name=self._name(), tags=tags)
        except Exception as e:
            if tensorboard is not None:
                tensorboard.close()
            raise TrainerError(open_error(self.uri, t.experiment, e)) from e
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self.client = MlflowClient(self.uri)
        self.monitor = self._system_metrics(t)
        if self.resumed:
            self._forget_failure()
        with contextlib.suppress(Exception):  # housekeeping: never a reason not to train
            lifecycle.reap_dead_runs(self.client, skip=self.run_id)
        with contextlib.suppress(Exception):  # the UI opens the experiment on its runs (tracking/ui.py)
            retry_busy(ui.mark_training, self.client, self.experiment_id)
        if not self.resumed:
            plain = redact_tree(OmegaConf.to_container(self.cfg, resolve=True))  # no password is recorded
            retry_busy(mlflow.log_params, flatten(plain))
            retry_busy(mlflow.log_text, OmegaConf.to_yaml(OmegaConf.create(plain)), "config.yaml")
            retry_busy(mlflow.log_text, OmegaConf.to_yaml(OmegaConf.create(redact_tree(self.overrides))),
                       "overrides.yaml")  # fmt: skip
        thinning = {k: t.get(k) for k in ("per_variable_every", "per_variable_after") if t.get(k) is not None}
        self.sink = MetricSink(self.client, self.run_id, t.log_every, t.queue_chunks, **thinning)  # absent: a
        # run resumed from a config written before these keys logs on as it began, every step
        self.sink.recorder = curves.CurveRecorder() if t.get("log_plots") else None
        self.sink.windows = curves.WindowExtremes(t.window_extremes) if t.get("window_extremes") else None
        if tensorboard is not None:
            self.sink.tensorboard, self.tensorboard_dir = tensorboard, tensorboard.directory
            retry_busy(self.client.set_tag, self.run_id, TENSORBOARD_TAG, str(tensorboard.directory))
        return self

    def _tensorboard(self, t: DictConfig) -> TensorBoardWriter:
        """The event files' writer (tracking/tensorboard.py), opened before the run is: a directory that cannot be
        written is one line, and no run is left RUNNING. A relative tracking.tensorboard_dir is the working
        directory's."""
        from trainer.tracking.tensorboard import TensorBoardWriter

        where = Path(t.get("tensorboard_dir") or Path(self.directory or ".") / "tensorboard").resolve()
        try:
            return TensorBoardWriter(where)
        except Exception as e:
            key = "tracking.tensorboard_dir" if t.get("tensorboard_dir") else "tracking.tensorboard"
            raise TrainerError(f"{key}: cannot write TensorBoard event files in {where} ({first_line(e)})") from e

    def _system_metrics(self, t: DictConfig) -> Any:
        """MLflow's system-metrics sampler on its own thread (off the training loop), or None when off.

        Under multi-worker the chief's samples carry its node id (`system/chief0/...`; the other workers log
        nothing); a resumed run's go on from the last sample's step."""
        if not t.get("system_metrics"):
            return None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=t.system_metrics_interval, resume_logging=self.resumed,
                node_id=_node_id(), tracking_uri=self.uri,
            )  # fmt: skip
        except ImportError as e:
            logging.getLogger(__name__).warning("no system metrics: %s; pip install psutil, or set "
                                                "tracking.system_metrics=false", first_line(e))  # fmt: skip
            return None
        _sample_now(monitor)  # the start: a run shorter than the interval had no sample at all
        monitor.start()
        return monitor

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
        if getattr(self, "monitor", None) is not None:
            self.monitor.finish()  # its last samples written before the run's status
            _sample_now(self.monitor, flush=True)  # and the end's
        if self.sink is not None:
            self.sink.close()
        away = self.sink is not None and self.sink.points_lost > 0  # the store did not take them: the closing
        with brief_http() if away else contextlib.nullcontext():  # calls get one short try each (brief_http)
            self._close(exc_type, exc)

    def _close(self, exc_type, exc) -> None:
        lost = 0
        if self.sink is not None:
            lost = self._report_delivery()
            if not lost:  # the store took everything: the long-curve extras are cheap and safe to add
                self._finish_curves(ended=exc_type is None)
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            status = RunStatus.KILLED
        elif exc_type is None and not lost:
            status = RunStatus.FINISHED
        else:  # an error, or points the store never took: a run with a hole in its history is not finished
            status = RunStatus.FAILED
            with contextlib.suppress(Exception):
                retry_busy(mlflow.set_tag, "error", redact(first_line(exc) if exc else self._lost_message(lost))[:5000])
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
        """The configured name; else the overrides that tell the run apart in the UI's lists (ui.run_name).

        (MLflow's own random names would all be the same here: set_random_seed seeds Python's `random`.)
        """
        return self.cfg.tracking.run_name or ui.run_name(self.overrides)

    def _finish_curves(self, ended: bool) -> None:
        """The last, partial window's extremes (a run that `ended` well), then the full-resolution plot
        (curves.py), also for a failed or stopped run: never a reason for the run to fail."""
        windows, recorder = self.sink.windows, self.sink.recorder
        try:
            if windows is not None and ended and (tail := windows.tail()):
                now = int(time.time() * 1000)
                retry_busy(self.client.log_batch, self.run_id, [Metric(k, v, now, s) for k, s, v in tail])
            if recorder is None or (first := recorder.first_step()) is None:
                return
            before = curves.read_history(self.client, self.run_id, curves.CURVE_KEYS, first) if first > 0 else None
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(curves.ARTIFACT).name
                curves.plot_curves(recorder.curves(before), path, f"run {self.run_id}")
                self.log_artifact(path, str(Path(curves.ARTIFACT).parent))
        except Exception as e:
            logging.getLogger(__name__).warning("no %s for run %s: %s", curves.ARTIFACT, self.run_id, first_line(e))

    def resume_at(self, step: int, finished: bool = False) -> None:
        """Drop points logged past the checkpoint (a crash after it leaves some), so no step appears twice;
        `finished`: the checkpoint is the run's last step, whose summary is written again."""
        self.set_tag("resumed_at_step", str(step))
        keys = self._non_train_keys() if self.sink.tensorboard is not None else []  # before the deletion below
        if isinstance(self.sink.writer, SqlBulkWriter):
            retry_busy(self.sink.writer.delete_after, step, finished)
        else:
            logging.getLogger(__name__).warning(
                "resume: %s cannot delete metric points; steps after %d logged before the stop may appear twice",
                redact(self.uri), step,
            )  # fmt: skip
        if self.sink.tensorboard is not None:  # the event files too drop what the earlier attempt logged from here
            self.sink.tensorboard.restart(step, self._kept_at(step, keys))
        if self.sink.windows is not None:  # the part of its first window that an earlier attempt ran
            start = step - step % self.sink.windows.every
            seen = curves.read_history(self.client, self.run_id, curves.WINDOW_KEYS, step, start)
            for key, (steps, values) in seen.items():
                self.sink.windows.seed(steps, {key: values})

    def _non_train_keys(self) -> list[str]:
        """The run's metric keys other than train/* (logged again from the resumed step on) and system/* (never in
        the event files), from the store's latest values: read before delete_after drops those past the step."""
        metrics = retry_busy(self.client.get_run, self.run_id).data.metrics
        return [key for key in metrics if not key.startswith(("train/", "system/"))]

    def _kept_at(self, step: int, keys: Sequence[str]) -> list[Series]:
        """The points the store keeps at the resumed `step` itself and the resume does not log again (an evaluation
        at the checkpoint's step): TensorBoard's START record drops what it read at that step too, so the event
        files get them again after it (tracking/tensorboard.py)."""
        kept = []
        for key in keys:
            at = [m for m in retry_busy(self.client.get_metric_history, self.run_id, key) if m.step == step]
            if at:
                values, stamps = np.array([m.value for m in at]), np.array([m.timestamp for m in at], np.int64)
                kept.append((key, np.full(len(at), step), values, stamps))
        return kept

    def set_tag(self, key: str, value: str) -> None:
        retry_busy(mlflow.set_tag, key, value)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        retry_busy(mlflow.log_artifact, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        retry_busy(mlflow.log_text, text, name)

    def log_params(self, params: Mapping[str, Any]) -> None:
        retry_busy(mlflow.log_params, {k: str(v) for k, v in params.items()})

    @property
    def where(self) -> str:
        """A line telling the user where to look at this run: the address of its page (ui.run_link)."""
        return redact(ui.run_link(self.uri, self.experiment_id, self.run_id))


def _sample_now(monitor: Any, flush: bool = False) -> None:
    """One system-metrics sample logged now, beside MLflow's sampler (which logs only after a whole interval:
    20,000 steps in 4 s logged none at the default 10 s). Its collect / aggregate / publish steps, with the
    sampler's thread not running (before start, after finish); a failure costs the sample, never the run."""
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        if flush:
            monitor.mlflow_logger.flush()
    except Exception as e:  # psutil or the store: the run itself goes on
        logging.getLogger(__name__).warning("a system-metrics sample was not logged: %s", first_line(e))


def _node_id() -> str | None:
    """`chief0`, `worker1`: the multi-worker task this process is (TF_CONFIG), None when training alone."""
    try:
        task = json.loads(os.environ.get("TF_CONFIG") or "{}").get("task") or {}
    except (ValueError, AttributeError):
        return None
    return f"{task['type']}{task.get('index', 0)}" if task.get("type") else None


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

    def log_params(self, *args, **kwargs) -> None: ...


class _NoSink:
    latest: dict[str, float] = {}

    def submit(self, chunk: Chunk) -> None: ...

    def barrier(self, step: int) -> None: ...
