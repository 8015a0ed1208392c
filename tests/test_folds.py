"""data.folds / data.fold: disjoint validation folds that cover every row once, on a real table; a fold sweep
summarized on its parent as mean and std (no best fold), and by `trainer compare`; folds that would do nothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from sklearn.datasets import load_wine

from trainer.config import TrainerError
from trainer.data.core import val_mask
from trainer.data.prepare import load


def test_k_folds_validate_every_row_exactly_once_on_a_real_table(tmp_path, compose_cfg):
    frame = load_wine(as_frame=True).frame  # 178 wines, 13 features, 3 cultivars
    frame["row"] = np.arange(len(frame), dtype=float)  # a feature that names the row
    frame.to_csv(tmp_path / "wine.csv", index=False)
    validated, trained = [], []
    for fold in range(5):
        cfg = compose_cfg(["data=csv", f"data.path={tmp_path / 'wine.csv'}", "data.target=target",
                           "data.folds=5", f"data.fold={fold}", "data.normalize=none"])  # fmt: skip
        data = load(cfg.data)
        rows_val = data.x_val[:, -1].astype(int)
        validated.append(rows_val)
        trained.append(data.x_train[:, -1].astype(int))
        assert set(rows_val).isdisjoint(trained[-1]) and len(rows_val) + len(trained[-1]) == len(frame)
        assert len(rows_val) in (35, 36)  # 178 in 5 near-equal parts
    every = np.concatenate(validated)
    assert sorted(every) == list(range(len(frame)))  # each row validated once, in exactly one fold
    masks = np.stack([val_mask(178, 0.2, 0, 5, k) for k in range(5)])
    assert (masks.sum(axis=0) == 1).all()


def test_folds_are_checked_and_refused_where_they_would_do_nothing(compose_cfg):
    for override, message in (
        ("data.folds=1", "data.folds=1 is invalid"),
        ("data.fold=5", "data.fold=5 is invalid"),
    ):
        with pytest.raises(Exception, match=message):
            cfg = compose_cfg(["data.folds=5", override] if override.startswith("data.fold=") else [override])
            OmegaConf.to_object(cfg.data)
    cfg = compose_cfg(["data=classification", "data.folds=4", "data.fold=3", "data.n_samples=400"])
    data = load(cfg.data)  # a built-in synthetic source takes the folds
    assert len(data.x_val) == 100
    cfg.data._target_ = "tests_own_split.split_itself"
    import sys
    import types

    module = types.ModuleType("tests_own_split")

    def split_itself(n_samples: int):
        from trainer.data.core import split

        x = np.arange(n_samples * 2, dtype=float).reshape(n_samples, 2)
        return split(x, x[:, :1], 0.25, 0)

    module.split_itself = split_itself
    sys.modules["tests_own_split"] = module
    node = OmegaConf.create({"_target_": "tests_own_split.split_itself", "n_samples": 40, "folds": 4, "fold": 1})
    with pytest.raises(TrainerError, match="gives its own validation split, so folds would change nothing"):
        load(node)


@pytest.mark.slow  # a 3-job CLI multirun
def test_a_fold_sweep_is_summarized_as_mean_and_std_on_its_parent(tmp_path):
    import os
    import subprocess
    import sys

    from test_sweeps import runs

    frame = load_wine(as_frame=True).frame
    frame.to_csv(tmp_path / "wine.csv", index=False)
    cmd = [sys.executable, "-m", "trainer", "-m", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
           f"hydra.sweep.dir={tmp_path}/sweep", "data=csv", "data.path=wine.csv", "data.target=target",
           "model=linear", "loss=sparse_categorical_crossentropy", "trainer.max_steps=1500", "tracking.log_model=false",
           "data.folds=3", "data.fold=0,1,2"]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, [parent], children = runs(tmp_path)
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    accuracies = np.array([c.data.metrics["val/accuracy"] for c in children])
    losses = np.array([c.data.metrics["val/loss"] for c in children])
    metrics = client.get_run(parent.info.run_id).data.metrics
    assert metrics["cv/val/accuracy/mean"] == pytest.approx(accuracies.mean())
    assert metrics["cv/val/accuracy/std"] == pytest.approx(accuracies.std())
    assert metrics["cv/val/loss/mean"] == pytest.approx(losses.mean())
    assert metrics["cv/folds"] == 3
    assert "best/objective" not in metrics and "best_run_id" not in client.get_run(parent.info.run_id).data.tags
    assert accuracies.mean() > 0.9  # wine, linear: a real estimate
    assert "cross-validation (3 of 3 folds)" in proc.stderr + proc.stdout
    assert pd.notna(metrics["cv/val/loss/std"])
