"""data.class_weight on a real imbalanced table (scikit-learn's diabetes, progression above 280: 6.1% positive),
against scikit-learn's own `class_weight='balanced'`; the weighted loss against a hand computation; bad settings."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from omegaconf import OmegaConf
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from conftest import option_kwargs
from trainer import losses
from trainer.config import TrainerError
from trainer.data import csv
from trainer.data.core import val_mask
from trainer.data.prepare import prepare, shared_defaults
from trainer.data.weights import class_weights, require_sample_weight, weighted_loss
from trainer.train import train


def test_weighted_losses_are_kerass_sum_over_batch_size_and_weights_of_one_change_nothing():
    y = tf.constant([[1.0], [0.0], [1.0], [0.0]])
    logits = tf.constant([[0.3], [-1.2], [2.0], [0.4]])
    w = tf.constant([3.0, 1.0, 3.0, 0.5])
    per_example = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)[:, 0].numpy()
    got = losses.binary_crossentropy(y, logits, from_logits=True, sample_weight=w).numpy()
    assert got == pytest.approx(float((per_example * w.numpy()).sum() / 4), rel=1e-6)
    keras_bce = tf.keras.losses.BinaryCrossentropy(from_logits=True)(y, logits, sample_weight=w).numpy()
    assert got == pytest.approx(float(keras_bce), rel=1e-6)
    for fn, args in ((losses.mse, {}), (losses.huber, {"delta": 1.0}), (losses.squared, {})):
        a, b = tf.constant([[1.0, 2.0], [3.0, 4.0]]), tf.constant([[1.5, 1.0], [2.0, 6.0]])
        assert fn(a, b, sample_weight=tf.ones(2), **args).numpy() == pytest.approx(fn(a, b, **args).numpy())
    ids, probs = tf.constant([2, 0]), tf.constant([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    got = losses.sparse_categorical_crossentropy(ids, probs, from_logits=False, sample_weight=tf.constant([2.0, 0.0]))
    assert got.numpy() == pytest.approx(-2 * np.log(0.5) / 2, rel=1e-6)


def _imbalanced(tmp_path):
    """scikit-learn's diabetes table (raw units), the task: is the disease's progression above 280? 27 of 442
    patients (6.1%) are. A stratified 70/30 split: the trainer gets the 70% as a CSV, both are scored on the 30%."""
    frame = load_diabetes(as_frame=True, scaled=False).frame
    frame["high"] = (frame.pop("target") > 280).astype(int)
    train_rows, test_rows = train_test_split(frame, test_size=0.3, random_state=0, stratify=frame.high)
    train_rows.to_csv(tmp_path / "train.csv", index=False)
    return train_rows, test_rows


def _balanced_accuracy_of_run(uri: str, run_name: str, test_rows: pd.DataFrame) -> float:
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id],
                               f"attributes.run_name = '{run_name}'")  # fmt: skip
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    predicted = model.predict(test_rows.drop(columns="high").to_numpy())["label"].astype(int)
    return balanced_accuracy_score(test_rows.high, predicted)


@pytest.mark.slow  # ~10 s each: the fast suite stays under 10 minutes
def test_balanced_class_weights_raise_balanced_accuracy_as_scikit_learns_do(tmp_path, compose_cfg):
    train_rows, test_rows = _imbalanced(tmp_path)
    scores = {}
    for name, weight in (("plain", None), ("balanced", "balanced")):
        overrides = ["data=csv", f"data.path={tmp_path / 'train.csv'}", "data.target=high", "model=linear",
                     "loss=binary_crossentropy", "trainer.max_steps=1500", f"tracking.run_name={name}"]  # fmt: skip
        cfg = compose_cfg(overrides)
        cfg.data.class_weight = weight
        train(cfg, overrides=overrides, output_dir=tmp_path / name)
        scores[name] = _balanced_accuracy_of_run(str(cfg.tracking.uri), name, test_rows)
    x, y = train_rows.drop(columns="high").to_numpy(), train_rows.high.to_numpy()
    scaler = StandardScaler().fit(x)
    sk = {
        key: balanced_accuracy_score(
            test_rows.high,
            LogisticRegression(class_weight=cw, max_iter=5000)
            .fit(scaler.transform(x), y)
            .predict(scaler.transform(test_rows.drop(columns="high").to_numpy())),
        )
        for key, cw in (("plain", None), ("balanced", "balanced"))
    }
    print(f"balanced accuracy on held-out rows: ours {scores}, scikit-learn {sk}")
    assert sk["balanced"] > sk["plain"]  # what the setting is for, on this table
    assert scores["balanced"] > scores["plain"] + 0.1  # scikit-learn here: 0.496 -> 0.799
    assert scores["balanced"] >= sk["balanced"] - 0.05


def test_class_weights_from_the_training_split_and_bad_settings_in_one_line(tmp_path):
    frame = load_breast_cancer(as_frame=True).frame
    frame["diagnosis"] = np.where(frame.pop("target") == 0, "malignant", "benign")
    frame.to_csv(tmp_path / "cancer.csv", index=False)
    settings = OmegaConf.create({**shared_defaults(), "val_fraction": 0.2, "normalize": "standard"})
    data = prepare(
        csv(**option_kwargs("data", "csv", path=str(tmp_path / "cancer.csv"), target="diagnosis", missing="error")),
        settings,
    )
    counts = np.bincount((data.y_train.reshape(-1) > 0.5).astype(int), minlength=2)
    np.testing.assert_allclose(class_weights(data, "balanced"), counts.sum() / (2 * counts), rtol=1e-6)
    by_label = class_weights(data, OmegaConf.create({"malignant": 4}))
    assert by_label[data.labels.index("malignant")] == 4 and by_label[data.labels.index("benign")] == 1
    assert class_weights(data, None) is None
    bad = [
        ("balance", "data.class_weight=balance: expected balanced, or a mapping {label: weight}"),
        ({"cancer": 2}, "data.class_weight={cancer: 2}: no class 'cancer' in the data; its classes are"),
        ({"benign": -1}, "data.class_weight={benign: -1}: the weight of 'benign' is -1; use a finite number >= 0"),
        ({"benign": 0, "malignant": 0}, "every class weighs 0"),
    ]
    for setting, message in bad:
        with pytest.raises(TrainerError) as e:
            class_weights(data, OmegaConf.create(setting) if isinstance(setting, dict) else setting)
        assert message in str(e.value) and "\n" not in str(e.value)
    regression = prepare(
        csv(
            **option_kwargs(
                "data",
                "csv",
                path=str(tmp_path / "cancer.csv"),
                target="mean radius",
                features=["mean texture"],
                missing="error",
            )
        ),
        settings,
    )
    with pytest.raises(TrainerError, match=r"data\.class_weight=balanced: the data is a regression task"):
        class_weights(regression, "balanced")
    with pytest.raises(TrainerError, match=r"needs a loss that takes sample_weight; loss my\.loss does not"):
        weighted_loss(lambda y, p: tf.reduce_mean(y - p), class_weights(data, "balanced"), data, "my.loss")


def _loss_history(uri: str, run_name: str) -> list[float]:
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id],
                               f"attributes.run_name = '{run_name}'")  # fmt: skip
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    return [m.value for m in history]


@pytest.mark.slow  # ~10 s each: the fast suite stays under 10 minutes
def test_a_weight_column_weighs_each_row_as_class_weights_do(tmp_path, compose_cfg):
    """data.sample_weight names a column of per-row weights. Given each row its class's balanced weight (from
    the training split, as data.class_weight=balanced computes it), every step's train/loss equals the
    class-weighted run's bitwise: the same rows, the same weights, the same reduction."""
    train_rows, _ = _imbalanced(tmp_path)
    train_rows = train_rows.reset_index(drop=True)
    held_out = val_mask(len(train_rows), 0.2, 0)
    counts = np.bincount(train_rows.high[~held_out], minlength=2)
    balanced = (counts.sum() / (2 * counts)).astype(np.float32)
    train_rows.assign(w=balanced[train_rows.high]).to_csv(tmp_path / "weighted.csv", index=False)
    common = ["data=csv", "data.target=high", "model=linear", "loss=binary_crossentropy", "trainer.max_steps=200"]
    runs = {
        "by_class": [f"data.path={tmp_path / 'train.csv'}", "data.class_weight=balanced"],
        "by_row": [f"data.path={tmp_path / 'weighted.csv'}", "data.sample_weight=w"],
        "unweighted": [f"data.path={tmp_path / 'weighted.csv'}", "data.features=[age,sex,bmi,bp,s1,s2,s3,s4,s5,s6]"],
    }
    histories = {}
    for name, extra in runs.items():
        overrides = [*common, *extra, f"tracking.run_name={name}"]
        cfg = compose_cfg(overrides)
        train(cfg, overrides=overrides, output_dir=tmp_path / name)
        histories[name] = _loss_history(str(cfg.tracking.uri), name)
    assert len(histories["by_row"]) == 200
    assert histories["by_row"] == histories["by_class"]
    assert histories["by_row"] != histories["unweighted"]  # the column is a weight, not ignored (nor a feature)


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("-1", "data.sample_weight column 'w', row 3 holds -1; a weight must be a finite number >= 0: fix the cell"),
        ("", "data.sample_weight column 'w', row 3 is empty; a weight must be a finite number >= 0"),
        ("heavy", "data.sample_weight column 'w', row 3 holds 'heavy'; a weight must be a finite number >= 0"),
    ],
)
def test_a_bad_weight_is_one_line_naming_the_row(tmp_path, cell, message):
    rows = ["a,y,w", "1,0,1", "2,1,2", f"3,0,{cell}", "4,1,1"]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(TrainerError) as e:
        csv(**option_kwargs("data", "csv", path=str(tmp_path / "t.csv"), target="y", sample_weight="w"))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sample_weight_settings_that_cannot_work_are_one_line(tmp_path, compose_cfg):
    (tmp_path / "t.csv").write_text("a,y,w\n" + "".join(f"{i},{i % 2},0\n" for i in range(40)))
    kw = option_kwargs("data", "csv", path=str(tmp_path / "t.csv"), target="y")
    for changes, message in (
        ({"sample_weight": "weight"}, "no column 'weight'; columns are a, y, w"),
        ({"sample_weight": "w", "features": ["a", "w"]}, "column 'w' is data.sample_weight and a feature or target"),
        ({"sample_weight": "w", "in_memory": "false"}, "data.sample_weight needs the table held in memory"),
    ):
        with pytest.raises(TrainerError) as e:
            csv(**{**kw, **changes})
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    overrides = ["data=csv", f"data.path={tmp_path / 't.csv'}", "data.target=y", "data.sample_weight=w"]
    with pytest.raises(TrainerError, match=r"data\.sample_weight: every weight of the training split is 0"):
        train(compose_cfg([*overrides, "trainer.max_steps=2"]), output_dir=tmp_path / "zero")
    with pytest.raises(TrainerError, match=r"data\.sample_weight needs a loss that takes sample_weight; loss my\.loss"):
        require_sample_weight(lambda y_true, y_pred: y_pred, "data.sample_weight", "my.loss")
