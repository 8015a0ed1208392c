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

from trainer.config import register

CONF = str(Path(__file__).resolve().parents[1] / "conf")
SMALL = ["data.n_samples=256", "trainer.max_steps=12", "tracking.log_model=false"]


def multirun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, "-m", "trainer", "-m", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
           f"hydra.sweep.dir={tmp_path}/sweep", *SMALL, *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def runs(tmp_path: Path) -> tuple[mlflow.MlflowClient, list, list]:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    everything = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    parents = [r for r in everything if r.data.tags.get("sweep") == "true"]
    children = [r for r in everything if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_grid_sweep_is_one_parent_with_a_child_per_job(tmp_path):
    multirun(tmp_path, "optimizer=sgd,adam", "optimizer.lr=1e-3,1e-2", "model=linear,mlp")
    client, parents, children = runs(tmp_path)
    assert len(parents) == 1 and len(children) == 8
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.info.run_name for c in children} == {
        f"optimizer={o} optimizer.lr={lr} model={m}" for o in ("sgd", "adam") for lr in ("0.001", "0.01")
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
