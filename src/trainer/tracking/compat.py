"""The fence around MLflow's internals: every private name of MLflow the trainer uses is reached from here.

The SQL bulk writer (writers.SqlBulkWriter) writes MLflow's own metric rows through the store's engine, ~10x
faster than `log_batch` (see writers.py). It relies on:
- `MlflowClient._tracking_client.store`: the client's store object, a `SqlAlchemyStore` for SQL URIs;
- `SqlAlchemyStore._get_run(session, run_uuid)`, `._check_run_is_active(run)`,
  `._update_latest_metrics_if_necessary(logged_metrics, session)` and its `ManagedSessionMaker(read_only)`;
- the ORM tables `SqlMetric` ("metrics") and `SqlLatestMetric` ("latest_metrics") with the columns
  key, value, timestamp, step, is_nan, run_uuid, every other column nullable or with a database default
  (the raw `INSERT INTO metrics` on SQLite names only those).
The HTTP probe (run.probe) relies on `mlflow.utils.rest_utils.http_request(max_retries, timeout,
raise_on_status)` and `mlflow.utils.credentials.get_default_host_creds(uri)`.

Checked once per process on first use (trainer.compat.shape_ok). When the shape is not there, or
TRAINER_NO_INTERNALS names mlflow, metrics go through the public `MlflowClient.log_batch` (every store, ~10x
slower on SQLite), a resume cannot delete the points it redoes, and a dead server is found by MLflow's own
retries instead of the probe; one line on stderr says so.
"""

from __future__ import annotations

from typing import Any

from trainer.compat import shape_ok, takes, version

COLUMNS = ("key", "value", "timestamp", "step", "is_nan", "run_uuid")
STORE_METHODS = {
    "_get_run": ("session", "run_uuid"),
    "_check_run_is_active": ("run",),
    "_update_latest_metrics_if_necessary": ("logged_metrics", "session"),
}
PUBLIC = "MLflow's public log_batch for metrics (slower)"


def mlflow_reason(store_type: Any = None, tables: tuple[Any, Any] | None = None) -> str | None:
    """None when the installed MLflow has the shape the SQL bulk writer relies on, else what is missing."""
    where = f"mlflow {version('mlflow')}"
    if store_type is None or tables is None:
        try:
            from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        except ImportError as e:
            return f"{where} has no SQL store models ({e})"
        store_type, tables = store_type or SqlAlchemyStore, tables or (SqlMetric, SqlLatestMetric)
    for name, params in STORE_METHODS.items():
        if not takes(getattr(store_type, name, None), *params):
            return f"{where} has no SqlAlchemyStore.{name}({', '.join(params)})"
    for table, expected in zip(tables, ("metrics", "latest_metrics"), strict=True):
        if (why := _table_reason(getattr(table, "__table__", None), expected)) is not None:
            return f"{where}: {why}"
    return None


def _table_reason(table: Any, expected: str) -> str | None:
    if table is None or getattr(table, "name", None) != expected:
        return f"no ORM table {expected!r}"
    columns = {c.name: c for c in table.columns}
    if missing := [c for c in COLUMNS if c not in columns]:
        return f"table {expected!r} lacks {', '.join(missing)}"
    if required := [n for n, c in columns.items() if n not in COLUMNS and not c.nullable and c.server_default is None]:
        return f"table {expected!r} has new required columns {', '.join(required)}"
    return None


def sql_store(client: Any) -> Any | None:
    """The client's SQL store when the bulk writer may use it; None for other stores or a changed MLflow."""
    if not shape_ok("mlflow", mlflow_reason, PUBLIC):
        return None
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    if store is None or not takes(getattr(store, "ManagedSessionMaker", None), "read_only"):
        shape_ok("mlflow-client", lambda: f"mlflow {version('mlflow')}'s client has no _tracking_client.store", PUBLIC)
        return None
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    return store if isinstance(store, SqlAlchemyStore) else None


def tables() -> tuple[Any, Any]:
    """MLflow's ORM classes of the metric rows and the latest value of each metric: (SqlMetric, SqlLatestMetric)."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric

    return SqlMetric, SqlLatestMetric


def check_run_active(store: Any, session: Any, run_id: str) -> None:
    """MLflow's own refusal to log into a deleted run, as `log_batch` does."""
    store._check_run_is_active(store._get_run(run_uuid=run_id, session=session))


def update_latest(store: Any, latest: list, session: Any) -> None:
    """MLflow's own upkeep of the latest-metric table (what `get_run(...).data.metrics` reads)."""
    store._update_latest_metrics_if_necessary(latest, session)


def http_probe() -> Any | None:
    """A function `(uri, timeout) -> None` making one request to `uri`'s /health through MLflow's own HTTP
    layer (its TLS and auth settings), without retries; None when MLflow's shape changed."""

    def reason() -> str | None:
        try:
            from mlflow.utils.credentials import get_default_host_creds
            from mlflow.utils.rest_utils import http_request
        except ImportError as e:
            return f"mlflow {version('mlflow')} has no rest_utils.http_request ({e})"
        if not takes(http_request, "max_retries", "timeout", "raise_on_status") or not callable(get_default_host_creds):
            return f"mlflow {version('mlflow')}'s http_request takes no max_retries/timeout/raise_on_status"
        return None

    if not shape_ok("mlflow-http", reason, "MLflow's own retries to find a dead tracking server (minutes)"):
        return None
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    def request(uri: str, timeout: float) -> None:
        http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0, timeout=timeout,
                     raise_on_status=False)  # fmt: skip

    return request
