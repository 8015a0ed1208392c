"""SQLite tracking stores tuned for long runs: the metric index the MLflow UI's charts need.

Every chart of the MLflow UI (run page and compare view) asks `GET /ajax-api/2.0/mlflow/metrics/
get-history-bulk-interval?run_ids=...&metric_key=...&max_results=320` once per metric. MLflow 3.17's SQL store
answers it with two queries over every point of that metric: `ntile(320) OVER (ORDER BY step, timestamp,
value, is_nan)` then `row_number() OVER (PARTITION BY bucket ...)` to keep each bucket's first point, and the
same order descending, `LIMIT 1`, for the last point. MLflow's index `index_metrics_run_uuid_key_step`
(run_uuid, key, step) gives neither that order nor the columns, so SQLite reads the metric through the primary
key and sorts all of it, for the window query and again for the last point. On a 1M-step run (1M points a
metric, SQLite 3.40, this 2-core VM) that was 2.75 s of CPU for the window query and 0.23 s for the last point.

The same index widened to (run_uuid, key, step, timestamp, value, is_nan) covers both queries in their order:
the first sort and the whole last-point query go (2.2 s and 0.0 s of CPU); what is left is SQLite's window
functions themselves, ~2 us a point. It replaces MLflow's index under MLflow's own name rather than adding a
fifth B-tree per point: a separate index cost +23% CPU per point written and +28% store size; the wider one
costs no measurable write time and +7% size. Any query MLflow ran on the old index (same leading columns)
runs on this one. Nothing checks index definitions: MLflow's schema check compares the alembic revision only;
`mlflow db upgrade` from older revisions, MLflow's own downgrade (it drops the index by name) and an alembic
table rebuild of `metrics` were tried on a widened store (tests/test_scale.py). A migration that recreates the
narrow index just gets widened again by the next run. To undo: `DROP INDEX index_metrics_run_uuid_key_step;
CREATE INDEX index_metrics_run_uuid_key_step ON metrics (run_uuid, key, step);`.
"""

from __future__ import annotations

import logging
import sqlite3
import time

from trainer.lifecycle import say, sqlite_path

CHART_INDEX = "index_metrics_run_uuid_key_step"  # MLflow's name (migration a5b4c3d2e1f0)
MLFLOW_COLUMNS = ("run_uuid", "key", "step")
CHART_COLUMNS = (*MLFLOW_COLUMNS, "timestamp", "value", "is_nan")  # the charts' filter, then their order
LOCK_WAIT_SECONDS = 5.0  # another writer holds the store longer: leave it, the next run widens the index
ANNOUNCE_ROWS = 1_000_000  # rebuilding the index over this many points takes seconds (~2 us a point): say so
log = logging.getLogger(__name__)


def index_for_charts(uri: str) -> bool:
    """Widen MLflow's metric index of the SQLite store at `uri` to serve the UI's charts; True when it is wide.

    Idempotent and cheap once done (one catalogue read). On a store that already holds many points the rebuild
    holds the write lock for ~2 us a point (17 s for a 2.76 GB store of 9M), once; readers go on meanwhile.
    Never a reason not to train: a store that is not SQLite, not MLflow's schema, or busy is left as it is.
    """
    path = sqlite_path(uri)
    if path is None or not path.is_file():
        return False
    connection = sqlite3.connect(path, timeout=LOCK_WAIT_SECONDS, isolation_level=None)
    try:
        columns = _index_columns(connection)
        if columns != MLFLOW_COLUMNS:  # already wide, or an index this code does not know: leave it
            return columns == CHART_COLUMNS
        _widen(connection, path)
        return True
    except sqlite3.Error as e:
        log.warning("%s: could not widen the metric index for the UI's charts (%s); charts stay slower", path, e)
        return False
    finally:
        connection.close()


def _index_columns(connection: sqlite3.Connection) -> tuple[str, ...]:
    return tuple(row[2] for row in connection.execute(f"PRAGMA index_info({CHART_INDEX})"))


def _widen(connection: sqlite3.Connection, path) -> None:
    """Drop and recreate the index in one transaction: no reader ever sees the store without it."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        if _index_columns(connection) != MLFLOW_COLUMNS:  # another process widened it while we waited
            connection.execute("ROLLBACK")
            return
        points = connection.execute("SELECT max(rowid) FROM metrics").fetchone()[0] or 0  # O(log n): ~ the count
        if points >= ANNOUNCE_ROWS:
            say(f"{path}: indexing {points:,} metric points for the MLflow UI's charts (once)...")
        started = time.monotonic()
        connection.execute(f"DROP INDEX {CHART_INDEX}")
        columns = ", ".join(f'"{c}"' for c in CHART_COLUMNS)
        connection.execute(f"CREATE INDEX {CHART_INDEX} ON metrics ({columns})")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    if points >= ANNOUNCE_ROWS:
        say(f"{path}: indexed in {time.monotonic() - started:.1f} s")
