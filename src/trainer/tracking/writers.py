"""The two ways metric points reach a store: MLflow's public `log_batch`, and a bulk insert for SQL stores.

The sink (sink.py) hands a writer lists of series, one per metric key; a writer writes them in one call or
raises (the sink retries). `writer_for` picks the bulk writer where the store is SQL-backed and MLflow has
the shape it relies on (compat.py), else `log_batch`.
"""

from __future__ import annotations

import itertools

import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from trainer.config import causes
from trainer.lifecycle import retry_busy
from trainer.tracking import compat

Series = tuple[str, np.ndarray, np.ndarray, np.ndarray]  # metric key, steps, values, timestamps (ms)
SUMMARY_PREFIXES = ("perf/", "early_stopping/")  # metrics only the end of a run logs (fit._finish)
FLOAT_MAX = 1.7976931348623157e308  # MLflow stores +-inf as this
# SQLite: rows per INSERT statement. One statement of 100 rows (600 parameters, under the 999 that SQLite
# allowed before 3.32) instead of one per row: 260k against 215k points per CPU second into MLflow's metrics
# table (SQLite 3.40, 2-core VM, 50k-point transactions), the per-row cost of binding and stepping a statement
ROWS_PER_INSERT = 100


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
    would have written. The MLflow internals it uses are checked at start (compat.py) and compared
    with `log_batch`'s rows by tests/test_tracking.py.
    """

    def __init__(self, store, run_id: str, store_uri: str):
        self.store, self.run_id, self.store_uri = store, run_id, store_uri

    @classmethod
    def for_client(cls, client: MlflowClient, run_id: str) -> SqlBulkWriter | None:
        store = compat.sql_store(client)
        return cls(store, run_id, client.tracking_uri) if store is not None else None

    def write(self, series: list[Series]) -> None:
        try:
            self._insert(series)
        except Exception as e:  # a point already stored (a retried batch): MLflow's own path skips those
            if not _duplicate(e):
                raise
            LogBatchWriter(MlflowClient(self.store_uri), self.run_id).write(series)

    def _insert(self, series: list[Series]) -> None:
        metric, _ = compat.tables()
        columns, latest = [], []  # per point: compat.COLUMNS (key, value, timestamp, step, is_nan, run_uuid)
        for key, steps, values, stamps in series:
            is_nan = np.isnan(values)
            clean = np.where(is_nan, 0.0, np.clip(values, -FLOAT_MAX, FLOAT_MAX))  # as MLflow stores them
            keys, runs = [key] * len(steps), [self.run_id] * len(steps)
            columns += zip(keys, clean.tolist(), stamps.tolist(), steps.tolist(), is_nan.tolist(), runs, strict=True)
            last = int(np.argmax(steps))
            latest.append(
                metric(run_uuid=self.run_id, key=key, step=int(steps[last]), value=float(clean[last]),
                       timestamp=int(stamps[last]), is_nan=bool(is_nan[last]))
            )  # fmt: skip
        if not columns:
            return
        with self.store.ManagedSessionMaker(read_only=False) as session:
            compat.check_run_active(self.store, session, self.run_id)
            self._execute_many(session, columns)
            compat.update_latest(self.store, latest, session)

    def _execute_many(self, session, columns: list[tuple]) -> None:
        """SQLite: the driver's own executemany on the session's connection (same transaction), ROWS_PER_INSERT
        rows a statement; PostgreSQL through psycopg 3: a COPY of the rows in the same transaction (32-39k
        points/s against 17-24k for the Core insert, 500k points here, server on the same 2 cores); other
        databases: a SQLAlchemy Core insert of the same rows."""
        from sqlalchemy import insert

        connection = session.connection()
        names = ", ".join(compat.COLUMNS)  # the columns compat checked
        if connection.dialect.name == "sqlite":
            cursor = connection.connection.dbapi_connection.cursor()
            row = f"({', '.join('?' * len(compat.COLUMNS))})"
            whole = len(columns) - len(columns) % ROWS_PER_INSERT
            if whole:
                values = list(itertools.chain.from_iterable(columns[:whole]))
                width = ROWS_PER_INSERT * len(compat.COLUMNS)
                many = f"INSERT INTO metrics ({names}) VALUES {', '.join([row] * ROWS_PER_INSERT)}"
                cursor.executemany(many, (values[i : i + width] for i in range(0, len(values), width)))
            cursor.executemany(f"INSERT INTO metrics ({names}) VALUES {row}", columns[whole:])
            cursor.close()
            return
        if connection.dialect.name == "postgresql" and connection.dialect.driver == "psycopg":
            with (
                connection.connection.dbapi_connection.cursor() as cursor,
                cursor.copy(f"COPY metrics ({names}) FROM STDIN") as copy,
            ):
                for c in columns:
                    copy.write_row(c)
            return
        metric, _ = compat.tables()
        connection.execute(insert(metric.__table__), [dict(zip(compat.COLUMNS, c, strict=True)) for c in columns])

    def delete_after(self, step: int, finished: bool = False) -> None:
        """Remove what the resumed run redoes: train/* points at steps >= `step`, others past it, and the
        end-of-run summary at `step` (perf/*, early_stopping/*; val/* too when the run had `finished` there,
        since evaluations during training never fall on the last step)."""
        from sqlalchemy import and_, delete, or_

        metric, latest = compat.tables()
        summary = [metric.key.like(f"{prefix}%") for prefix in SUMMARY_PREFIXES + (("val/",) if finished else ())]
        redone = or_(
            and_(metric.key.like("train/%"), metric.step >= step),
            metric.step > step,
            and_(metric.step == step, or_(*summary)),
        )
        with self.store.ManagedSessionMaker(read_only=False) as session:
            session.execute(delete(metric).where(metric.run_uuid == self.run_id, redone))
            stale = and_(latest.run_uuid == self.run_id, latest.step >= step)
            session.execute(delete(latest).where(stale))  # rewritten by the next points

    def stored_through(self, log_every: int) -> int:
        """The step after the newest train/loss point (plus the steps log_every leaves unlogged): no record of
        durability can honestly go past it."""
        from sqlalchemy import func, select

        metric, _ = compat.tables()
        with self.store.ManagedSessionMaker() as session:
            newest = session.execute(
                select(func.max(metric.step)).where(metric.run_uuid == self.run_id, metric.key == "train/loss")
            ).scalar()
        return 0 if newest is None else int(newest) + log_every


def _duplicate(error: BaseException) -> bool:
    """A unique-key violation anywhere in `error`'s chain: SQLAlchemy's IntegrityError or any driver's (PEP 249
    names it IntegrityError: sqlite3's, psycopg's UniqueViolation). MLflow's session wraps every database error
    in an MlflowException, so catching IntegrityError itself never matched, on either store (a batch written
    twice raised, tests/test_postgres.py). On PostgreSQL a retry after a commit whose answer was lost (a
    dropped connection) is exactly this case."""
    return any(cls.__name__ == "IntegrityError" for e in causes(error) for cls in type(e).__mro__)


def writer_for(client: MlflowClient, run_id: str, bulk: bool = True) -> SqlBulkWriter | LogBatchWriter:
    """The bulk writer where it may be used (`bulk`, a SQL store, MLflow's shape checked), else log_batch."""
    sql = SqlBulkWriter.for_client(client, run_id) if bulk else None
    return sql or LogBatchWriter(client, run_id)


def stored_through(uri: str, run_id: str, log_every: int) -> int | None:
    """What the store at `uri` holds of run `run_id`'s train/loss (see SqlBulkWriter.stored_through); None
    for stores that cannot say cheaply (HTTP, files, a changed MLflow)."""
    client = MlflowClient(uri)
    writer = SqlBulkWriter.for_client(client, run_id)
    return retry_busy(writer.stored_through, log_every) if writer else None
