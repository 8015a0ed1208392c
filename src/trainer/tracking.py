"""MLflow: the run's lifecycle, its params and artifacts, and the per-step metric sink.

The training thread only hands each chunk's device tensors to `MetricSink.submit`; a writer thread turns
them into numbers and MLflow points and writes them in batches. The queue between the two is bounded:
if the store falls behind, the loop waits (back-pressure) instead of memory growing without limit.
Whatever has been submitted is written before the run is closed, on success, error or Ctrl-C.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from trainer.config import TrainerError


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


@dataclass
class MetricSink:
    """Writes metric points to one run from a background thread, in batches."""

    client: MlflowClient
    run_id: str
    log_every: int = 1
    max_chunks: int = 64
    latest: dict[str, float] = field(default_factory=dict)  # last value of each metric (the progress bar)
    points_written: int = 0
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._queue: queue.Queue[Chunk | None] = queue.Queue(maxsize=self.max_chunks)
        self._thread = threading.Thread(target=self._drain, name="mlflow-metric-sink", daemon=True)
        self._thread.start()

    def submit(self, chunk: Chunk) -> None:
        if self.error is not None:
            raise TrainerError(f"writing metrics to MLflow failed: {self.error}") from self.error
        self._queue.put(chunk)  # blocks when the writer is max_chunks behind

    def close(self, timeout: float | None = None) -> None:
        """Write everything submitted so far, then stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _drain(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self.error is not None:
                continue  # keep draining so the training thread never blocks on a dead writer
            try:
                metrics = self._points(chunk)
                if metrics:
                    self.client.log_batch(self.run_id, metrics=metrics)
                    self.points_written += len(metrics)
            except Exception as e:  # reported to the training thread at its next submit
                self.error = e

    def _points(self, chunk: Chunk) -> list[Metric]:
        arrays = {k: np.atleast_1d(np.asarray(v)) for k, v in chunk.values.items()}  # the device->host copy
        k = len(next(iter(arrays.values())))
        steps = chunk.first_step + np.arange(k)
        keep = np.flatnonzero(steps % self.log_every == 0) if self.log_every > 1 else np.arange(k)
        stamps = np.linspace(chunk.t_start, chunk.t_end, k) * 1000 if k > 1 else np.array([chunk.t_end * 1000])
        points = []
        for name, values in arrays.items():
            if values.ndim == 2:
                columns = [(f"{name}{col}", values[:, j]) for j, col in enumerate(chunk.names)]
            else:
                columns = [(name, values)]
            for key, series in columns:
                self.latest[key] = float(series[-1])
                points += [Metric(key, float(series[i]), int(stamps[i]), int(steps[i])) for i in keep]
        return points


class Run:
    """One MLflow run: params and artifacts at the start, metrics through a sink, status at the end.

    Used as a context manager so the status is right however training ends: FINISHED, FAILED (with the
    error in the `error` tag) or KILLED on Ctrl-C, and the sink is flushed before the status is set.
    """

    def __init__(self, cfg: DictConfig, overrides: Sequence[str] = (), tags: Mapping[str, str] | None = None):
        self.cfg, self.overrides, self.tags = cfg, list(overrides), dict(tags or {})
        self.sink: MetricSink | None = None
        self.run_id = ""

    def __enter__(self) -> Run:
        t = self.cfg.tracking
        if t.uri:
            mlflow.set_tracking_uri(t.uri)
        self.uri = mlflow.get_tracking_uri()
        try:
            mlflow.set_experiment(t.experiment)
            tags = {"overrides": " ".join(self.overrides), **self.tags}
            run = mlflow.start_run(run_name=t.run_name, tags=tags)
        except Exception as e:
            raise TrainerError(f"tracking.uri={self.uri!r}: cannot open the MLflow store ({_first_line(e)})") from e
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self.client = MlflowClient(self.uri)
        resolved = OmegaConf.to_container(self.cfg, resolve=True)
        mlflow.log_params(flatten(resolved))
        mlflow.log_text(OmegaConf.to_yaml(self.cfg, resolve=True), "config.yaml")
        mlflow.log_text(OmegaConf.to_yaml(OmegaConf.create(self.overrides)), "overrides.yaml")
        self.sink = MetricSink(self.client, self.run_id, t.log_every, t.queue_chunks)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.sink is not None:
            self.sink.close()
        if exc_type is None and self.sink is not None and self.sink.error is not None:
            exc = self.sink.error
            exc_type = type(exc)
        if exc_type is None:
            status = RunStatus.FINISHED
        elif issubclass(exc_type, KeyboardInterrupt):
            status = RunStatus.KILLED
        else:
            status = RunStatus.FAILED
            mlflow.set_tag("error", _first_line(exc)[:5000])
        mlflow.end_run(RunStatus.to_string(status))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """A handful of values at one step (validation, summaries): through the sink, so in step order."""
        now = time.time()
        self.sink.submit(Chunk(step, dict(metrics), t_start=now, t_end=now))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        mlflow.log_text(text, name)

    @property
    def where(self) -> str:
        """A line telling the user where to look at this run."""
        if self.uri.startswith("http"):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"run {self.run_id} in {self.uri} (view: mlflow ui --backend-store-uri {self.uri})"


def _first_line(e: BaseException | None) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
