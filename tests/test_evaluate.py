"""trainer.evaluate and log_model against real training runs in a real MLflow SQLite store."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import mlflow.pyfunc
import numpy as np
import pytest
from mlflow.artifacts import download_artifacts
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from conftest import compose_config, new_store
from trainer import evaluate as ev
from trainer.config import TrainerError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SMALL = ["data.n_samples=256", "trainer.max_steps=30", "trainer.progress=false", "model.hidden=[8]"]
VAL_EXAMPLES = round(256 * 0.2)


@dataclass
class Store:
    uri: str
    client: MlflowClient
    regression_id: str
    classifier_id: str
    tmp: Path


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_template) -> Store:
    from trainer.train import train

    tmp = tmp_path_factory.mktemp("evaluate")
    uri = new_store(tmp, mlflow_template)
    client = MlflowClient(uri)
    exp_id = client.create_experiment("tape-trainer", artifact_location=str(tmp / "artifacts"))  # not ./mlruns
    jobs = {
        "reg": ["model=mlp", "optimizer.lr=0.01"],
        "clf": ["model=classifier", "data=classification", "loss=categorical_crossentropy", "optimizer.lr=0.01"],
    }
    ids = {}
    for name, overrides in jobs.items():
        overrides = [*overrides, f"tracking.run_name={name}"]
        train(compose_config([f"tracking.uri={uri}", *SMALL, *overrides]), overrides=overrides, output_dir=tmp / name)
        [run] = client.search_runs([exp_id], f"attributes.run_name = '{name}'")
        ids[name] = run.info.run_id
    yield Store(uri, client, ids["reg"], ids["clf"], tmp)
    mlflow.set_tracking_uri(None)


def test_reproduces_the_runs_final_val_loss_and_differs_on_other_data(store):
    logged = store.client.get_run(store.regression_id).data.metrics["val/loss"]
    report = ev.evaluate(run_id=store.regression_id, uri=store.uri)
    assert report["model"].startswith("models:/") and report["split"] == "validation"  # the MLflow-flavoured model
    assert report["examples"] == VAL_EXAMPLES and "accuracy" not in report
    assert report["loss"] == logged and report["logged_loss"] == logged  # one arithmetic (trainer.metrics): equal
    other = ev.evaluate(run_id=store.regression_id, uri=store.uri, overrides=["data.seed=5"])
    assert math.isfinite(other["loss"]) and abs(other["loss"] - logged) > 1e-3 * logged
    bigger = ev.evaluate(run_id=store.regression_id, uri=store.uri, overrides=["data.seed=5", "data.n_samples=1000"])
    assert bigger["examples"] == 200


def test_classifier_by_run_name_reproduces_loss_and_accuracy(store):
    metrics = store.client.get_run(store.classifier_id).data.metrics
    report = ev.evaluate(run_name="clf", uri=store.uri)
    assert report["run_id"] == store.classifier_id
    assert report["loss"] == metrics["val/loss"]
    assert report["accuracy"] == metrics["val/accuracy"]


def test_split_all_scores_every_row_with_every_metric(store, capsys):
    """`split=all`: the whole data (here the run's own 256 rows), no split made, with every metric the task logs.
    Its loss, over 5x the rows, differs from the validation split's; `logged_loss` has nothing to compare."""
    whole = ev.evaluate(run_name="clf", uri=store.uri, split="all")
    val = ev.evaluate(run_name="clf", uri=store.uri)
    assert whole["split"] == "all" and whole["examples"] == 256 and val["examples"] == VAL_EXAMPLES
    assert {"loss", "accuracy"} <= set(whole) and whole["logged_loss"] is None
    assert math.isfinite(whole["loss"]) and whole["loss"] != val["loss"] and 0 < whole["accuracy"] <= 1
    assert ev.main([f"uri={store.uri}", "run_name=clf", "split=all"]) == 0
    out = capsys.readouterr().out
    assert "all (256 examples)" in out and "accuracy" in out
    assert ev.main([f"uri={store.uri}", "run_name=clf", "split=some"]) == 1


def test_cli_json_table_and_errors(store, capsys):
    args = [f"uri={store.uri}", f"run_id={store.regression_id}", "data.n_samples=300", "format=json"]
    assert ev.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 60 and report["overrides"] == ["data.n_samples=300"]
    assert ev.main([f"uri={store.uri}", "run_name=clf"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "(none: the run's own data)" in out
    failures = [
        (["run_name=clf", "data.sed=1"], "data.sed: no such key"),
        (["run_name=clf", "~data.nope"], "~data.nope: no such key"),
        (["run_name=clf", "data=csv"], "cannot switch a config group"),
        (["run_id=nope"], "no run 'nope'"),
        (["run_name=absent"], "no run named 'absent'"),
        (["data.seed=1", "format=json"], "say which model"),
        (["run_name=clf", "run_id=x"], "already picked"),
        (["run_name=clf", "--verbose"], "unknown option"),
    ]
    for args, message in failures:
        assert ev.main([f"uri={store.uri}", *args]) == 1, args
        assert message in capsys.readouterr().err, args


def test_overrides_on_the_logged_config():
    cfg = OmegaConf.create({"data": {"seed": 0, "n_samples": 10, "path": "a.csv"}})
    cfg = ev.apply_overrides(cfg, ["data.seed=3", "+data.extra=[1,2]", "~data.path"])
    assert OmegaConf.to_container(cfg) == {"data": {"seed": 3, "n_samples": 10, "extra": [1, 2]}}


@pytest.fixture(scope="module")
def logged(store) -> tuple[str, str, keras.Model, np.ndarray]:
    """(run id, model URI, the Keras model, its validation inputs): a run holding config.yaml and an MLflow
    model logged with log_model, which is what train.py logs once it calls log_model."""
    model_path, config_path = (
        download_artifacts(run_id=store.regression_id, artifact_path=path, tracking_uri=store.uri)
        for path in ("model/model.keras", "config.yaml")
    )
    model = keras.saving.load_model(model_path, compile=False)
    from trainer.data.prepare import load

    x = load(OmegaConf.load(config_path).data).x_val  # the run's own validation inputs
    mlflow.set_tracking_uri(store.uri)
    with mlflow.start_run(experiment_id=store.client.get_experiment_by_name("tape-trainer").experiment_id) as run:
        mlflow.log_artifact(config_path)
        t0 = time.perf_counter()
        uri = ev.log_model(model, input_example=x[:2])
        print(f"log_model: {time.perf_counter() - t0:.2f} s")
    return run.info.run_id, uri, model, x


def test_log_model_round_trips_through_mlflows_loaders_and_evaluate_prefers_it(store, logged):
    run_id, uri, model, x = logged
    expected = np.asarray(model(x, training=False))
    loaded = mlflow.pyfunc.load_model(uri)
    np.testing.assert_allclose(np.asarray(loaded.unwrap_python_model().keras_model(x)), expected, rtol=1e-6)
    np.testing.assert_allclose(loaded.predict(x), expected, rtol=1e-6)
    report = ev.evaluate(run_id=run_id, uri=store.uri)
    assert report["model"] == uri
    logged_loss = store.client.get_run(store.regression_id).data.metrics["val/loss"]
    assert report["loss"] == pytest.approx(logged_loss, rel=1e-5)
    with pytest.raises(RuntimeError, match="active MLflow run"):
        ev.log_model(model)


@pytest.mark.slow
def test_logged_model_loads_in_a_fresh_process_without_importing_trainer(store, logged):
    """What the flavour choice is for: MLflow's loader alone finds the model's registered classes."""
    _, uri, model, x = logged
    script = (
        "import sys, numpy as np, mlflow; mlflow.set_tracking_uri(sys.argv[1]); "
        "np.save(sys.argv[3], mlflow.pyfunc.load_model(sys.argv[2]).predict(np.load(sys.argv[3])))"
    )
    np.save(store.tmp / "x.npy", x)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", script, store.uri, uri, str(store.tmp / "x.npy")],
        cwd=store.tmp, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(np.load(store.tmp / "x.npy"), np.asarray(model(x, training=False)), rtol=1e-6)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.n_samples=-5", "data.n_samples=-5 is invalid: expected an integer >= 2"),
        ("data.seed=abc", "data.seed: Value 'abc' of type 'str' could not be converted to Integer"),
        ("~data.seed", "data.seed must be set (e.g. data.seed=...)"),
        ("+data.bogus=1", "data.bogus: Key 'bogus' not in 'RegressionData'"),
    ],
)
def test_overrides_are_checked_as_training_checks_them(store, override, message):
    """The run's config with your overrides meets the option's schema, as a composed config does: before, the
    builder's own words ("negative dimensions are not allowed", "SeedSequence expects int") named no key."""
    with pytest.raises(TrainerError) as raised:
        ev.evaluate(run_id=store.regression_id, uri=store.uri, overrides=[override])
    assert str(raised.value) == message
