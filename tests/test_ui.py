"""Where users look: run names that tell runs apart, the experiment opening on its runs, the run page's link.

The naming rule on real override lists (as Hydra hands them over); the experiment kind and the link through the
real CLI on a real SQLite store; a multirun's parent experiment through a real two-job sweep (slow).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import new_store, run_cli
from trainer.tracking import ui

LONG_PATH = "/home/ana/projects/housing-prices/data/raw/2024-06-01/california_housing_1990_census_blocks.csv"


# --- the naming rule ---------------------------------------------------------------------------------------
def test_a_csv_run_shows_its_file_name_and_puts_the_hyperparameters_first():
    """Before: `data=csv data.path=/home/ana/projects/...` for every CSV run, cut short in the runs list."""
    overrides = ["data=csv", f"data.path={LONG_PATH}", "data.target=median_house_value", "optimizer.lr=3e-3",
                 "model=mlp", "tracking.uri=sqlite:////home/ana/mlflow.db", "trainer.progress=false"]  # fmt: skip
    name = ui.run_name(overrides)
    assert name == "lr=0.003 mlp csv path=california_housing_1990_census_blocks.csv target=median_house_value"
    assert name[:22] == "lr=0.003 mlp csv path="  # what MLflow 3.17's runs list shows of it (docs/mlflow-ui.png)


def test_quiet_keys_paths_floats_and_long_values():
    overrides = ["+hydra.job.chdir=false", "resume=/tmp/out/2026-01-01/12-00-00", "verbose=true",
                 "tracking.experiment=x", "data=image_folder", "data.dir=./photos/cats_and_dogs/",
                 "model=vision/resnet", "optimizer.lr=0.00012345678901", "trainer.max_steps=100000",
                 "data.target=[" + ",".join(f"col_{i}" for i in range(20)) + "]"]  # fmt: skip
    assert ui.run_name(overrides) == (
        "vision/resnet lr=0.0001235 max_steps=100000 image_folder dir=cats_and_dogs "
        "target=[col_0,col_1,col_2,col_…6,col_17,col_18,col_19]"
    )


def test_a_key_shows_its_last_part_unless_another_shares_it():
    overrides = ["data.seed=3", "trainer.seed=4", "optimizer.lr=0.1", "seed=5", "lr_find=true", "~data.path"]
    assert ui.run_name(overrides) == "trainer.seed=4 lr=0.1 seed=5 lr_find=true data.seed=3 ~data.path"


def test_many_overrides_fit_mlflows_limit_whole():
    """MLflow's runs.name holds 250 characters: whole overrides up to it, then `…`, never half a key."""
    overrides = [f"model.units_{i}={100 + i}" for i in range(40)]
    name = ui.run_name(overrides)
    assert len(name) <= ui.NAME_LIMIT and name.endswith(" …")
    assert name[:-2].split(" ") == [o.removeprefix("model.") for o in overrides[:19]]  # 10 of 11 characters,
    # 9 of 12, 18 spaces: 236; a 20th would make it 249, past 250 less the " …"


def test_a_multirun_job_shows_only_what_the_sweep_varies():
    """The job's overrides as Hydra gives them (common ones included); the sweep's keys as sweep.py records them,
    an Optuna sweeper's params among them (its trial values have every digit)."""
    job = ["data=csv", f"data.path={LONG_PATH}", "data.target=y", "optimizer=adam",
           "optimizer.lr=0.0031415926535", "+optimizer.weight_decay=1e-05", "model.units=[64,64]"]  # fmt: skip
    varying = ["optimizer.lr", "+optimizer.weight_decay", "model.units"]
    assert ui.run_name(job, varying=varying, job=7) == "lr=0.003142 weight_decay=1e-05 units=[64,64]"
    assert ui.run_name(job, varying=["data.path", "optimizer"], job=7) == (
        "path=california_housing_1990_census_blocks.csv adam"  # the command line's order
    )
    assert ui.run_name(job, varying=[], job=7) == "job-7"  # `-m` with nothing swept: the job number


def test_nothing_to_show_is_the_time():
    assert re.fullmatch(r"run-\d{8}-\d{6}", ui.run_name(["tracking.uri=sqlite:///x.db"]))
    assert re.fullmatch(r"run-\d{8}-\d{6}", ui.run_name([]))


def test_the_link_to_a_run():
    assert ui.run_link("http://10.0.0.5:5000/", "3", "ab12") == (
        "http://10.0.0.5:5000/#/experiments/3/runs/ab12?workflowType=machine_learning"
    )
    assert ui.run_link("sqlite:///mlflow.db", "1", "ab12") == (
        "http://127.0.0.1:5000/#/experiments/1/runs/ab12?workflowType=machine_learning "
        "(serve it with: mlflow ui --backend-store-uri sqlite:///mlflow.db)"
    )


# --- the experiment's kind ---------------------------------------------------------------------------------
def test_a_kind_the_user_chose_stays(tmp_path, mlflow_template):
    client = MlflowClient(new_store(tmp_path, mlflow_template))
    mine = client.create_experiment("mine", tags={ui.KIND_TAG: "genai_development"})
    bare = client.create_experiment("bare")
    assert not ui.mark_training(client, mine) and ui.mark_training(client, bare)
    assert not ui.mark_training(client, bare)  # once
    assert client.get_experiment(mine).tags[ui.KIND_TAG] == "genai_development"
    assert client.get_experiment(bare).tags[ui.KIND_TAG] == ui.TRAINING_KIND


@pytest.mark.slow  # 8-22 s of CLI runs: the fast suite stays under 10 minutes (make test-slow runs it)
def test_a_run_tags_its_experiment_names_itself_and_prints_its_link(tmp_path, mlflow_template):
    """A real run on a CSV at a long path: the experiment (made by the run) opens on its runs, the run's name
    is the rule's, and the last line is the link to its page (and MLflow's own "View run" lines are not)."""
    uri = new_store(tmp_path, mlflow_template)
    data = tmp_path / "a" / "rather" / "long" / "directory" / "houses.csv"
    data.parent.mkdir(parents=True)
    data.write_text("a,b,y\n" + "\n".join(f"{i % 7},{i % 5},{i * 0.37:.2f}" for i in range(64)) + "\n")
    args = ["data=csv", f"data.path={data}", "data.target=y", "optimizer.lr=0.02", "trainer.max_steps=4",
            "tracking.log_model=false", "tracking.system_metrics=false", f"tracking.uri={uri}",
            "trainer.progress=false"]  # fmt: skip
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tape-trainer")
    assert exp.tags[ui.KIND_TAG] == "custom_model_development"
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "lr=0.02 max_steps=4 csv path=houses.csv target=y"
    link = (f"MLflow: http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
            f"?workflowType=machine_learning (serve it with: mlflow ui --backend-store-uri {uri})")  # fmt: skip
    assert (proc.stdout + proc.stderr).rstrip().endswith(link)
    assert "View run" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_sweeps_experiment_opens_on_its_runs_too(tmp_path):
    """The parent run creates the experiment (before any job): tagged there; the children named by what varies."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "trainer", "-m", f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path}/sweep",
           "data.n_samples=128", "trainer.max_steps=3", "tracking.log_model=false", "tracking.system_metrics=false",
           "optimizer.lr=1e-3,3e-2"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tape-trainer")
    assert exp.tags[ui.KIND_TAG] == "custom_model_development"
    names = {r.info.run_name for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags}
    assert names == {"lr=0.001", "lr=0.03"}
