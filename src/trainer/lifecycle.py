"""Which process owns a RUNNING run, closing runs whose process died, and a store that readers cannot block.

A hard kill (SIGKILL, the OOM killer) gives a run no chance to set its status, so MLflow would show it
RUNNING forever. Every run records the host and process that trains it (`trainer.host`, `trainer.pid`,
and `trainer.process`: the boot id and the process's start time, so a recycled pid is not mistaken for
the original); every trainer start, and every resume, marks the RUNNING runs of this host whose process
is gone as FAILED with tag `trainer.died`. Runs of other hosts cannot be checked from here and are left.

SQLite stores are switched to WAL journaling: a reader (the MLflow UI drawing a long chart, a script)
then never blocks the run's writes, where in the default rollback journal one read held open for more
than MLflow's 20 s busy timeout failed `log_model` and marked a finished run FAILED. Writes that still
meet a locked database (another writer: parallel jobs on one file) are retried.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from mlflow.entities import RunStatus, ViewType
from mlflow.tracking import MlflowClient

from trainer.config import causes

HOST_TAG, PID_TAG, PROCESS_TAG, DIED_TAG = "trainer.host", "trainer.pid", "trainer.process", "trainer.died"
BUSY_RETRY_SECONDS = 300.0  # how long a write waits out other writers before the run fails
AWAY_RETRY_SECONDS = 60.0  # how long a write waits for a tracking server that refuses connections (restarting)
_away = {"patience": AWAY_RETRY_SECONDS, "since": None}  # patience 0 inside without_waiting_for_server(); since:
# when a server first refused, unanswered since: one shared wait, so a server that is gone costs it once, not per call
SCHEMA_LOCK_KEY = 0x7461706574726E72  # "tapetrnr": the advisory lock that lines up first migrations (PostgreSQL)
WAL_SWITCH_SECONDS = 5.0  # the switch needs the file to itself: past this, keep the old journal (writes retry)
T = TypeVar("T")
log = logging.getLogger(__name__)
# MLflow logs every SQL error it re-raises with a full traceback; the trainer reports each one itself, in one
# line (or retries it): theirs printed a 60-line traceback per retry of a locked or full store.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def process_tags() -> dict[str, str]:
    """The tags that say which process trains a run."""
    pid = os.getpid()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), PROCESS_TAG: _identity(pid) or ""}


def owner_alive(tags: dict[str, str]) -> bool | None:
    """True/False when the run's process is on this host; None when it is elsewhere or was never recorded."""
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return None
    identity = _identity(int(tags[PID_TAG]))
    return identity is not None and identity == tags.get(PROCESS_TAG, identity)


def reap_dead_runs(client: MlflowClient, skip: str = "") -> list[str]:
    """Mark FAILED every RUNNING run of this host whose process is gone; returns their ids."""
    host = socket.gethostname()
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    reaped = []
    for start in range(0, len(experiments), 100):  # search_runs takes at most 100 experiments
        runs = client.search_runs(
            experiments[start : start + 100],
            f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
            max_results=1000,
        )
        for run in runs:
            if run.info.run_id == skip or owner_alive(run.data.tags) is not False:
                continue
            mark_died(client, run.info.run_id, run.data.tags)
            reaped.append(run.info.run_id)
    if reaped:
        say(f"marked FAILED {len(reaped)} run(s) whose process died without ending them: {', '.join(reaped)}")
    return reaped


def mark_died(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    where = f"process {tags.get(PID_TAG, '?')} on {tags.get(HOST_TAG, '?')}"
    message = f"{where} died without ending the run (killed, out of memory, or the machine stopped)"
    retry_busy(client.set_tag, run_id, DIED_TAG, "true")
    retry_busy(client.set_tag, run_id, "error", message)
    retry_busy(client.set_terminated, run_id, RunStatus.to_string(RunStatus.FAILED))


def close_if_dead(uri: str, run_id: str) -> str:
    """Close run `run_id` if no live process trains it; says what became of it."""
    client = MlflowClient(uri)
    try:
        run = retry_busy(client.get_run, run_id)
    except Exception:
        return f"run {run_id} is not in {uri}"
    if run.info.status != "RUNNING":
        return f"run {run_id} is {run.info.status}"
    if owner_alive(run.data.tags):
        return f"run {run_id} is still being trained by process {run.data.tags.get(PID_TAG)}"
    mark_died(client, run_id, run.data.tags)
    return f"run {run_id} is now marked FAILED"


def say(message: str) -> None:
    """A notice on stderr, where the trainer's other notices go (Hydra sends logging to stdout)."""
    print(message, file=sys.stderr)


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def prepare_store(uri: str, *then: Callable[[str], object]) -> None:
    """Create (or migrate) the store at `uri`, then run each of `then` on it, one process at a time per SQLite file.

    MLflow builds a new SQLite store with ~50 alembic migrations in separate transactions; two trainers started
    together on a fresh file (two terminals, a parallel sweep) interleaved them, and both failed with
    "Online migration expected to match one row ... 0 found" or "duplicate column name" (4 tries in 4 here).
    A lock file per store path (in the temp directory, so nothing is added beside the user's store) puts them
    in line; the second finds the store made and only checks its revision. An empty PostgreSQL database did the
    same (one of two trainers failed: "duplicate key ... pg_type_typname_nsp_index"): a PostgreSQL advisory lock
    puts them in line there. Other stores need nothing.
    """
    path = sqlite_path(uri)
    if path is None:
        if uri.startswith("postgresql"):
            with _postgres_lock(uri):
                retry_busy(MlflowClient(uri).search_experiments, max_results=1)
        return
    import fcntl
    import hashlib
    import tempfile

    key = hashlib.sha1(str(path.parent.resolve() / path.name).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"tape-trainer-store-{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        retry_busy(MlflowClient(uri).search_experiments, max_results=1)
        for step in then:
            step(uri)


@contextmanager
def _postgres_lock(uri: str) -> Iterator[None]:
    """Hold a session-level advisory lock of the database at `uri` (a lock per database, released when the
    connection closes, even if this process is killed); no lock when the database cannot be reached, where
    MLflow's own connection says why."""
    import sqlalchemy

    engine = None
    try:
        engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)  # no driver: raises here
        connection = engine.connect()
    except Exception:
        if engine is not None:
            engine.dispose()
        yield
        return
    try:
        connection.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({SCHEMA_LOCK_KEY})"))
        yield
    finally:
        connection.close()
        engine.dispose()


def use_wal(uri: str) -> None:
    """Put a SQLite store in WAL mode (a property of the file, kept for every later connection)."""
    path = sqlite_path(uri)
    if path is None or not path.is_file():
        return
    connection = sqlite3.connect(path, timeout=WAL_SWITCH_SECONDS)
    try:
        if connection.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            connection.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError as e:  # e.g. a file system without shared memory: keep the journal it has
        log.warning("%s: cannot switch to WAL journaling (%s); readers may delay writes", path, e)
    finally:
        connection.close()


def retry_busy(fn: Callable[..., T], *args, **kwargs) -> T:
    """Call `fn`, retrying while the store answers that the database is locked or busy (BUSY_RETRY_SECONDS), or
    while a tracking server refuses connections (AWAY_RETRY_SECONDS from its first refusal, for all calls
    together): a server restarted mid-run takes seconds to listen again, and the closing tags written while it
    was away failed a run whose sink had held every point (in CI the restart outlasted MLflow's own ~6 s of HTTP
    retries)."""
    start, wait = time.monotonic(), 0.05
    while True:
        try:
            result = fn(*args, **kwargs)
            _away["since"] = None
            return result
        except Exception as e:
            if _refused(e):
                _away["since"] = _away["since"] or time.monotonic()
                deadline = _away["since"] + _away["patience"]
            else:
                deadline = start + BUSY_RETRY_SECONDS if _busy(e) else start
            if time.monotonic() + wait > deadline:
                raise
            time.sleep(wait)
            wait = min(2 * wait, 5.0)


@contextmanager
def without_waiting_for_server() -> Iterator[None]:
    """retry_busy inside does not wait for a server that refuses connections: for closing a run whose sink
    already waited its close_timeout for that server."""
    saved, _away["patience"] = _away["patience"], 0.0
    try:
        yield
    finally:
        _away["patience"] = saved


def _busy(error: BaseException) -> bool:
    return any("database is locked" in str(e) or "database is busy" in str(e) for e in causes(error))


def _refused(error: BaseException) -> bool:
    """A server that is not listening: MLflow folds requests' error into its own message, so the words are read."""
    return any(isinstance(e, ConnectionRefusedError) or "Connection refused" in str(e) for e in causes(error))


def _identity(pid: int) -> str | None:
    """The boot id and start time of process `pid` (Linux), or "" if it exists elsewhere; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else _exists(pid)
    except OSError:
        return _exists(pid)
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22, counted after the command name


def _exists(pid: int) -> str | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return ""
    return ""
