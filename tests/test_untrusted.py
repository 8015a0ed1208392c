"""Run data is data: resume and evaluate never run code that a run directory or a tracking store holds.

Every payload here would create a file (`marker`) if it ran; each test asserts the file is never created,
and that the refusal is one line naming the target and the key that allows it. Real training runs, a real
SQLite store, the real CLIs.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import MISSING, OmegaConf

from conftest import compose_config, new_store, option_kwargs
from trainer import evaluate as ev
from trainer.config import Config, TrainerError
from trainer.train import train

TINY = ["trainer.progress=false", "data.n_samples=64", "trainer.max_steps=4"]
USER_MODULE = "trusted_data"  # "the user's own code": a data function that leaves a mark when built
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def touch(marker: Path) -> dict:
    """A config node that creates `marker` when Hydra instantiates it."""
    return {"_target_": "pathlib.Path.touch", "_args_": [str(marker)]}


def user_data(marker: Path) -> dict:
    """The run's own data config, built by the user's module instead of trainer.data (same data)."""
    kwargs = option_kwargs("data", "regression", n_samples=64, val_fraction=0.2)
    return {"_target_": f"{USER_MODULE}.regression", "marker": str(marker), **kwargs}


@pytest.fixture(scope="session")
def user_code(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("user_code")
    (directory / f"{USER_MODULE}.py").write_text(
        textwrap.dedent("""
            from pathlib import Path

            import trainer.data


            def regression(marker, **kwargs):
                Path(marker).touch()  # proof that it was built
                return trainer.data.regression(**kwargs)
        """)
    )
    return directory


@pytest.fixture
def importable(user_code, monkeypatch) -> Path:
    monkeypatch.syspath_prepend(str(user_code))
    return user_code


def store_in(directory: Path, template: Path) -> str:
    uri = new_store(directory, template)
    MlflowClient(uri).create_experiment("tape-trainer", artifact_location=str(directory / "artifacts"))  # not ./mlruns
    return uri


def trained(directory: Path, uri: str, *overrides: str) -> Path:
    """A finished 4-step run; returns its checkpoints directory (run.json inside)."""
    train(compose_config([f"tracking.uri={uri}", *TINY, *overrides]), output_dir=directory)
    return directory / "checkpoints"


def edit_run_file(checkpoints: Path, **config: object) -> dict:
    record = json.loads((checkpoints / "run.json").read_text())
    record["config"].update(config)
    (checkpoints / "run.json").write_text(json.dumps(record))
    return record


def resume(target: str | Path, uri: str, *overrides: str) -> float:
    cfg = compose_config([f"tracking.uri={uri}", "trainer.progress=false", f"resume={target}", *overrides])
    return train(cfg, overrides=[f"resume={target}", *overrides])


def cli_result(proc: subprocess.CompletedProcess[str]) -> tuple[int, str]:
    return proc.returncode, proc.stderr


def refusal(call) -> str:
    with pytest.raises(TrainerError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def one_line_error(code: int, stderr: str) -> str:
    """The CLI's refusal: exit status 1 and one `error:` line (MLflow's download bars aside), no traceback."""
    assert code == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


# --- the key ------------------------------------------------------------------------------------
def test_the_key_defaults_to_nothing_and_builtins_come_from_conf():
    from trainer.config import builtin_targets

    assert compose_config([]).trusted_targets == [] and Config().trusted_targets == MISSING  # one home: the YAML
    shipped = {"trainer.models.MLP", "trainer.losses.mse", "trainer.data.csv", "keras.optimizers.SGD"}
    assert shipped <= builtin_targets() and "pathlib.Path.touch" not in builtin_targets()


# --- resume=<dir> -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory, mlflow_template) -> tuple[Path, str]:
    """One finished run, copied by each refusal test (which never reaches its store)."""
    directory = tmp_path_factory.mktemp("finished")
    uri = store_in(directory, mlflow_template)
    return trained(directory / "run", uri, "tracking.log_model=false"), uri


def escaped(marker: Path) -> str:
    return '\\${oc.create:"{_target_: pathlib.Path.touch, _args_: [' + str(marker) + ']}"}'


@pytest.mark.parametrize(
    ("plant", "named"),
    [
        (lambda m: {"data": touch(m)}, "data._target_='pathlib.Path.touch'"),
        (lambda m: {"model": {"_target_": "trainer.models.Linear", "w_init": touch(m)}}, "model.w_init._target_"),
        (lambda m: {"loss": {"_target_": "trainer.losses.mse", "_partial_": True, "_args_": [touch(m)]}},
         "loss._args_.0._target_='pathlib.Path.touch'"),
        (lambda m: {"data": {"_target_": "builtins.exec", "_args_": [f"open({str(m)!r}, 'w').close()"]}},
         "data._target_='builtins.exec'"),
        (lambda m: {"data": '${oc.create:"{_target_: pathlib.Path.touch, _args_: [' + str(m) + ']}"}'},
         "data._target_='pathlib.Path.touch'"),  # a target made by a resolver is checked as resolved
        (lambda m: {"data": touch(m), "trusted_targets": ["pathlib.*"]}, "data._target_"),  # the run can't allow
        (lambda m: {"data": user_data(m)}, f"data._target_='{USER_MODULE}.regression'"),  # importable, not named
        (lambda m: {"data": escaped(m)}, "data is still an interpolation once resolved"),
        (lambda m: {"data": "${evil:x}"}, "Unsupported interpolation type evil"),  # unregistered resolver
        (lambda m: {"step": touch(m)}, "step._target_='pathlib.Path.touch'"),  # a step is a target like any other
        (lambda m: {"step": {"_target_": "trainer.steps.GAN", "generator": touch(m)}}, "step.generator._target_"),
    ],
    ids=["data", "nested", "args", "exec", "resolver", "own_key", "user_module", "escaped", "custom_resolver", "step",
         "step_nested"],
)  # fmt: skip
def test_resume_dir_refuses_targets_from_run_data(finished, tmp_path, importable, plant, named):
    checkpoints, uri = finished
    copy = shutil.copytree(checkpoints, tmp_path / "checkpoints")
    marker = tmp_path / "marker"
    edit_run_file(copy, **plant(marker))
    message = refusal(lambda: resume(copy, uri))
    assert not marker.exists()
    assert message.startswith(f"resume: {copy / 'run.json'}: ") and named in message
    if "_target_=" in named:
        target = named.rsplit("=", 1)[1].strip("'")
        assert message.endswith(f"allow it with trusted_targets=[{target}]")


@pytest.mark.parametrize(
    "allow",
    [f"trusted_targets=[{USER_MODULE}.regression]", "trusted_targets=[trusted_*]",
     f"data._target_={USER_MODULE}.regression"],  # the user's own config names it
    ids=["exact", "pattern", "own_config"],
)  # fmt: skip
def test_resume_dir_builds_what_the_user_allows(tmp_path, mlflow_template, importable, allow):
    uri = store_in(tmp_path, mlflow_template)
    checkpoints = trained(tmp_path / "run", uri, "tracking.log_model=false")
    record = edit_run_file(checkpoints, data=user_data(tmp_path / "marker"))
    # the data settings changed (the user's source, its marker): a resume takes that only when told (issue 24)
    assert np.isfinite(resume(tmp_path / "run", uri, "trainer.max_steps=6", allow, "accept_changed_data=true"))
    assert (tmp_path / "marker").exists()
    client = MlflowClient(uri)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(6))


@pytest.mark.slow  # ~10-35 s on 2 cores: the fast suite's time (the slow suite runs it)
def test_cli_resume_dir_with_a_payload_exits_1_with_one_line(finished, tmp_path, run_cli):
    checkpoints, _ = finished
    copy = shutil.copytree(checkpoints, tmp_path / "checkpoints")
    edit_run_file(copy, data=touch(tmp_path / "marker"))
    error = one_line_error(*cli_result(run_cli([f"resume={copy}"], cwd=tmp_path)))
    assert not (tmp_path / "marker").exists()
    assert error == (
        f"error: resume: {copy / 'run.json'}: data._target_='pathlib.Path.touch' is not built in and not named by "
        "your own config or command line; if you trust where it comes from, allow it with "
        "trusted_targets=[pathlib.Path.touch]"
    )


# --- resume=<run id> ----------------------------------------------------------------------------
@pytest.fixture
def two_runs(tmp_path, mlflow_template) -> tuple[str, str, Path, Path]:
    """(store, run id of A, A's checkpoints, B's checkpoints): two finished runs in one store."""
    uri = store_in(tmp_path, mlflow_template)
    a = trained(tmp_path / "a", uri, "tracking.log_model=false")
    b = trained(tmp_path / "b", uri, "tracking.log_model=false")
    return uri, json.loads((a / "run.json").read_text())["run_id"], a, b


def point_tag(uri: str, run_id: str, directory: Path) -> None:
    MlflowClient(uri).set_tag(run_id, "checkpoint_dir", str(directory))


def test_resume_run_id_refuses_a_directory_the_run_did_not_write(two_runs, tmp_path):
    uri, a_id, _, b = two_runs
    b_id = edit_run_file(b, data=touch(tmp_path / "marker"))["run_id"]
    point_tag(uri, a_id, b)  # someone with write access to the store repoints A at B's directory
    message = refusal(lambda: resume(a_id, uri))
    assert not (tmp_path / "marker").exists()
    assert f"whose run.json is run {b_id} in {uri}, not this run in {uri}" in message
    assert message.endswith("refusing a directory the run did not write")

    forged = shutil.copytree(b, tmp_path / "forged")  # a run.json that claims to be A's, in another store
    record = json.loads((forged / "run.json").read_text())
    record.update(run_id=a_id, tracking_uri=f"sqlite:///{tmp_path / 'other.db'}")
    (forged / "run.json").write_text(json.dumps(record))
    point_tag(uri, a_id, forged)
    assert "refusing a directory the run did not write" in refusal(lambda: resume(a_id, uri))

    record["tracking_uri"] = uri  # A's id and store: the tie holds, and the targets are still checked
    (forged / "run.json").write_text(json.dumps(record))
    assert "data._target_='pathlib.Path.touch'" in refusal(lambda: resume(a_id, uri))
    assert not (tmp_path / "marker").exists()


@pytest.mark.slow  # ~10-35 s on 2 cores: the fast suite's time (the slow suite runs it)
def test_cli_resume_run_id_with_a_foreign_directory_exits_1_with_one_line(two_runs, tmp_path, run_cli):
    uri, a_id, _, b = two_runs
    edit_run_file(b, data=touch(tmp_path / "marker"))
    point_tag(uri, a_id, b)
    error = one_line_error(*cli_result(run_cli([f"tracking.uri={uri}", f"resume={a_id}"], cwd=tmp_path)))
    assert not (tmp_path / "marker").exists()
    assert error.startswith(f"error: resume='{a_id}': the run's checkpoint_dir tag names {b}, whose run.json is run ")


def test_resume_run_id_of_the_runs_own_directory_still_works(two_runs):
    uri, a_id, _, _ = two_runs
    assert np.isfinite(resume(a_id, uri, "trainer.max_steps=5"))
    assert MlflowClient(uri).get_run(a_id).data.tags["resumed_at_step"] == "4"


# --- trainer.evaluate ---------------------------------------------------------------------------
@dataclass
class Logged:
    uri: str
    client: MlflowClient
    run_id: str  # a trained run: config.yaml, model/model.keras and an MLflow model
    config: dict
    keras_file: Path
    tmp: Path


@pytest.fixture(scope="module")
def logged(tmp_path_factory, mlflow_template) -> Logged:
    tmp = tmp_path_factory.mktemp("evaluate")
    uri = store_in(tmp, mlflow_template)
    checkpoints = trained(tmp / "run", uri, "model=mlp", "model.hidden=[8]")
    record = json.loads((checkpoints / "run.json").read_text())
    config = OmegaConf.to_container(OmegaConf.create(record["config"]), resolve=True)
    return Logged(uri, MlflowClient(uri), record["run_id"], config, tmp / "run" / "model.keras", tmp)


def log_run(logged: Logged, config_text: str, keras_file: Path | None = None) -> str:
    """A run holding `config_text` as its config.yaml and, optionally, `keras_file` as model/model.keras."""
    mlflow.set_tracking_uri(logged.uri)
    with mlflow.start_run(experiment_id=logged.client.get_experiment_by_name("tape-trainer").experiment_id) as run:
        mlflow.log_text(config_text, "config.yaml")
        if keras_file is not None:
            mlflow.log_artifact(str(keras_file), "model")
    return run.info.run_id


def with_data(logged: Logged, data: object) -> str:
    return OmegaConf.to_yaml(OmegaConf.create({**logged.config, "data": data}))


def evaluate_cli(logged: Logged, run_id: str, *args: str, capsys) -> tuple[int, str, str]:
    code = ev.main([f"uri={logged.uri}", f"run_id={run_id}", "format=json", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (lambda lg, m: with_data(lg, touch(m)), "data._target_='pathlib.Path.touch'"),
        (lambda lg, m: with_data(lg, user_data(m)), f"data._target_='{USER_MODULE}.regression'"),
        (lambda lg, m: OmegaConf.to_yaml(OmegaConf.create({**lg.config, "loss": {
            "_target_": "trainer.losses.mse", "_partial_": True, "_args_": [touch(m)]}})), "loss._args_.0._target_"),
        (lambda lg, m: f"data: !!python/object/apply:pathlib.Path.touch ['{m}']\n", "is not plain YAML"),
    ],
    ids=["data", "user_module", "args", "yaml_tag"],
)  # fmt: skip
def test_evaluate_refuses_targets_from_the_logged_config(logged, tmp_path, importable, capsys, config, named):
    marker = tmp_path / "marker"
    run_id = log_run(logged, config(logged, marker), logged.keras_file)
    code, _, err = evaluate_cli(logged, run_id, capsys=capsys)
    assert not marker.exists()
    error = one_line_error(code, err)
    assert error.startswith(f"error: run {run_id}'s config.yaml") and named in error
    if "_target_=" in named:
        assert error.endswith(f"allow it with trusted_targets=[{named.rsplit('=', 1)[1].strip(chr(39))}]")


@pytest.mark.parametrize(
    "allow",
    [f"trusted_targets=[{USER_MODULE}.regression]", f"data._target_={USER_MODULE}.regression"],
    ids=["key", "own_override"],
)
def test_evaluate_builds_what_the_user_allows(logged, tmp_path, importable, capsys, allow):
    marker = tmp_path / "marker"
    run_id = log_run(logged, with_data(logged, user_data(marker)), logged.keras_file)
    code, out, err = evaluate_cli(logged, run_id, allow, capsys=capsys)
    assert code == 0, err
    assert marker.exists()  # the user's function built the data: the same data as the run's own
    logged_loss = logged.client.get_run(logged.run_id).data.metrics["val/loss"]
    assert json.loads(out)["loss"] == pytest.approx(logged_loss, rel=1e-5)


@pytest.mark.slow  # ~10-35 s on 2 cores: the fast suite's time (the slow suite runs it)
def test_cli_evaluate_with_a_payload_exits_1_with_one_line(logged, tmp_path):
    run_id = log_run(logged, with_data(logged, touch(tmp_path / "marker")), logged.keras_file)
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.evaluate", f"uri={logged.uri}", f"run_id={run_id}"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    error = one_line_error(*cli_result(proc))
    assert not (tmp_path / "marker").exists()
    assert error.endswith("allow it with trusted_targets=[pathlib.Path.touch]")


class _Payload:
    """Unpickling it creates `marker`, as any pickle may run any code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def mlflow_model_dir(logged: Logged, run_id: str) -> Path:
    [model] = logged.client.search_logged_models(
        [logged.client.get_run(run_id).info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    return Path(model.artifact_location)


def test_evaluate_never_unpickles_what_mlflow_logged_beside_the_model(logged, tmp_path, capsys):
    pickled = mlflow_model_dir(logged, logged.run_id) / "python_model.pkl"
    assert pickled.is_file()  # MLflow's pyfunc logs the trainer's python model (KerasPyfunc) this way
    pickled.write_bytes(pickle.dumps(_Payload(tmp_path / "marker")))
    code, out, err = evaluate_cli(logged, logged.run_id, capsys=capsys)
    assert code == 0, err
    assert not (tmp_path / "marker").exists()
    report = json.loads(out)
    assert report["model"].startswith("models:/")  # the MLflow model's own .keras file, read by Keras
    assert report["loss"] == pytest.approx(logged.client.get_run(logged.run_id).data.metrics["val/loss"], rel=1e-5)


def test_evaluate_refuses_a_model_that_only_a_pickle_would_load(logged, tmp_path, capsys):
    model = keras.saving.load_model(logged.keras_file, compile=False)
    mlflow.set_tracking_uri(logged.uri)
    with mlflow.start_run(experiment_id=logged.client.get_experiment_by_name("tape-trainer").experiment_id) as run:
        mlflow.log_text(with_data(logged, logged.config["data"]), "config.yaml")
        ev.log_model(model)
    model_dir = mlflow_model_dir(logged, run.info.run_id)
    (model_dir / "artifacts" / "model.keras").unlink()
    (model_dir / "python_model.pkl").write_bytes(pickle.dumps(_Payload(tmp_path / "marker")))
    code, _, err = evaluate_cli(logged, run.info.run_id, capsys=capsys)
    assert not (tmp_path / "marker").exists()
    assert one_line_error(code, err).startswith(f"error: run {run.info.run_id} has no model in Keras' native format")


def test_evaluate_refuses_a_lambda_layer(logged, tmp_path, capsys):
    """Keras' safe_mode: a Lambda's Python bytecode is not deserialized, so it can never be called."""
    marker = tmp_path / "marker"
    inputs = keras.Input((8,))
    outputs = keras.layers.Lambda(lambda x, m=str(marker): (Path(m).touch(), x)[1])(inputs)
    keras.Model(inputs, keras.layers.Dense(1)(outputs)).save(tmp_path / "model.keras")
    marker.unlink(missing_ok=True)  # building the model called it once
    run_id = log_run(logged, with_data(logged, logged.config["data"]), tmp_path / "model.keras")
    code, _, err = evaluate_cli(logged, run_id, capsys=capsys)
    assert not marker.exists()
    assert one_line_error(code, err).startswith(f"error: run {run_id}'s model/model.keras cannot be loaded safely")
