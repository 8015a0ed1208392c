"""The README's worked example of a user's own model and loss, run through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


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
