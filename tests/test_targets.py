"""data.target_scale on scikit-learn's diabetes table with its raw target (25..346) and raw features: the logged
model against least squares on held-out rows, val/* in the target's units, and `trainer evaluate` agreeing."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_diabetes
from sklearn.linear_model import LinearRegression

from trainer import evaluate as ev
from trainer.train import train


def _diabetes(tmp_path):
    frame = load_diabetes(as_frame=True, scaled=False).frame
    rng = np.random.default_rng(1)
    order = rng.permutation(len(frame))
    held = frame.iloc[order[:88]]
    frame.iloc[order[88:]].to_csv(tmp_path / "diabetes.csv", index=False)
    return frame.iloc[order[88:]], held


def test_a_raw_regression_target_trains_to_least_squares_and_reports_in_its_own_units(tmp_path, compose_cfg):
    """Before: the logged model's MSE was 27,230 against least squares' 2,860 (9.5x), the final train loss
    ~mean(y^2). Now within 1.1x of least squares, on rows neither saw."""
    train_rows, held = _diabetes(tmp_path)
    overrides = ["data=csv", f"data.path={tmp_path / 'diabetes.csv'}", "data.target=target", "model=linear",
                 "loss=mse", "trainer.max_steps=3000"]  # fmt: skip
    cfg = compose_cfg(overrides)
    train(cfg, overrides=overrides, output_dir=tmp_path / "run")
    uri = str(cfg.tracking.uri)
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    x_held, y_held = held.drop(columns="target").to_numpy(), held.target.to_numpy()
    ours = float(np.mean((np.asarray(model.predict(x_held)).reshape(-1) - y_held) ** 2))
    lsq = LinearRegression().fit(train_rows.drop(columns="target").to_numpy(), train_rows.target.to_numpy())
    theirs = float(np.mean((lsq.predict(x_held) - y_held) ** 2))
    print(f"held-out MSE: ours {ours:.1f}, least squares {theirs:.1f}, ratio {ours / theirs:.3f}")
    assert ours <= 1.1 * theirs
    val_loss = run.data.metrics["val/loss"]
    assert 1000 < val_loss < 6000  # an MSE in the target's units (standardized, it would be ~0.5)
    assert run.data.metrics["train/loss"] < 1.5  # trained in standardized units
    report = ev.evaluate(run_id=run.info.run_id, uri=uri)  # the logged model, the raw file: the same val/loss
    assert report["loss"] == pytest.approx(val_loss, rel=1e-4)
    keras_model = model.unwrap_python_model().keras_model
    assert keras_model.layers[-1].name == "target_units"


def test_target_scale_none_keeps_the_old_units_and_a_bad_value_is_one_line(tmp_path, compose_cfg):
    from trainer.config import TrainerError
    from trainer.data.prepare import load

    _diabetes(tmp_path)
    cfg = compose_cfg(["data=csv", f"data.path={tmp_path / 'diabetes.csv'}", "data.target=target"])
    data = load(cfg.data)
    mean, std = data.target_scale
    y = pd.read_csv(tmp_path / "diabetes.csv").target.to_numpy()
    assert 100 < float(mean[0]) < 200 and 60 < float(std[0]) < 90
    assert float(mean[0]) == pytest.approx(float(np.mean(data.y_train)), rel=1e-5) and len(y) > len(data.y_train)
    cfg.data.target_scale = "none"
    assert load(cfg.data).target_scale is None
    cfg.data.target_scale = "log"
    with pytest.raises(TrainerError, match=r"data\.target_scale='log' is invalid: expected auto \| standard \| none"):
        load(cfg.data)
