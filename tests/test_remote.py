"""A real `mlflow server` on 127.0.0.1, started by the test: the trainer logs over HTTP and survives its absence."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` with a SQLite backend and an artifact directory in tmp_path."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.uri = root, port, f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root}/server.db",
               "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]  # fmt: skip
        log = (self.root / "server.log").open("a")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=ENV, stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(30)


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path, free_port())
    s.start()
    yield s
    s.stop()


def run_cli(tmp_path: Path, uri: str, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "trainer", "model=mlp", "data.n_samples=512", f"tracking.uri={uri}",
           f"hydra.run.dir={tmp_path}/out", *args]  # fmt: skip
    return subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_trainer_logs_to_a_remote_server_over_http(tmp_path, server):
    proc = run_cli(tmp_path, server.uri, "trainer.max_steps=60")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    client = mlflow.MlflowClient(server.uri)
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.max_steps"] == "60" and run.data.params["model.hidden"] == "[64, 64]"
    for key in ("train/loss", "train/grad_norm", "train/lr", "train/grad_norm_by_var/dense_0/kernel"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(60)), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "overrides.yaml", "model"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    assert "max_steps: 60" in local.read_text()
    exp, run_id = run.info.experiment_id, run.info.run_id  # where to look, printed once at the end (tracking/ui.py)
    assert f"MLflow: {server.uri}/#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning\n" in err
    assert "View run" not in out + err  # MLflow's own two lines for a server: switched off


@pytest.mark.slow
def test_training_survives_the_server_going_away_and_delivers_everything_when_it_returns(tmp_path, server):
    steps = 20_000  # ~3 s of training here: it ends while the server is away, so its closing calls meet the absence
    proc = run_cli(tmp_path, server.uri, f"trainer.max_steps={steps}", "trainer.steps_per_loop=50",
                   "trainer.batch_size=8", "tracking.log_model=false")  # fmt: skip
    client = mlflow.MlflowClient(server.uri)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until points are arriving, then pull the server away
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        if runs and runs[0].data.metrics.get("train/loss") is not None:
            break
        time.sleep(0.3)
    server.stop()
    time.sleep(15)  # longer than MLflow's own HTTP retries (~6 s): training ends meanwhile, and its closing
    # calls wait for the server (lifecycle.AWAY_RETRY_SECONDS) as the sink holds the points (in CI a 4-s absence
    # plus the server's slow restart failed the run on a closing tag)
    assert proc.poll() is None, "training must not stop because the tracking server is away"
    server.start()  # same port, same store
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "could not be delivered" not in err
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(steps))
    assert run.info.status == "FINISHED"


def test_a_refusing_server_is_waited_for_once_then_calls_fail_at_once(monkeypatch):
    """lifecycle.retry_busy: a server that refuses (restarting) is retried; its wait is shared by all calls, so
    a server that is gone costs AWAY_RETRY_SECONDS once, not once per closing tag; brief_http waits not at all."""
    from trainer import lifecycle
    from trainer.tracking.connect import brief_http

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries out of the timing
    monkeypatch.setattr(lifecycle, "_away", {"patience": 4.0, "since": None})
    client = mlflow.MlflowClient(f"http://127.0.0.1:{free_port()}")  # nothing listens there: refused
    start = time.monotonic()
    with pytest.raises(Exception, match="Connection refused"):
        lifecycle.retry_busy(client.get_experiment, "0")
    first = time.monotonic() - start
    with pytest.raises(Exception, match="Connection refused"):
        lifecycle.retry_busy(client.get_experiment, "0")
    second = time.monotonic() - start - first
    assert first > 2.5 and second < first / 2, (first, second)  # the wait once (~4 s); then one try (~0.4 s here)
    calls = []

    def back_on_the_third_try() -> str:  # the server listening again: the wait ends at the first answer
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError(111, "Connection refused")
        return "answered"

    lifecycle._away.update(since=None)
    assert lifecycle.retry_busy(back_on_the_third_try) == "answered" and len(calls) == 3
    assert lifecycle._away["since"] is None  # an answer resets the shared wait
    calls.clear()
    with brief_http(), pytest.raises(ConnectionRefusedError):
        lifecycle.retry_busy(back_on_the_third_try)
    assert len(calls) == 1
