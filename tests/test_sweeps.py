"""Hydra multirun through the real CLI: parent and child runs, Optuna, parallel jobs on one SQLite store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import new_store
from trainer.config import register

CONF = str(Path(__file__).resolve().parents[1] / "conf")
SMALL = ["data.n_samples=256", "trainer.max_steps=12", "tracking.log_model=false"]


def multirun(tmp_path: Path, *args: str, returncode: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "trainer", "-m", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
           f"hydra.sweep.dir={tmp_path}/sweep", *SMALL, *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == returncode, proc.stderr[-3000:]
    return proc


def runs(tmp_path: Path) -> tuple[mlflow.MlflowClient, list, list]:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    everything = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    parents = [r for r in everything if r.data.tags.get("sweep") == "true"]
    children = [r for r in everything if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


@pytest.mark.slow  # 8-22 s of CLI runs: the fast suite stays under 10 minutes (make test-slow runs it)
def test_grid_sweep_is_one_parent_with_a_child_per_job(tmp_path):
    multirun(tmp_path, "optimizer=sgd,adam", "optimizer.lr=1e-3,1e-2", "model=linear,mlp")
    client, parents, children = runs(tmp_path)
    assert len(parents) == 1 and len(children) == 8
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.info.run_name for c in children} == {
        f"{o} lr={lr} {m}" for o in ("sgd", "adam") for lr in ("0.001", "0.01")
        for m in ("linear", "mlp")
    }  # fmt: skip
    assert all(c.info.status == "FINISHED" for c in children) and parent.info.status == "FINISHED"
    for c in children:
        assert len(client.get_metric_history(c.info.run_id, "train/loss")) == 12
        assert "optimizer.lr=" in c.data.tags["overrides"]
    best = min(children, key=lambda c: c.data.metrics["val/loss"])
    assert parent.data.metrics["sweep/jobs"] == 8
    assert parent.data.metrics["best/objective"] == pytest.approx(best.data.metrics["val/loss"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert "compare.png" in {a.path.split("/")[-1] for a in client.list_artifacts(parent.info.run_id)} | {
        a.path.split("/")[-1] for a in _all_artifacts(client, parent.info.run_id)
    }


def _all_artifacts(client, run_id: str, path: str | None = None) -> list:
    found = []
    for a in client.list_artifacts(run_id, path):
        found += _all_artifacts(client, run_id, a.path) if a.is_dir else [a]
    return found


@pytest.mark.slow
def test_optuna_search_minimises_the_returned_objective_and_logs_the_best(tmp_path):
    multirun(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2")
    _, parents, children = runs(tmp_path)
    assert len(parents) == 1 and len(children) == 3
    result = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    best = min(children, key=lambda c: c.data.metrics["val/loss"])
    assert result["best_value"] == pytest.approx(best.data.metrics["val/loss"], rel=1e-6)
    params = parents[0].data.params
    assert params["best.optimizer"] == str(result["best_params"]["optimizer"])
    assert float(params["best.optimizer.lr"]) == pytest.approx(result["best_params"]["optimizer.lr"])
    assert parents[0].data.metrics["best/optuna_value"] == pytest.approx(result["best_value"])


@pytest.mark.slow
def test_parallel_jobs_on_one_sqlite_store_lose_no_point(tmp_path):
    """4 joblib processes write every step (loss, lr, global and 6 per-variable norms) to one SQLite file."""
    steps = 400
    multirun(tmp_path, "launcher=local_parallel", "model=mlp", "optimizer.lr=1e-3,2e-3,3e-3,4e-3",
             f"trainer.max_steps={steps}", "trainer.steps_per_loop=20", "trainer.batch_size=8")  # fmt: skip
    client, _, children = runs(tmp_path)
    assert len(children) == 4
    for c in children:
        keys = [k for k in c.data.metrics if k.startswith("train/")]
        assert len(keys) == 9  # loss, lr, grad_norm and 6 per-variable norms
        for key in keys:
            points = client.get_metric_history(c.info.run_id, key)
            assert sorted(p.step for p in points) == list(range(steps)), key


@pytest.mark.parametrize(
    ("launcher", "target"),
    [("local_parallel", "JoblibLauncher"), ("slurm", "SlurmLauncher"), ("ray", "RayLauncher")],
)
def test_launcher_configs_compose(launcher, target):
    if launcher == "ray":
        pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="the [ray] extra is not installed")
    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", [f"launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min == 240


def test_launcher_slurm_off_a_cluster_is_one_line_and_leaves_no_run(tmp_path):
    """Before: submitit's 31-line traceback ('Could not detect "srun"') after an empty FAILED parent run was made."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no srun, even on a SLURM login node
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "trainer", "-m", "launcher=slurm", "optimizer.lr=1e-3,1e-2",
           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.sweep.dir={tmp_path}/sweep"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "error: launcher=slurm: this machine is no SLURM cluster's (srun is not on PATH): run the sweep where sbatch "
        "and srun are (a login node), or use launcher=local_parallel here"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, no sweep directory


# --- a failing job is one failed trial, not the end of the sweep ------------------------------------------
DIVERGES = "non-finite loss or gradient at step"  # sgd at lr=100 on the MLP: NaN at step 2


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def by_name(children: list) -> dict[str, object]:
    return {c.info.run_name: c for c in children}


@pytest.mark.slow  # 8-22 s of CLI runs: the fast suite stays under 10 minutes (make test-slow runs it)
def test_a_diverging_job_is_a_failed_child_and_the_other_jobs_run(tmp_path, mlflow_template):
    """Before: the sweep stopped at job 1 (exit 1), job 2 never ran, the parent stayed RUNNING."""
    new_store(tmp_path, mlflow_template)
    proc = multirun(tmp_path, "model=mlp", "optimizer=sgd", "optimizer.lr=1e-3,100,1e-2")
    client, parents, children = runs(tmp_path)
    named = by_name(children)
    assert set(named) == {"lr=0.001", "lr=100", "lr=0.01"}  # names: trainer.tracking.ui.run_name
    failed = named["lr=100"]
    assert failed.info.status == "FAILED" and failed.data.tags["error"].startswith(DIVERGES)
    for name in ("lr=0.001", "lr=0.01"):
        assert named[name].info.status == "FINISHED"
        assert len(client.get_metric_history(named[name].info.run_id, "train/loss")) == 12
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["sweep/jobs"] == 3 and parent.data.metrics["sweep/failed_jobs"] == 1
    assert parent.data.tags["best_run_id"] == named["lr=0.01"].info.run_id
    [line] = error_lines(proc)  # the failed job's error, once, in one line; no traceback
    assert line.startswith(f"error: job 1 (lr=100): {DIVERGES} 2;")
    assert "Traceback" not in proc.stderr
    assert f"sweep: 1 of 3 jobs failed (job 1); FAILED child runs of run {parent.info.run_id}" in proc.stderr


@pytest.mark.slow  # 8-22 s of CLI runs: the fast suite stays under 10 minutes (make test-slow runs it)
def test_a_sweep_whose_every_job_fails_exits_1_with_one_line(tmp_path, mlflow_template):
    """A job that fails before its run exists (a bad value) is a FAILED child too; all failed: parent FAILED."""
    new_store(tmp_path, mlflow_template)
    proc = multirun(tmp_path, "model=mlp", "optimizer=sgd", "optimizer.lr=100,-1", returncode=1)
    _, parents, children = runs(tmp_path)
    named = by_name(children)
    assert {n: c.info.status for n, c in named.items()} == {"lr=100": "FAILED", "lr=-1": "FAILED"}
    bad_lr = "optimizer.lr=-1 is invalid: expected a positive number, or auto (the LR finder's suggestion)"
    assert named["lr=-1"].data.tags["error"] == bad_lr
    assert named["lr=-1"].data.tags["sweep_job"] == "1"
    parent = parents[0]
    assert parent.info.status == "FAILED" and parent.data.metrics["sweep/failed_jobs"] == 2
    lines = error_lines(proc)  # one per job, then the sweep's
    assert len(lines) == 3 and "Traceback" not in proc.stderr
    assert lines[0].startswith(f"error: job 0 (lr=100): {DIVERGES}")
    assert lines[1] == f"error: job 1 (lr=-1): {bad_lr}"
    assert lines[2].startswith(f"error: all 2 jobs of the sweep failed (job 0: {DIVERGES}")
    assert lines[2].endswith(f"FAILED child runs of run {parent.info.run_id} in sqlite:///{tmp_path}/mlflow.db")
    assert parent.data.tags["error"] == lines[2].removeprefix("error: ")


@pytest.mark.slow
def test_optuna_goes_on_sampling_after_a_failed_trial(tmp_path, mlflow_template):
    """Seed 1234 samples sgd at lr=340 as trial 3; trial 4 (TPE's first) still runs. Before: exit 1 at trial 3."""
    new_store(tmp_path, mlflow_template)
    proc = multirun(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=5",
                    "optimizer.lr=tag(log, interval(1e-4, 1e3))")  # fmt: skip
    _, parents, children = runs(tmp_path)
    assert sorted(int(c.data.tags["sweep_job"]) for c in children) == [0, 1, 2, 3, 4]
    failed = [c for c in children if c.info.status != "FINISHED"]
    assert [c.data.tags["sweep_job"] for c in failed] == ["3"]
    assert failed[0].info.status == "FAILED" and failed[0].data.tags["error"].startswith(DIVERGES)
    assert failed[0].data.params["optimizer._target_"].endswith("SGD")
    log = proc.stdout + proc.stderr  # Hydra logs to stdout
    assert "Failed experiment: Return value must be float-castable. Got 'a failed job" in log  # a FAIL to Optuna
    assert "max_failure_rate" not in log
    result = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert result["best_value"] == pytest.approx(min(c.data.metrics["val/loss"] for c in finished), rel=1e-6)
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/failed_jobs"] == 1
    assert parent.data.metrics["sweep/jobs"] == 5


@pytest.mark.slow
def test_a_failing_parallel_job_leaves_the_others_training(tmp_path, mlflow_template):
    """joblib: before, the failing worker's sys.exit tore down the pool; the healthy jobs were left RUNNING
    with no points."""
    new_store(tmp_path, mlflow_template)
    steps = 1500
    multirun(tmp_path, "launcher=local_parallel", "model=mlp", "optimizer=sgd", "optimizer.lr=1e-3,100,1e-2",
             f"trainer.max_steps={steps}", "trainer.steps_per_loop=50")  # fmt: skip
    client, parents, children = runs(tmp_path)
    named = by_name(children)
    assert named["lr=100"].info.status == "FAILED"
    for name in ("lr=0.001", "lr=0.01"):
        run = named[name]
        assert run.info.status == "FINISHED"
        assert sorted(p.step for p in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(steps))
    assert parents[0].info.status == "FINISHED" and parents[0].data.metrics["sweep/failed_jobs"] == 1


@pytest.mark.slow  # 8-22 s of CLI runs: the fast suite stays under 10 minutes (make test-slow runs it)
def test_a_job_whose_lr_finder_fails_is_a_failed_job_of_the_sweep(tmp_path, mlflow_template):
    """optimizer.lr=auto whose range test fails (min_lr 100 diverges at once): before, every job's failure vanished:
    exit 0, a FINISHED parent, sweep/jobs=0 and failed_jobs=0; with 1 of 2 failing, no FAILED child."""
    new_store(tmp_path, mlflow_template)
    proc = multirun(tmp_path, "model=mlp", "optimizer=sgd", "optimizer.lr=auto", "lr_finder.max_lr=1000",
                    "lr_finder.steps=20", "lr_finder.min_lr=100,1e-4", returncode=0)  # fmt: skip
    _, parents, children = runs(tmp_path)
    jobs = [c for c in children if c.data.tags.get("lr_find") != "true"]
    by_job = {c.data.tags["sweep_job"]: c for c in jobs}
    assert set(by_job) == {"0", "1"}
    assert by_job["0"].info.status == "FAILED" and by_job["0"].data.tags["error"].startswith("lr_find: ")
    assert by_job["1"].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.metrics["sweep/jobs"] == 2 and parent.data.metrics["sweep/failed_jobs"] == 1
    assert "sweep: 1 of 2 jobs failed (job 0)" in proc.stderr
