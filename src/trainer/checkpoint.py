"""Checkpoints and resume: what a run needs to continue exactly where it stopped.

A checkpoint holds the model, the optimizer (slots and iteration count), the global step and the epoch
order; the data position and the next epochs' shuffles are functions of (seed, step), so nothing else
is needed for a resumed run to see the same batches. Beside the checkpoints, `run.json` carries the
resolved config and the MLflow run, so `resume=<dir or run id>` rebuilds the same run (nanoGPT's
checkpoint-carries-its-config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from trainer.config import TrainerError

RUN_FILE = "run.json"


@dataclass
class Resume:
    directory: Path  # the checkpoints' directory
    run_id: str
    tracking_uri: str
    config: DictConfig


class Checkpoints:
    """tf.train.CheckpointManager over one run's state, under the run's output directory."""

    def __init__(self, directory: Path, max_to_keep: int, **state: tf.Module | tf.Variable):
        self.directory = Path(directory)
        self.checkpoint = tf.train.Checkpoint(**state)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.directory), max_to_keep=max_to_keep)

    def save(self, step: int) -> str:
        return self.manager.save(checkpoint_number=step)

    def restore_latest(self) -> int:
        """Restore the newest checkpoint; returns its step. Errors name the file and what is wrong."""
        path = self.manager.latest_checkpoint
        if path is None:
            raise TrainerError(f"resume: no checkpoint in {self.directory}")
        try:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        except Exception as e:  # truncated or garbled files fail in many ways: all are the same to the user
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainerError(f"resume: checkpoint {path} cannot be restored ({first})") from e
        return int(path.rsplit("-", 1)[-1])

    def write_run_file(self, run_id: str, tracking_uri: str, cfg: DictConfig) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"run_id": run_id, "tracking_uri": tracking_uri, "config": OmegaConf.to_container(cfg)}
        (self.directory / RUN_FILE).write_text(json.dumps(record, indent=1))


def find(target: str, tracking_uri: str | None = None) -> Resume:
    """`resume=` names a run's output dir, its checkpoints dir, or an MLflow run id (tag `checkpoint_dir`)."""
    directory = _checkpoint_dir(target, tracking_uri)
    try:
        record = json.loads((directory / RUN_FILE).read_text())
    except (OSError, ValueError) as e:
        raise TrainerError(f"resume={target!r}: {directory / RUN_FILE} is missing or unreadable ({e})") from e
    return Resume(directory, record["run_id"], record["tracking_uri"], OmegaConf.create(record["config"]))


def _checkpoint_dir(target: str, tracking_uri: str | None) -> Path:
    path = Path(target).expanduser()
    for candidate in (path / "checkpoints", path):
        if (candidate / RUN_FILE).is_file():
            return candidate
    if path.exists():
        raise TrainerError(f"resume={target!r}: no checkpoints there (expected {path / 'checkpoints' / RUN_FILE})")
    import mlflow

    try:
        run = mlflow.MlflowClient(tracking_uri).get_run(target)
    except Exception:
        raise TrainerError(
            f"resume={target!r}: neither a run directory nor an MLflow run id in {mlflow.get_tracking_uri()}"
        ) from None
    tagged = run.data.tags.get("checkpoint_dir")
    if not tagged or not (Path(tagged) / RUN_FILE).is_file():
        raise TrainerError(f"resume={target!r}: the run's checkpoint directory {tagged!r} is gone")
    return Path(tagged)
