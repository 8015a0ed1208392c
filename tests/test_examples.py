"""The README's worked example of a user's own model and loss, run through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow  # 8-22 s of CLI runs: the fast suite stays under 10 minutes (make test-slow runs it)
def test_own_model_from_a_config_dir_and_own_loss_inline(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [
        "hydra.searchpath=[file://my_conf]",
        "model=quadratic",
        "~loss",
        "+loss={_target_:my_models.pinball,_partial_:true,tau:0.9}",
        "data.n_samples=512",
        "trainer.max_steps=100",
        "optimizer.lr=0.05",
        f"tracking.uri={uri}",
        f"hydra.run.dir={tmp_path}/out",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", *args], cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    assert run.data.params["model._target_"] == "my_models.Quadratic"
    assert run.data.params["loss.tau"] == "0.9"
    for name in ("a", "b", "c"):
        assert len(client.get_metric_history(run.info.run_id, f"train/grad_norm_by_var/{name}")) == 100
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])  # it learns: the loss at least halves


@pytest.mark.slow  # 8-18 s of CLI runs: the fast suite stays under 10 minutes (make test-slow runs it)
def test_own_step_mixup_trains_on_wine_and_logs_its_declared_scalar_every_step(tmp_path):
    """The README's worked step (examples/my_steps.py): real wine data, an MLP, the README's command."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    steps = 300
    args = ["hydra.searchpath=[file://my_conf]", "step=mixup", "data=wine", "model=mlp",
            "loss=sparse_categorical_crossentropy", f"trainer.max_steps={steps}", "trainer.batch_size=32",
            "optimizer.lr=0.003", f"tracking.uri={uri}", f"hydra.run.dir={tmp_path}/out"]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", *args], cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    assert run.data.params["step._target_"] == "my_steps.Mixup"
    mix = [m.value for m in client.get_metric_history(run.info.run_id, "train/mix")]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/mix")) == list(range(steps))
    assert all(0.0 <= v <= 1.0 for v in mix) and len(set(mix)) > steps // 2  # a fresh draw each step
    # 178 wines, 36 held out (the largest class: 40%); scikit-learn's LogisticRegression on them: ~0.97
    assert run.data.metrics["val/accuracy"] >= 0.9
