"""Reaching a tracking store: fail in seconds on a dead server, and say in one line why a store cannot be opened."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator

from mlflow.tracking import MlflowClient

from trainer import lifecycle
from trainer.config import TrainerError, causes, first_line
from trainer.secrets import redact
from trainer.tracking import compat

# SQLAlchemy's default driver of a database URI (postgresql:// is psycopg 3 from SQLAlchemy 2.1): what installs it
DRIVERS = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "pymysql": "pymysql"}
PROBE_TIMEOUT_S = 3.0  # to connect, no retries: a server that is there accepts at once
PROBE_READ_S = 30.0  # then for its answer: a slow server (4 s a request) works, and is not refused
DATABASE_TIMEOUT_S = 5  # libpq's connect_timeout for the PostgreSQL probe


HTTP_TIMEOUT_S = 20  # MLflow's per-request timeout for a tracking server (its default: 120 s)
CLOSING_TIMEOUT_S = 3  # each closing call (tags, status) to a server the sink found away: one try, this long
HTTP_RETRIES = 2  # and its retries (default 7): a stalled server held the trainer for MLflow's minutes of retries


def bound_http(uri: str) -> None:
    """A tracking server that stops answering (SIGSTOPped, a hung proxy) gets bounded time: each request of MLflow's
    HTTP layer times out after HTTP_TIMEOUT_S and is retried HTTP_RETRIES times, and the sink's own retries end at
    its close_timeout, after which the run ends with one line counting the points not written. Before: training
    was done in ~10 s, then the trainer sat in 120-s retries until killed at 9.5 min, no `error:` line, the run
    RUNNING. Settings of your own (MLFLOW_HTTP_REQUEST_TIMEOUT, MLFLOW_HTTP_REQUEST_MAX_RETRIES) win."""
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_S))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(HTTP_RETRIES))


@contextlib.contextmanager
def brief_http() -> Iterator[None]:
    """MLflow's HTTP calls made inside: one try of CLOSING_TIMEOUT_S. For closing a run whose server the sink found
    away: its four closing calls (the lost count, the error, the status, the fluent end) each waited MLflow's
    timeout three times: 290 s to exit with an 8-s timeout, minutes more at the default 20 s. MLflow reads both
    settings on every request."""
    keys = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(CLOSING_TIMEOUT_S), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update(keys)
    try:
        with lifecycle.without_waiting_for_server():  # nor retry_busy's waits for a server that refuses
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_readable(uri: str) -> None:
    """For the commands that only read a store (compare, evaluate): a server answers, or a SQLite file exists and
    holds MLflow's tables. Opening a SQLite path through MLflow makes or migrates its schema: a mistyped path
    became an empty store, and another program's database got MLflow's 30 tables written into it."""
    probe(uri)
    path = lifecycle.sqlite_path(uri)
    if path is None or ":memory:" in uri:
        return
    tables: set[str] = set()
    if path.is_file():
        with (
            contextlib.suppress(sqlite3.Error),
            contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db,
        ):
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not {"alembic_version", "experiments", "runs"} <= tables:
        what = "no such file" if not path.is_file() else "the file holds no MLflow tables"
        raise TrainerError(f"no MLflow store at {uri} ({what}): set uri=... or MLFLOW_TRACKING_URI")


def probe(uri: str) -> None:
    """An http(s) tracking URI: fail in seconds, naming it, when no server answers there.

    MLflow's client retries a refused connection with backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7 by
    default): `tracking.uri=http://127.0.0.1:1` took 257 s before its error. One request through MLflow's
    own HTTP layer (so its TLS and auth settings apply), without retries; any HTTP answer, even an error
    status, means a server is there and MLflow's own calls take over from here.
    """
    if uri.startswith(("postgresql", "postgres://")):
        _probe_postgres(uri)
        return
    if not uri.startswith(("http://", "https://")):
        return
    bound_http(uri)
    request = compat.http_probe()
    if request is None:  # MLflow's HTTP layer changed shape: its own retries find a dead server
        return
    import requests

    try:
        request(uri, (PROBE_TIMEOUT_S, PROBE_READ_S))
    except Exception as e:
        chain = [e]
        while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 10:
            chain.append(nxt)
        if not any(isinstance(x, requests.exceptions.RequestException) for x in chain):
            return  # not the network (e.g. a credentials setting): MLflow's own call says what it is
        raise TrainerError(f"tracking.uri={redact(uri)!r}: no MLflow server answers ({_network_reason(e)})") from e


def _probe_postgres(uri: str) -> None:
    """One libpq connection, bounded by DATABASE_TIMEOUT_S: a wrong password, a missing database or no server
    is one line in seconds. MLflow's engine retries with backoff: a wrong password was reported after 207 s,
    and port 1 was still silent at 120 s (and that line printed the password)."""
    try:
        import psycopg
        from sqlalchemy.engine import make_url
    except ImportError:
        return  # no driver: opening the store says which to install (open_error)
    url = make_url(uri)
    params = {"host": url.host, "port": url.port, "user": url.username, "password": url.password,
              "dbname": url.database, **{k: v for k, v in url.query.items() if isinstance(v, str)}}  # fmt: skip
    params = {k: v for k, v in params.items() if v is not None}
    params.setdefault("connect_timeout", DATABASE_TIMEOUT_S)
    try:
        psycopg.connect(**params).close()
    except psycopg.Error as e:
        reason = " ".join(str(e).split())[:300]
        raise TrainerError(f"tracking.uri={redact(uri)!r}: the database cannot be opened ({redact(reason)})") from None


def _network_reason(error: BaseException) -> str:
    """`[Errno 111] Connection refused` deep in urllib3's wording -> `Connection refused`."""
    import re

    text = str(error)
    if found := re.search(r"\[Errno -?\d+\] ([^'\")]+)", text):
        return found.group(1).strip()
    if "timed out" in text.lower():
        return f"no connection within {PROBE_TIMEOUT_S:g} s or no answer within {PROBE_READ_S:g} s"
    return first_line(error)[:300]


def store_failed(error: BaseException) -> bool:
    """True when `error` came from talking to the store: MLflow's own errors (a server's answer included), the
    HTTP layer's (a timeout, a refused connection) or the database's. A store that stalls or fails during the
    run's set-up (params, tags, artifacts) gave a Hydra traceback and no `error:` line."""
    import requests
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    kinds = (MlflowException, requests.RequestException, SQLAlchemyError, sqlite3.Error)
    return any(isinstance(e, kinds) for e in causes(error))


def open_error(uri: str, experiment: str, error: BaseException) -> str:
    """Opening the run failed: blame the experiment when it is the deleted one, else the store."""
    from mlflow.entities import LifecycleStage

    with contextlib.suppress(Exception):
        found = MlflowClient(uri).get_experiment_by_name(experiment)
        if found is not None and found.lifecycle_stage == LifecycleStage.DELETED:
            return (f"tracking.experiment={experiment!r} is deleted in {uri}: restore it with "
                    f"`MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {found.experiment_id}` "
                    "or choose another tracking.experiment")  # fmt: skip
    missing = next((e.name for e in causes(error) if isinstance(e, ModuleNotFoundError) and e.name), "")
    if missing.split(".")[0] in DRIVERS:  # a database URI without its driver installed
        return (f"tracking.uri={uri!r}: no module {missing!r}, the database driver it needs: "
                f"pip install {DRIVERS[missing.split('.')[0]]!r}")  # fmt: skip
    return f"tracking.uri={redact(uri)!r}: cannot open the MLflow store ({redact(first_line(error))})"
