"""The model a team ships: registered versions (tracking.register_model), `trainer evaluate model=models:/...`,
MLflow's pyfunc on what users hold (float64 arrays, DataFrames; class probabilities and labels out), and
`mlflow models serve` answering as the model does in process. Real training runs, a real SQLite store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import compose_config, new_store, run_cli
from trainer import evaluate as ev
from trainer.config import TrainerError

SMALL = ["trainer.max_steps=30", "trainer.progress=false", "model=mlp", "model.hidden=[8]", "optimizer.lr=0.01"]
COLUMNS = ["f0", "f1", "f2", "f3"]
CLASSES = {"binary": ["cat", "dog"], "multiclass": ["blue", "green", "red"]}  # sorted: the class ids' order


@dataclass
class Store:
    uri: str
    client: MlflowClient
    runs: dict[str, str]  # run name -> run id
    tmp: Path


def _table(path: Path, names: list[str], n: int = 240, seed: int = 0) -> pd.DataFrame:
    """Four float columns and a string label that depends on them: a CSV as a user writes it."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(COLUMNS)))
    ids = np.digitize(x[:, 0] + 0.5 * x[:, 1], np.linspace(-1, 1, len(names) + 1)[1:-1])
    frame = pd.DataFrame(x, columns=COLUMNS).assign(kind=np.asarray(names)[ids])
    frame.to_csv(path, index=False)
    return frame


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_template) -> Store:
    from trainer.train import train

    tmp = tmp_path_factory.mktemp("registry")
    uri = new_store(tmp, mlflow_template)
    client = MlflowClient(uri)
    client.create_experiment("tape-trainer", artifact_location=str(tmp / "artifacts"))
    csv = ["data=csv", "data.target=kind"]
    jobs = {
        "reg_a": ["data.n_samples=256", "tracking.register_model=tiny"],
        "reg_b": ["data.n_samples=256", "data.seed=1", "tracking.register_model=tiny"],
        "binary": [*csv, f"data.path={tmp / 'binary.csv'}", "loss=binary_crossentropy"],
        "multiclass": [*csv, f"data.path={tmp / 'multiclass.csv'}", "loss=sparse_categorical_crossentropy"],
    }
    for task in CLASSES:
        _table(tmp / f"{task}.csv", CLASSES[task])
    runs = {}
    for name, overrides in jobs.items():
        overrides = [*SMALL, *overrides, f"tracking.run_name={name}"]
        train(compose_config([f"tracking.uri={uri}", *overrides]), overrides=overrides, output_dir=tmp / name)
        [run] = client.search_runs(client.get_experiment_by_name("tape-trainer").experiment_id,
                                   f"attributes.run_name = '{name}'")  # fmt: skip
        runs[name] = run.info.run_id
    mlflow.set_tracking_uri(uri)
    yield Store(uri, client, runs, tmp)
    mlflow.set_tracking_uri(None)


def test_two_runs_register_versions_1_and_2_with_a_signature_and_an_example(store):
    versions = {int(v.version): v for v in store.client.search_model_versions("name = 'tiny'")}
    assert sorted(versions) == [1, 2]
    assert (versions[1].run_id, versions[2].run_id) == (store.runs["reg_a"], store.runs["reg_b"])
    info = mlflow.models.get_model_info("models:/tiny/1")
    assert info.signature.inputs is None  # a table's columns are checked by the pyfunc itself (extras refused)
    assert info.signature.outputs is not None
    assert info.saved_input_example_info is not None
    unregistered = store.client.search_model_versions(f"run_id = '{store.runs['binary']}'")
    assert unregistered == []  # tracking.register_model null (the default): logged, not registered


def test_evaluate_a_registered_version_reproduces_its_runs_val_loss(store, capsys):
    for version, name in ((1, "reg_a"), (2, "reg_b")):
        report = ev.evaluate(model=f"models:/tiny/{version}", uri=store.uri)
        assert report["run_id"] == store.runs[name]
        assert report["model"] == f"models:/tiny/{version}"
        logged = store.client.get_run(store.runs[name]).data.metrics["val/loss"]
        assert report["loss"] == pytest.approx(logged, rel=1e-5)
    failures = [
        (["model=models:/tiny/9"], f"error: model=models:/tiny/9: no such registered model version in {store.uri}"),
        (["model=tiny/1"], "error: model=tiny/1: expected models:/<name>/<version> or models:/<name>@<alias>"),
        (
            ["model=models:/tiny/1", "run_id=x"],
            "error: run_id=x and model=models:/tiny/1: the model is already picked by one; give one",
        ),
    ]
    for args, line in failures:
        assert ev.main([f"uri={store.uri}", *args]) == 1, args
        assert capsys.readouterr().err == line + "\n", args


def test_pyfunc_takes_float64_arrays_and_dataframes_and_prints_no_progress_bar(store, capfd):
    import keras

    model = mlflow.pyfunc.load_model("models:/tiny/1")
    x64 = np.random.default_rng(3).normal(size=(50, 8))
    keras_model = keras.saving.load_model(
        mlflow.artifacts.download_artifacts(f"runs:/{store.runs['reg_a']}/model/model.keras"), compile=False
    )
    expected = np.asarray(keras_model(x64.astype(np.float32), training=False))
    capfd.readouterr()
    outputs = [model.predict(x64), model.predict(x64.astype(np.float32)), model.predict(pd.DataFrame(x64))]
    for out in outputs:
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    printed = capfd.readouterr()
    assert "step" not in printed.out + printed.err  # Keras' bar: "2/2 ━━━━ 0s 3ms/step"


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_a_classifiers_pyfunc_gives_class_probabilities_and_the_label(store, task):
    import keras

    frame = _table(store.tmp / f"{task}-new.csv", CLASSES[task], n=60, seed=7)[COLUMNS]
    out = mlflow.pyfunc.load_model(f"runs:/{store.runs[task]}/model").predict(frame)
    names = CLASSES[task]
    assert list(out.columns) == [*names, "label"] and len(out) == 60
    np.testing.assert_allclose(out[names].sum(axis=1), 1, atol=1e-6)
    assert ((out[names] >= 0) & (out[names] <= 1)).all().all()
    assert list(out["label"]) == [names[i] for i in out[names].to_numpy().argmax(axis=1)]
    keras_model = keras.saving.load_model(
        mlflow.artifacts.download_artifacts(f"runs:/{store.runs[task]}/model/model.keras"), compile=False
    )
    logits = np.asarray(keras_model(frame.to_numpy(np.float32), training=False))
    ids = (logits[:, 0] > 0).astype(int) if task == "binary" else logits.argmax(axis=1)
    assert list(out["label"]) == [names[i] for i in ids]  # the model's own decision, named
    assert out["label"].nunique() > 1  # a trained model, not a constant


def test_register_model_needs_a_name_and_log_model():
    from trainer.config import check

    for overrides, line in [
        (["tracking.register_model=x", "tracking.log_model=false"],
         "tracking.register_model='x' is invalid: expected null unless tracking.log_model=true"),
        (["tracking.register_model=' '"], "tracking.register_model=' ' is invalid: expected a model name, or null"),
    ]:  # fmt: skip
        with pytest.raises(TrainerError) as info:
            check(compose_config(overrides))
        assert str(info.value) == line


# --- serving -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 60) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _wait_for_ping(url: str, proc: subprocess.Popen, log: Path, limit_s: float = 120) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no /ping answer in {limit_s} s: {log.read_text()[-3000:]}")


@pytest.mark.slow
def test_mlflow_models_serve_answers_as_the_model_does_in_process(tmp_path, mlflow_template):
    frame = _table(tmp_path / "train.csv", CLASSES["multiclass"])
    uri = new_store(tmp_path, mlflow_template)
    proc = run_cli([*SMALL, "data=csv", f"data.path={tmp_path / 'train.csv'}", "data.target=kind",
                    "loss=sparse_categorical_crossentropy", f"tracking.uri={uri}", "hydra.run.dir=run"],
                   tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [run] = MlflowClient(uri).search_runs(MlflowClient(uri).get_experiment_by_name("tape-trainer").experiment_id)
    model_uri = f"runs:/{run.info.run_id}/model"
    rows = frame[COLUMNS].iloc[:25]
    mlflow.set_tracking_uri(uri)
    try:
        expected = mlflow.pyfunc.load_model(model_uri).predict(rows)
    finally:
        mlflow.set_tracking_uri(None)
    port, log = _free_port(), tmp_path / "serve.log"
    bin_dir = Path(sys.executable).parent  # the server execs `uvicorn` by name: the venv's, on PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    mlflow_exe = bin_dir / "mlflow"
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(mlflow_exe), "models", "serve", "-m", model_uri, "--env-manager", "local", "-p", str(port),
             "-h", "127.0.0.1"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        started = _wait_for_ping(f"http://127.0.0.1:{port}/ping", server, log)
        answer = _post(f"http://127.0.0.1:{port}/invocations", {"dataframe_split": rows.to_dict(orient="split")})
        print(f"mlflow models serve: /ping after {started:.1f} s")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
    served = pd.DataFrame(answer["predictions"])
    assert list(served.columns) == [*CLASSES["multiclass"], "label"]
    assert list(served["label"]) == list(expected["label"])
    np.testing.assert_allclose(served[CLASSES["multiclass"]], expected[CLASSES["multiclass"]], rtol=1e-6)


def test_a_version_whose_source_is_not_its_runs_own_model_is_refused(store, capsys):
    """`create_model_version` takes any source: a version naming run reg_a but pointing at reg_b's model (or any
    directory) was evaluated under reg_a's name and config (loss 2.68 where reg_a's model gives 0.067)."""
    client, run_a, run_b = store.client, store.runs["reg_a"], store.runs["reg_b"]
    theirs = mlflow.models.get_model_info("models:/tiny/2").model_uri  # reg_b's logged model: models:/m-...
    b_model = client.get_logged_model(theirs.removeprefix("models:/"))
    by_id = client.create_model_version("tiny", source=theirs, run_id=run_a)
    by_path = client.create_model_version("tiny", source=b_model.artifact_location, run_id=run_a)
    elsewhere = client.create_model_version("tiny", source=str(store.tmp / "elsewhere"), run_id=run_a)
    expected = {
        by_id.version: f"its logged model {b_model.model_id} belongs to run {run_b}, not run {run_a}'s own",
        by_path.version: f"its source {b_model.artifact_location} is outside the run's artifacts",
        elsewhere.version: f"its source {store.tmp / 'elsewhere'} is outside the run's artifacts",
    }
    try:
        for version, reason in expected.items():
            assert ev.main([f"uri={store.uri}", f"model=models:/tiny/{version}"]) == 1
            err = capsys.readouterr().err
            assert err.startswith(f"error: model=models:/tiny/{version}: ") and reason in err, err
            assert err.count("\n") == 1
        assert ev.evaluate(model="models:/tiny/1", uri=store.uri)["run_id"] == run_a  # its own: still evaluated
    finally:
        for version in expected:
            client.delete_model_version("tiny", version)


def test_the_pyfunc_refuses_nan_and_infinity_as_a_bad_request(store):
    """Before: `mlflow models serve` answered NaN and Infinity inputs with 200 and a label."""
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model("models:/tiny/1")
    good = np.zeros((2, 8))
    assert np.isfinite(np.asarray(model.predict(good))).all()
    for value, shown in ((np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf")):
        bad = good.copy()
        bad[1, 5] = value
        with pytest.raises(MlflowException, match=f"input row 1, column 5 is {shown}: the model takes finite") as e:
            model.predict(pd.DataFrame(bad))
        assert e.value.get_http_status_code() == 400  # what the scoring server answers


def test_the_pyfunc_refuses_a_column_count_it_does_not_take_and_takes_int64(store):
    """Before: 10 columns sent to the 8-column model got 200 and a label (MLflow kept the first 8), and int64
    columns (what pandas reads for whole numbers) were refused: `Can not safely convert int64 to float64`."""
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model("models:/tiny/1")
    rows = np.arange(16, dtype=np.int64).reshape(2, 8)
    as_float = np.asarray(model.predict(pd.DataFrame(rows.astype(np.float64))))
    np.testing.assert_array_equal(np.asarray(model.predict(pd.DataFrame(rows))), as_float)
    for columns in (10, 7):
        with pytest.raises(MlflowException, match=f"input has {columns} columns: the model takes rows of 8 columns"):
            model.predict(pd.DataFrame(np.zeros((2, columns))))
    with pytest.raises(MlflowException, match="input is not numeric") as e:
        model.predict(pd.DataFrame([["a"] * 8]))
    assert e.value.get_http_status_code() == 400
