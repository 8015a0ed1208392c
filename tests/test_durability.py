"""Promises under fire: a hard kill never leaves a hole, a dead run is closed, readers never fail a run,
a full disk fails one line at a time. Real processes, real signals, a real SQLite store, a real tmpfs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
ENV.pop("MLFLOW_TRACKING_URI", None)
TRAIN = ["model=mlp", "trainer.progress=false", "tracking.log_model=false", "hydra.run.dir=run"]
METRICS = ("train/loss", "train/lr", "train/grad_norm")


def uri(directory: Path) -> str:
    return f"sqlite:///{directory}/mlflow.db"


def start(tmp_path: Path, *args: str, store: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "trainer", f"tracking.uri={uri(store or tmp_path)}", *args]
    return subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def the_run(directory: Path):
    client = mlflow.MlflowClient(uri(directory))
    runs = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def wait_for(condition, timeout: float = 120, what: str = "", proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the trainer ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}")
        time.sleep(0.2)


def stored_steps(db: Path, key: str = "train/loss") -> list[int]:
    """The steps of `key` in the store, read with plain SQL (no MLflow: a mid-migration store reads as empty)."""
    try:
        with sqlite3.connect(db) as c:
            return [s for (s,) in c.execute("SELECT step FROM metrics WHERE key = ? ORDER BY step", (key,))]
    except sqlite3.OperationalError:
        return []


def checkpoint_steps(directory: Path) -> list[int]:
    return sorted(int(p.name[5:-6]) for p in directory.glob("ckpt-*.index"))


def durable(directory: Path) -> int:
    """The run's durability record; -1 before there is one."""
    path = directory / "durable.json"
    return json.loads(path.read_text())["step"] if path.is_file() else -1


@pytest.mark.slow  # 11-22 s: the fast suite stays near 10 minutes (make test-slow runs it)
def test_hard_kill_while_the_store_lags_then_resume_has_every_step_once(tmp_path):
    """The writer held off by a lock (as a slow store or a far-behind sink would be), checkpoints run ahead
    of what the store holds, kill -9: the resume goes back to the newest checkpoint the store covers and
    the history ends with every step exactly once; the dead run was marked FAILED on the way."""
    proc = start(tmp_path, *TRAIN, "trainer.max_steps=1000000", "trainer.checkpoint_every=200",
                 "trainer.steps_per_loop=50")  # fmt: skip
    db, ckpts = tmp_path / "mlflow.db", tmp_path / "run" / "checkpoints"
    # a base the store covers past step 0 first (the writer records it just after its commit: taking the lock
    # between the two left only step 0 durable, on a loaded machine)
    wait_for(lambda: db.is_file() and (ckpts / "durable.json").is_file() and len(stored_steps(db)) >= 400
             and durable(ckpts) >= 200, what="the first points and a durable checkpoint past step 0")  # fmt: skip
    lock = sqlite3.connect(db, timeout=60)
    lock.execute("BEGIN IMMEDIATE")  # the writer cannot commit; training and checkpoints go on
    held = durable(ckpts)
    wait_for(lambda: checkpoint_steps(ckpts) and checkpoint_steps(ckpts)[-1] >= held + 2000, what="checkpoints")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    lock.rollback()
    lock.close()

    kept = checkpoint_steps(ckpts)
    marker = durable(ckpts)
    assert kept[-1] > marker + 1000  # checkpoints ran ahead of the store...
    resumable = [k for k in kept if k <= marker]
    assert resumable and resumable[-1] > 0  # ...and one it covers was kept past max_to_keep=3
    assert len(stored_steps(db)) < kept[-1]  # the old resume would start past a hole
    _, run = the_run(tmp_path)
    assert run.info.status == "RUNNING"  # nobody could tell it died yet
    assert run.data.tags["trainer.pid"] == str(proc.pid)

    total = kept[-1] + 300
    rc, err = finish(start(tmp_path, f"resume={tmp_path / 'run'}", f"trainer.max_steps={total}"))
    assert rc == 0, err
    assert "died" in err
    _client, run = the_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_at_step"] == str(resumable[-1])
    assert "died" in run.data.tags["previous_error"] and "error" not in run.data.tags
    for key in METRICS:
        assert stored_steps(db, key) == list(range(total)), key  # each step exactly once, no gap
    per_variable = [k for k in run.data.metrics if k.startswith("train/grad_norm_by_var/")]
    assert per_variable and all(stored_steps(db, k) == list(range(total)) for k in per_variable)


@pytest.mark.slow  # 8-22 s of CLI runs: the fast suite stays under 10 minutes (make test-slow runs it)
def test_a_run_killed_before_its_first_checkpoint_says_so_and_is_closed(tmp_path):
    """Every run saves step 0 at once; a kill before even that (during start-up) leaves nothing to resume:
    the directory is made to look so by removing step 0's files, as a kill in that moment leaves it."""
    proc = start(tmp_path, *TRAIN, "trainer.max_steps=1000000")  # no periodic checkpoint
    db, ckpts = tmp_path / "mlflow.db", tmp_path / "run" / "checkpoints"
    wait_for(lambda: db.is_file() and len(stored_steps(db)) > 100, what="the first points")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert checkpoint_steps(ckpts) == [0]
    for f in ckpts.glob("ckpt-0.*"):
        f.unlink()
    client, killed = the_run(tmp_path)
    assert killed.info.status == "RUNNING"

    rc, err = finish(start(tmp_path, f"resume={killed.info.run_id}"))
    assert rc == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: resume: no checkpoint in") and "marked FAILED" in line, err
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FAILED" and run.data.tags["trainer.died"] == "true"
    assert f"process {proc.pid} on " in run.data.tags["error"]


@pytest.mark.slow  # 11-22 s: the fast suite stays near 10 minutes (make test-slow runs it)
def test_trainers_started_together_on_a_new_store_all_run(tmp_path):
    """MLflow makes a new SQLite store in ~50 migrations: three trainers at once interleaved them and failed
    ("Online migration expected to match one row", "duplicate column name") before the store lock."""
    procs = [start(tmp_path, *TRAIN, "trainer.max_steps=5", f"hydra.run.dir=run{i}") for i in range(3)]
    for proc in procs:
        rc, err = finish(proc)
        assert rc == 0 and "Traceback" not in err, err
    client = mlflow.MlflowClient(uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"] * 3
    assert all(stored_steps_of(client, r.info.run_id) == list(range(5)) for r in runs)


def stored_steps_of(client: mlflow.MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))


@pytest.mark.slow
def test_the_next_run_on_the_store_marks_a_dead_run_failed_and_leaves_live_ones(tmp_path):
    victim = start(tmp_path, *TRAIN, "trainer.max_steps=1000000", "hydra.run.dir=victim")
    alive = start(tmp_path, *TRAIN, "trainer.max_steps=1000000", "hydra.run.dir=alive")
    db = tmp_path / "mlflow.db"

    def running() -> int:
        """Plain SQL, as stored_steps: an MLflow client here would migrate the new store beside the trainers
        (CI: "table sql_trace_metric_daily_rollups already exists", the trainers' lock does not cover it)."""
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                return c.execute("SELECT count(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    for proc in (victim, alive):
        wait_for(lambda: db.is_file() and running() == 2, what="two running runs", proc=proc)
    client = mlflow.MlflowClient(uri(tmp_path))
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    rc, err = finish(start(tmp_path, *TRAIN, "trainer.max_steps=20", "hydra.run.dir=third"))
    assert rc == 0, err
    alive.send_signal(signal.SIGTERM)
    assert finish(alive)[0] == 143
    runs = {r.data.tags["trainer.pid"]: r for r in client.search_runs([client.get_experiment_by_name(
        "tape-trainer").experiment_id])}  # fmt: skip
    assert runs[str(victim.pid)].info.status == "FAILED"
    assert runs[str(victim.pid)].data.tags["trainer.died"] == "true"
    assert runs[str(alive.pid)].info.status == "KILLED"  # it was alive: never touched, it ended itself
    assert "trainer.died" not in runs[str(alive.pid)].data.tags


@pytest.mark.slow
def test_a_reader_holding_the_store_for_45_s_across_a_runs_end_does_not_fail_it(tmp_path):
    rc, err = finish(start(tmp_path, *TRAIN, "trainer.max_steps=10", "hydra.run.dir=first"))  # makes the store
    assert rc == 0, err
    db = tmp_path / "mlflow.db"
    proc = start(tmp_path, "model=mlp", "trainer.progress=false", "trainer.max_steps=3000", "hydra.run.dir=second")
    wait_for(lambda: len(stored_steps(db)) > 10 + 100, what="the second run's points")
    reader = sqlite3.connect(db)
    reader.execute("BEGIN")
    rows = reader.execute("SELECT count(*) FROM metrics").fetchone()[0]  # a read transaction, as the UI's
    t0 = time.time()
    try:
        rc, err = finish(proc, timeout=300)
        assert time.time() - t0 < 45, "the run waited for the reader"
        time.sleep(max(0.0, 45 - (time.time() - t0)))
        assert reader.execute("SELECT count(*) FROM metrics").fetchone()[0] == rows  # still the same snapshot
    finally:
        reader.rollback()
        reader.close()
    assert rc == 0 and "Traceback" not in err, err
    client = mlflow.MlflowClient(uri(tmp_path))
    run = next(r for r in client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
               if r.data.tags.get("mlflow.runName", "").startswith("mlp "))  # fmt: skip
    assert run.info.status == "FINISHED"
    artifacts = Path(urlparse(run.info.artifact_uri).path)  # on disk: see test_cli._artifact_files
    assert (artifacts / "model" / "model.keras").is_file()
    assert client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run.info.run_id}'")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(3000))


def _in_small_tmpfs(mount: Path, size: str, script: str) -> subprocess.CompletedProcess:
    """`script` run by sh inside a new user and mount namespace where `mount` is a tmpfs of `size`."""
    mount.mkdir(exist_ok=True)
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {mount} && {script}"],
                          capture_output=True, text=True, env=ENV, timeout=300, check=False)  # fmt: skip


def _tmpfs_works(tmp_path_factory) -> bool:
    return (
        shutil.which("unshare") is not None
        and _in_small_tmpfs(tmp_path_factory.mktemp("probe") / "m", "1m", "true").returncode == 0
    )


@pytest.mark.slow
def test_a_full_disk_fails_in_one_line_and_a_resume_on_it_never_ends_finished(tmp_path, tmp_path_factory):
    if not _tmpfs_works(tmp_path_factory):
        pytest.skip("needs user namespaces (unshare -rm) to mount a small tmpfs: a real full disk")
    store, saved = tmp_path / "store", tmp_path / "saved"
    saved.mkdir()
    py = f"{sys.executable} -m trainer tracking.uri=sqlite:///{store}/mlflow.db {' '.join(TRAIN)}"
    keep = f"rc=$?; cp {store}/mlflow.db* {saved}/; exit $rc"
    out = _in_small_tmpfs(
        store, "3m", f"cd {tmp_path} && {py} trainer.max_steps=6000 trainer.checkpoint_every=500; {keep}"
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr, out.stderr[-4000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "full" in line, out.stderr
    _, run = the_run(saved)
    assert run.info.status in ("FAILED", "RUNNING")  # RUNNING when even the status could not be written
    lost_before = int(run.data.tags.get("metric_points_lost", 0))

    # the same disk, still full: the resume must not end FINISHED, and the count of lost points only grows
    fill = f"cp {saved}/mlflow.db* {store}/ && (dd if=/dev/zero of={store}/fill bs=4k 2>/dev/null; true)"
    resume = f"{sys.executable} -m trainer resume={tmp_path / 'run'} trainer.max_steps=6000"
    out = _in_small_tmpfs(store, "3m", f"cd {tmp_path} && {fill} && {resume}; {keep}")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    _, run = the_run(saved)
    assert run.info.status != "FINISHED"
    assert int(run.data.tags.get("metric_points_lost", lost_before)) >= lost_before

    # space again: the resume redoes every step whose points were lost
    for f in saved.iterdir():
        shutil.copy(f, store / f.name)
    rc, err = finish(start(tmp_path, f"resume={tmp_path / 'run'}", "trainer.max_steps=6000", store=store))
    assert rc == 0, err
    _client, run = the_run(store)
    assert run.info.status == "FINISHED"
    for key in METRICS:
        assert stored_steps(store / "mlflow.db", key) == list(range(6000)), key


@pytest.mark.slow
def test_another_writer_locking_the_store_for_30_s_across_a_runs_end_is_waited_out(tmp_path):
    """WAL lets readers be; writers still take turns, and MLflow gives up after its 20 s busy timeout:
    every write of the run (points, model, status) retries instead."""
    proc = start(tmp_path, "model=mlp", "trainer.progress=false", "trainer.max_steps=3000", "hydra.run.dir=run")
    db = tmp_path / "mlflow.db"
    wait_for(lambda: len(stored_steps(db)) > 100, what="the first points")
    lock = sqlite3.connect(db, timeout=60)
    lock.execute("BEGIN IMMEDIATE")
    time.sleep(30)
    lock.rollback()
    lock.close()
    rc, err = finish(proc, timeout=300)
    assert rc == 0 and "Traceback" not in err, err
    _, run = the_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert (Path(urlparse(run.info.artifact_uri).path) / "model" / "model.keras").is_file()
    for key in METRICS:
        assert stored_steps(db, key) == list(range(3000)), key


@pytest.mark.slow
def test_two_resumes_of_one_run_one_trains_the_other_is_refused(tmp_path):
    """The run was closed FAILED by the next run on the store (its process died), so its status says nothing
    about who trains it now: the run directory's lock does."""
    proc = start(tmp_path, *TRAIN, "trainer.max_steps=1000000", "trainer.checkpoint_every=500")
    ckpts = tmp_path / "run" / "checkpoints"
    wait_for(lambda: durable(ckpts) >= 500, what="a durable checkpoint", proc=proc)  # kept however many saves follow
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert finish(start(tmp_path, *TRAIN, "trainer.max_steps=10", "hydra.run.dir=other"))[0] == 0  # reaps it
    client = mlflow.MlflowClient(uri(tmp_path))
    run_id = json.loads((ckpts / "run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "FAILED"

    first = start(tmp_path, f"resume={tmp_path / 'run'}", "trainer.max_steps=1000000")
    wait_for(lambda: client.get_run(run_id).info.status == "RUNNING", what="the first resume")
    rc, err = finish(start(tmp_path, f"resume={run_id}", "trainer.max_steps=1000000"))
    first.send_signal(signal.SIGINT)
    assert finish(first)[0] == 130
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: {ckpts}: the run is being trained by another process (pid {first.pid}); wait for it to end or stop it"
    )
    assert client.get_run(run_id).data.tags["trainer.pid"] == str(first.pid)


@pytest.mark.slow  # 11-22 s: the fast suite stays near 10 minutes (make test-slow runs it)
def test_resuming_a_finished_run_rewrites_its_summary_once_and_a_shorter_one_is_refused(tmp_path):
    args = (*TRAIN, "trainer.max_steps=300", "trainer.eval_every=100")
    assert finish(start(tmp_path, *args))[0] == 0
    rc, err = finish(start(tmp_path, f"resume={tmp_path / 'run'}", "trainer.max_steps=300"))
    assert rc == 0, err
    client, run = the_run(tmp_path)
    for key in ("val/loss", "perf/steps_per_sec"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == ([100, 200, 300] if key == "val/loss" else [300]), key
    assert stored_steps(tmp_path / "mlflow.db") == list(range(300))

    rc, err = finish(start(tmp_path, f"resume={tmp_path / 'run'}", "trainer.max_steps=200"))
    assert rc == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: resume: the run's checkpoint is at step 300, past the 200 steps asked for; ")
    assert "set trainer.max_steps above 300" in line


@pytest.mark.slow
def test_a_durable_record_past_what_the_store_holds_is_held_to_the_store(tmp_path):
    """An edited or damaged durable.json must not make a resume skip steps the store never got."""
    proc = start(tmp_path, *TRAIN, "trainer.max_steps=1000000", "trainer.checkpoint_every=200",
                 "trainer.steps_per_loop=50")  # fmt: skip
    db, ckpts = tmp_path / "mlflow.db", tmp_path / "run" / "checkpoints"
    wait_for(lambda: durable(ckpts) >= 400, what="a durable checkpoint")
    lock = sqlite3.connect(db, timeout=60)
    lock.execute("BEGIN IMMEDIATE")
    held = durable(ckpts)
    wait_for(lambda: checkpoint_steps(ckpts)[-1] >= held + 1000, what="checkpoints past the store")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    lock.rollback()
    lock.close()
    (ckpts / "durable.json").write_text(json.dumps({"step": 99_999_999}))
    total = checkpoint_steps(ckpts)[-1] + 100
    rc, err = finish(start(tmp_path, f"resume={tmp_path / 'run'}", f"trainer.max_steps={total}"))
    assert rc == 0, err
    assert "says step 99999999 but the store holds train/loss only up to step" in err
    for key in METRICS:
        assert stored_steps(db, key) == list(range(total)), key
