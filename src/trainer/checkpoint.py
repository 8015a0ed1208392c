"""Checkpoints and resume: what a run needs to continue exactly where it stopped.

A checkpoint holds the model, the optimizer (slots and iteration count), the global step and the epoch
order; the data position and the next epochs' shuffles are functions of (seed, step), so nothing else
is needed for a resumed run to see the same batches. Beside the checkpoints, `run.json` carries the
resolved config and the MLflow run, so `resume=<dir or run id>` rebuilds the same run (nanoGPT's
checkpoint-carries-its-config).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from trainer.config import TrainerError, first_line
from trainer.secrets import redact_tree, stored, with_credentials

RUN_FILE = "run.json"
DURABLE_FILE = "durable.json"  # the newest step whose metric history the store holds completely
PREFIX = "ckpt-"
DURABLE_KEY = "durable_record"  # run.json: this run keeps durable.json (runs before it did not)
LOCK_FILE = ".lock"  # held (flock) by the one process that trains the run


@dataclass
class Resume:
    """A run to continue, as its run.json tells. Run directories are shared and anyone who can write there
    can edit it: `config` is data until train._resumed_config has checked what it would build."""

    directory: Path  # the checkpoints' directory
    run_id: str
    tracking_uri: str
    config: DictConfig


class Checkpoints:
    """One run's checkpoints, `ckpt-<step>` under the run's output directory, each one a promise.

    A checkpoint at step S is only worth resuming from once every metric point of the steps before it
    (and the evaluation at S) is durable in the tracking store: a hard kill loses whatever the sink still
    held, and a run resumed from a checkpoint past that point would keep the hole forever. So the sink
    sends a barrier after each save and, once everything before it is committed, `mark_durable` records
    the step in `durable.json`; `restore_latest` takes the newest intact checkpoint at or before it, and
    pruning never deletes that one (tf.train.CheckpointManager's max_to_keep would: the writer may lag
    many checkpoints behind a fast loop). Saving never waits for the store.
    """

    def __init__(self, directory: Path, max_to_keep: int, durable_file: Path | None = None,
                 **state: tf.Module | tf.Variable):  # fmt: skip
        self.directory = Path(directory)
        self.durable_file = Path(durable_file) if durable_file else self.directory / DURABLE_FILE
        self.max_to_keep = max_to_keep
        self.state = state
        self.checkpoint = tf.train.Checkpoint(**state)

    def retrack(self, **changed: tf.Module | tf.Variable) -> None:
        """What a checkpoint holds, changed from here on (trainer.unfreeze: a new optimizer, other variables
        trainable). Checkpoints before the change hold the old layout: `newest_candidate` tells a resume which."""
        self.state = {**self.state, **changed}
        self.checkpoint = tf.train.Checkpoint(**self.state)

    def claim(self) -> None:
        """Hold the run's lock for as long as this process trains it; a second trainer of the same run (two
        resumes at once) is refused. The OS drops the lock when the process ends, by kill -9 too."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.directory / LOCK_FILE, "a+")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "?"
            self._lock.close()
            raise TrainerError(f"{self.directory}: the run is being trained by another process (pid {holder}); "
                               "wait for it to end or stop it") from None  # fmt: skip
        self._lock.truncate(0)
        self._lock.write(str(os.getpid()))
        self._lock.flush()

    def release(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.close()  # closing drops the flock
            self._lock = None

    def save(self, step: int) -> str:
        path = self.checkpoint.write(str(self.directory / f"{PREFIX}{step}"))
        self._prune()
        self._write_state(step)
        return path

    def _write_state(self, newest: int) -> None:
        """TensorFlow's `checkpoint` state file (a text proto, relative paths), so tf.train.latest_checkpoint
        and tf.train.load_checkpoint(dir) find the newest checkpoint as they would a CheckpointManager's."""
        lines = [f'model_checkpoint_path: "{PREFIX}{newest}"']
        lines += [f'all_model_checkpoint_paths: "{PREFIX}{s}"' for s in self.steps()]
        tmp = self.directory / f"checkpoint.tmp{os.getpid()}"
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.directory / "checkpoint")

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, oldest first (the index file is written last)."""
        found = (p.name.removeprefix(PREFIX).removesuffix(".index") for p in self.directory.glob(f"{PREFIX}*.index"))
        return sorted(int(s) for s in found if s.isdigit())

    def durable_step(self) -> int | None:
        """The newest step whose metric history the store holds completely; None for runs made before
        this record existed (their checkpoints are taken as they are). A run.json that says the record
        exists but a record that is missing or garbled (a node lost between write and rename) is step 0:
        the safe answer, which redoes the run rather than trusting checkpoints past a possible hole."""
        try:
            return int(json.loads(self.durable_file.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0 if self._has_record() else None

    def _has_record(self) -> bool:
        try:
            return bool(json.loads((self.directory / RUN_FILE).read_text()).get(DURABLE_KEY))
        except (OSError, ValueError, AttributeError):
            return False

    def mark_durable(self, step: int) -> None:
        """Called by the sink's writer after a commit; atomic (rename), so a kill leaves the old or the new."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.durable_file.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(json.dumps({"step": int(step)}))
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a lost node leaves the old record or the new
        os.replace(tmp, self.durable_file)

    def rewind(self, step: int) -> None:
        """A resumed run goes on from `step`: checkpoints past it belong to the abandoned future."""
        self.mark_durable(step)
        for later in (s for s in self.steps() if s > step):
            self._delete(later)

    def limit_durable(self, stored_through: int | None) -> None:
        """Hold the record to what the store shows (`stored_through`: the step after its newest train/loss
        point, or None if unknown): a record past it was edited or damaged, and trusting it leaves a hole."""
        durable = self.durable_step()
        if stored_through is None or durable is None or durable <= stored_through:
            return
        print(
            f"resume: {self.durable_file} says step {durable} but the store holds train/loss only up to step "
            f"{stored_through - 1}; resuming from a checkpoint at or before {stored_through}",
            file=sys.stderr,
        )
        self.mark_durable(stored_through)

    def restore_latest(self) -> int:
        """Restore the newest intact checkpoint the store's history covers; returns its step.

        A damaged newest checkpoint (a kill while writing, a truncated copy) falls back to the one before,
        saying so. Errors name the directory and what is wrong.
        """
        steps = self._candidates()
        if not steps:
            raise NoCheckpoint(self.directory, self.durable_step())
        failures = []
        for step in reversed(steps):
            path = str(self.directory / f"{PREFIX}{step}")
            try:
                self.checkpoint.read(path).assert_existing_objects_matched()
            except Exception as e:  # truncated or garbled files fail in many ways: all are the same to the user
                failures.append(f"{path} ({first_line(e)})")
                continue
            if failures:
                print(f"resume: {'; '.join(failures)} cannot be restored; using {path}", file=sys.stderr)
            return step
        raise TrainerError(f"resume: no checkpoint in {self.directory} can be restored: {'; '.join(failures)}")

    def _candidates(self) -> list[int]:
        """The steps a resume may start from: the intact ones the store's history covers, oldest first."""
        durable, steps = self.durable_step(), self.steps()
        return [s for s in steps if s <= durable] if durable is not None else steps

    def newest_candidate(self) -> int | None:
        """The step restore_latest tries first (None: none), read before restoring: its layout may differ."""
        return (self._candidates() or [None])[-1]

    def _prune(self) -> None:
        """Keep the newest `max_to_keep`; the newest one the store's history covers (what a resume would take
        now); and the oldest one it does not cover yet (what the next barriers will make resumable: pruned
        too early, the resume point could never move while the writer lags more than max_to_keep saves)."""
        steps = self.steps()
        keep = set(steps[-self.max_to_keep :]) if self.max_to_keep else set(steps)
        durable = self.durable_step()
        if durable is not None:
            keep.update([s for s in steps if s <= durable][-1:] + [s for s in steps if s > durable][:1])
        for step in steps:
            if step not in keep:
                self._delete(step)

    def _delete(self, step: int) -> None:
        for path in self.directory.glob(f"{PREFIX}{step}.*"):
            path.unlink(missing_ok=True)

    def write_run_file(self, run_id: str, tracking_uri: str, cfg: DictConfig) -> None:
        self.mark_durable(0)  # nothing logged yet, nothing missing: the record exists from the start
        config = redact_tree(OmegaConf.to_container(cfg))  # no password in run data (trainer/secrets.py)
        record = {"run_id": run_id, "tracking_uri": stored(tracking_uri), "config": config, DURABLE_KEY: True}
        (self.directory / RUN_FILE).write_text(json.dumps(record, indent=1))


class NoCheckpoint(TrainerError):
    """Nothing to resume from: the run stopped before a checkpoint whose metric history is complete."""

    def __init__(self, directory: Path, durable: int | None):
        why = "before its first checkpoint" if durable is None or durable == 0 else f"before step {durable}"
        super().__init__(f"resume: no checkpoint in {directory} to continue from (the run stopped {why} "
                         "whose metrics were all stored)")  # fmt: skip
        self.directory = directory


def find(target: str, tracking_uri: str | None = None) -> Resume:
    """`resume=` names a run's output dir, its checkpoints dir, or an MLflow run id (tag `checkpoint_dir`)."""
    directory, store = _checkpoint_dir(target, tracking_uri)
    try:
        record = json.loads((directory / RUN_FILE).read_text())
    except (OSError, ValueError) as e:
        raise TrainerError(f"resume={target!r}: {directory / RUN_FILE} is missing or unreadable ({e})") from e
    missing = [k for k in ("run_id", "tracking_uri", "config") if not isinstance(record, dict) or k not in record]
    if missing:  # write_run_file writes all three: a file without one was edited or comes from elsewhere
        raise TrainerError(f"resume={target!r}: {directory / RUN_FILE} has no {missing[0]!r} key (damaged or "
                           "not written by this trainer); restore it from a copy or start a new run")  # fmt: skip
    run_id, uri, config = record["run_id"], record["tracking_uri"], record["config"]
    if not (isinstance(run_id, str) and isinstance(uri, str) and "${" not in uri and isinstance(config, dict)):
        raise TrainerError(f"resume={target!r}: {directory / RUN_FILE} is malformed (not written by this trainer)")
    uri = with_credentials(uri, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))  # the user's, not the run's
    if store is not None and (run_id != target or _store(stored(uri)) != _store(stored(store))):
        raise TrainerError(
            f"resume={target!r}: the run's checkpoint_dir tag names {directory}, whose {RUN_FILE} is run {run_id} "
            f"in {uri}, not this run in {store}: refusing a directory the run did not write"
        )
    check_store_holds(uri, run_id, f"resume={target!r}")
    return Resume(directory, run_id, uri, OmegaConf.create(config))


def check_store_holds(uri: str, run_id: str, source: str) -> None:
    """The run's store exists and holds the run, checked before anything opens it with MLflow: MLflow creates a
    missing SQLite file (and writes its tables into any SQLite database) on open, so one resume against a store
    that had been moved away made an empty store there and rewound durable.json to step 0, and every later
    resume failed although the checkpoints were on disk. SQLite is read here read-only, with sqlite3 itself."""
    if not uri.startswith("sqlite:///"):
        import mlflow

        try:
            mlflow.MlflowClient(uri).get_run(run_id)
        except Exception as e:
            raise TrainerError(f"{source}: the run's store {uri} does not hold run {run_id} or cannot be reached "
                               f"({first_line(e)[:200]}); nothing was changed") from None  # fmt: skip
        return
    import sqlite3

    path = uri.removeprefix("sqlite:///").partition("?")[0]
    if not path or path == ":memory:" or not Path(path).is_file():
        raise TrainerError(f"{source}: the run's store {uri} does not exist (run {run_id} is in it); put the store "
                           "back where it was, and resume again: nothing was changed")  # fmt: skip
    try:
        with sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            query = "SELECT 1 FROM runs WHERE run_uuid = ?"
            found = db.execute(query, (run_id,)).fetchone() if "runs" in tables else None
    except sqlite3.Error as e:
        raise TrainerError(f"{source}: the run's store {uri} cannot be read ({e}); nothing was changed") from None
    if not {"runs", "metrics", "experiments"} <= tables:
        raise TrainerError(f"{source}: {uri} is not an MLflow store (no runs, metrics and experiments tables); "
                           "refusing to write into it")  # fmt: skip
    if found is None:
        raise TrainerError(f"{source}: the store {uri} holds no run {run_id}; resume with the store that does "
                           "(nothing was changed)")  # fmt: skip


def _checkpoint_dir(target: str, tracking_uri: str | None) -> tuple[Path, str | None]:
    """The checkpoints' directory, and for a run id the store it was found in (None for a directory).

    A run's `checkpoint_dir` tag is only a pointer, which anyone who can write to the store can change;
    `find` holds it to the run.json there, which must name this run in this store."""
    path = Path(target).expanduser()
    for candidate in (path / "checkpoints", path):
        if (candidate / RUN_FILE).is_file():
            return candidate, None
    if path.exists():
        raise TrainerError(f"resume={target!r}: no checkpoints there (expected {path / 'checkpoints' / RUN_FILE})")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    try:
        run = client.get_run(target)
    except Exception:
        raise TrainerError(
            f"resume={target!r}: neither a run directory nor an MLflow run id in {client.tracking_uri}"
        ) from None
    tagged = run.data.tags.get("checkpoint_dir")
    if not tagged or not (Path(tagged) / RUN_FILE).is_file():
        from trainer.lifecycle import close_if_dead

        closed = close_if_dead(client.tracking_uri, target)  # e.g. killed while starting: nothing to resume
        raise TrainerError(f"resume={target!r}: the run left no {RUN_FILE} in its checkpoint directory {tagged!r} "
                           f"(removed, or never written: stopped while starting); {closed}")  # fmt: skip
    return Path(tagged), client.tracking_uri


def _store(uri: str) -> str:
    """A store's identity: local paths (SQLite, file store) made absolute, so two spellings of one compare equal."""
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            return scheme + str(Path(uri.removeprefix(scheme)).resolve())
    return uri.rstrip("/") if "://" in uri else f"file://{Path(uri).resolve()}"
