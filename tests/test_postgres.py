"""MLflow on a real PostgreSQL server: the trainer's bulk metric writer, its resume machinery and its retried
batches on the store teams run MLflow on, not only on SQLite.

The server is Debian's `postgresql` package (`make postgres` installs it and the driver), started by the
module's fixture in a temporary directory on 127.0.0.1 and a free port, trust authentication on loopback only,
and stopped (`pg_ctl stop -m fast`) however the tests end. PostgreSQL refuses to run as root: a root test
process runs initdb and the server as `nobody`, in a directory of its own under the temp directory (pytest's
tmp_path is root's, mode 700).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from test_durability import finish  # a trainer process run to its end: (exit status, stderr)
from trainer.tracking.writers import SqlBulkWriter, writer_for

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
ENV.pop("MLFLOW_TRACKING_URI", None)
TRAIN = ["model=linear", "loss=squared", "trainer.progress=false", "hydra.run.dir=run"]
STEPS = 300
SERVER_USER = "nobody"  # who runs the server when the tests run as root
START_TIMEOUT_S = 60


def server_bin() -> Path | None:
    """The directory of initdb/pg_ctl: $PG_BIN, Debian's newest /usr/lib/postgresql/N/bin, or the PATH."""
    found = shutil.which("initdb")
    candidates = [
        os.environ.get("PG_BIN", ""),
        *sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True),
        str(Path(found).parent) if found else "",
    ]
    for candidate in filter(None, candidates):
        if all((Path(candidate) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(candidate)
    return None


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A PostgreSQL server in `root`, owned and run by `user` (None: this process's own)."""

    def __init__(self, bin_dir: Path, root: Path, user: str | None):
        self.bin, self.root, self.user = bin_dir, root, user
        self.data, self.log, self.port = root / "data", root / "server.log", free_port()

    def pg(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        as_user = {} if self.user is None else {"user": self.user, "group": pwd.getpwnam(self.user).pw_gid}
        return subprocess.run([str(self.bin / tool), *args], cwd=self.root, capture_output=True, text=True,
                              timeout=START_TIMEOUT_S, check=False, extra_groups=[] if as_user else None,
                              **as_user)  # fmt: skip

    def start(self) -> None:
        made = self.pg("initdb", "-D", str(self.data), "-U", "mlflow", "--auth=trust", "-E", "UTF8", "--no-sync")
        assert made.returncode == 0, made.stderr
        options = f"-h 127.0.0.1 -p {self.port} -k {self.data}"  # loopback only; the socket in its own directory
        started = self.pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(START_TIMEOUT_S),
                          "-o", options, "start")  # fmt: skip
        assert started.returncode == 0, f"{started.stdout}{started.stderr}\n{self.server_log()}"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").is_file():
            self.pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def server_log(self) -> str:
        return self.log.read_text() if self.log.is_file() else ""

    def new_database(self, name: str) -> str:
        """An empty database `name`; its MLflow URI (MLflow makes its schema on first use)."""
        import psycopg

        with psycopg.connect(f"postgresql://mlflow@127.0.0.1:{self.port}/postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://mlflow@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    bin_dir = server_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL NOT TESTED: no initdb/pg_ctl/postgres (in $PG_BIN, /usr/lib/postgresql/*/bin or "
                    "on PATH); `make postgres` installs them")  # fmt: skip
    pytest.importorskip("psycopg", reason="PostgreSQL NOT TESTED: no psycopg driver; `make postgres` installs it")
    root_user = os.geteuid() == 0
    if root_user:  # postgres will not run as root; pytest's tmp_path is root's alone (mode 700)
        root = Path(tempfile.mkdtemp(prefix="tape-trainer-pg-"))
        shutil.chown(root, SERVER_USER, pwd.getpwnam(SERVER_USER).pw_gid)
    else:
        root = tmp_path_factory.mktemp("postgres")
    pg = Server(bin_dir, root, SERVER_USER if root_user else None)
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()
        if root_user:
            shutil.rmtree(root, ignore_errors=True)


def train(cwd: Path, uri: str, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "trainer", f"tracking.uri={uri}", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def the_run(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    points = client.get_metric_history(run_id, key)
    steps = [m.step for m in points]
    assert len(steps) == len(set(steps)), f"{key}: a step stored twice"
    return {m.step: m.value for m in points}


@pytest.mark.slow
def test_every_step_reaches_postgres_with_the_values_sqlite_gets(server, tmp_path):
    """The same seeded run on PostgreSQL and on SQLite: every train/ metric (global and per-variable gradient
    norms included) holds exactly the steps 0..299 on both, with the same values; the run ends FINISHED."""
    uri = server.new_database("every_step")
    (tmp_path / "pg").mkdir()
    (tmp_path / "lite").mkdir()
    lite = f"sqlite:///{tmp_path / 'lite' / 'mlflow.db'}"
    args = (*TRAIN, f"trainer.max_steps={STEPS}")
    jobs = [train(tmp_path / "pg", uri, *args), train(tmp_path / "lite", lite, *args, "tracking.log_model=false")]
    for job in jobs:
        rc, err = finish(job)
        assert rc == 0, f"{err}\n{server.server_log()[-3000:]}"

    client, run = the_run(uri)
    assert run.info.status == "FINISHED"
    assert isinstance(writer_for(client, run.info.run_id), SqlBulkWriter)  # the bulk path, not log_batch
    keys = sorted(k for k in run.data.metrics if k.startswith("train/"))
    assert keys == ["train/grad_norm", "train/grad_norm_by_var/b", "train/grad_norm_by_var/w", "train/loss",
                    "train/lr"]  # fmt: skip
    lite_client, lite_run = the_run(lite)
    for key in keys:
        on_pg, on_lite = history(client, run.info.run_id, key), history(lite_client, lite_run.info.run_id, key)
        assert sorted(on_pg) == list(range(STEPS)), key
        assert sorted(on_lite) == list(range(STEPS)), key
        steps = sorted(on_pg)
        np.testing.assert_allclose([on_pg[s] for s in steps], [on_lite[s] for s in steps], rtol=1e-6, err_msg=key)
        assert run.data.metrics[key] == on_pg[STEPS - 1], key  # the latest-metric table, kept by MLflow's code
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/loss")) == [STEPS]


def series(key: str, steps: range, stamp: int = 1_000) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(steps, dtype=np.int64)
    return key, s, s * 0.5, np.full(len(s), stamp, dtype=np.int64)


@pytest.mark.slow
def test_a_batch_written_twice_is_stored_once_and_a_resume_deletes_what_it_redoes(server):
    """The bulk writer's non-SQLite branch in-process: a retried batch (its first commit's answer lost) falls
    back to MLflow's duplicate-skipping path instead of failing; `delete_after` and `stored_through` work on
    PostgreSQL as on SQLite."""
    uri = server.new_database("writer")
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("writer")).info.run_id
    writer = writer_for(client, run_id)
    assert isinstance(writer, SqlBulkWriter)
    batch = [series("train/loss", range(10)), series("val/loss", range(5, 10, 4)), series("perf/steps", range(9, 10))]
    writer.write(batch)
    writer.write(batch)  # raised MlflowException(IntegrityError) before: the except clause never matched
    assert history(client, run_id, "train/loss") == {s: s * 0.5 for s in range(10)}
    assert writer.stored_through(log_every=1) == 10

    writer.delete_after(5)
    assert sorted(history(client, run_id, "train/loss")) == [0, 1, 2, 3, 4]
    assert sorted(history(client, run_id, "val/loss")) == [5]  # an evaluation at the resume step is kept
    assert history(client, run_id, "perf/steps") == {}
    assert writer.stored_through(log_every=1) == 5
    writer.write([series("train/loss", range(5, 8), stamp=2_000)])
    assert sorted(history(client, run_id, "train/loss")) == list(range(8))
    assert client.get_run(run_id).data.metrics["train/loss"] == 3.5


def checkpoint_steps(directory: Path) -> list[int]:
    return sorted(int(p.name[5:-6]) for p in directory.glob("ckpt-*.index"))


def durable(directory: Path) -> int:
    path = directory / "durable.json"
    return json.loads(path.read_text())["step"] if path.is_file() else -1


@pytest.mark.slow
def test_a_hard_killed_run_resumes_on_postgres_with_every_step_once(server, tmp_path):
    """kill -9 mid-run, then `resume=`: the dead run is marked on the way, the points past the checkpoint are
    deleted and redone, and every step of every train/ metric is stored exactly once."""
    uri = server.new_database("resume")
    ckpts = tmp_path / "run" / "checkpoints"
    proc = train(tmp_path, uri, *TRAIN, "trainer.max_steps=1000000", "trainer.checkpoint_every=200",
                 "trainer.steps_per_loop=50", "tracking.log_model=false")  # fmt: skip
    deadline = time.time() + 180
    while durable(ckpts) < 400:
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "no durable checkpoint past step 400 in 180 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    client, run = the_run(uri)
    assert run.info.status == "RUNNING"  # nobody could tell it died yet
    stored = sorted(history(client, run.info.run_id, "train/loss"))
    assert stored == list(range(len(stored))) and len(stored) >= durable(ckpts)  # no hole below the record

    total = checkpoint_steps(ckpts)[-1] + 300
    rc, err = finish(train(tmp_path, uri, f"resume={tmp_path / 'run'}", f"trainer.max_steps={total}"))
    assert rc == 0, f"{err}\n{server.server_log()[-3000:]}"
    assert "died" in err
    client, run = the_run(uri)
    assert run.info.status == "FINISHED"
    assert "died" in run.data.tags["previous_error"]
    keys = [k for k in run.data.metrics if k.startswith("train/")]
    assert len(keys) == 5
    for key in keys:
        assert sorted(history(client, run.info.run_id, key)) == list(range(total)), key


@pytest.mark.slow
def test_two_trainers_started_together_on_an_empty_database_both_run(server, tmp_path):
    """Both make MLflow's schema at once without the advisory lock (lifecycle.prepare_store): one of two failed
    with `duplicate key value violates unique constraint "pg_type_typname_nsp_index"`, 1 try in 1."""
    uri = server.new_database("together")
    args = (*TRAIN, "trainer.max_steps=50", "tracking.log_model=false", "tracking.system_metrics=false")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    jobs = [train(tmp_path / name, uri, *args) for name in ("a", "b")]
    for job in jobs:
        rc, err = finish(job)
        assert rc == 0, err
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]


def test_a_postgresql_uri_without_its_driver_names_the_package(monkeypatch):
    """No server needed: SQLAlchemy fails importing the driver before it connects."""
    from trainer.tracking.connect import open_error

    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` raises ModuleNotFoundError
    uri = "postgresql://mlflow@127.0.0.1:9/no_driver"
    with pytest.raises(Exception) as caught:
        MlflowClient(uri).search_experiments()
    assert open_error(uri, "tape-trainer", caught.value) == (
        f"tracking.uri={uri!r}: no module 'psycopg', the database driver it needs: pip install 'psycopg[binary]'"
    )
