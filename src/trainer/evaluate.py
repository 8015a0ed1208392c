"""Evaluate a logged run's model again, on its own data or on other data, from the run's logged config.

    python -m trainer.evaluate run_id=<id>                         # reproduces the run's final val/loss
    python -m trainer.evaluate run_name=<name> data.seed=3 data.n_samples=10000 --json
    python -m trainer.evaluate run_id=<id> uri=sqlite:///other.db '~data.n_samples' data._target_=...

The run's `config.yaml` is the starting point, so the data are rebuilt exactly as in training unless a
`key=value` (an OmegaConf dotlist entry) says otherwise; `+key=value` adds a key the config lacks and `~key`
removes one (Hydra's spelling). The model is the Keras-native `.keras` file of the run's MLflow model when
it has one (see `log_model`), else its `model/model.keras` artifact.

A tracking store is shared data, so nothing read from it runs code: the config's `data` and `loss` may
build only built-in targets, those your own `key=value`s name and those `trusted_targets=[...]` allows
(config.trusted_config), and the model loads with Keras' safe_mode, its classes found by registered name,
never through the pickles MLflow logs beside it. Also home of `log_model`, which the trainer calls to log
the model in MLflow's own format.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml
from mlflow.artifacts import download_artifacts
from mlflow.entities import LoggedModelStatus, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.config import TRUST_KEY, TrainerError, build, first_line, is_trusted, targets, trusted_config

DEFAULT_EXPERIMENT = "tape-trainer"
EVAL_BATCH = 1024  # as the trainer's own evaluation: max(batch_size, 1024) examples per forward pass
SELECTORS = ("run_id", "run_name")
USAGE = (
    "usage: python -m trainer.evaluate run_id=<id> | run_name=<name> [uri=<tracking uri>] "
    f"[experiment=<name, default {DEFAULT_EXPERIMENT}>] [{TRUST_KEY}=[module.name,...]] "
    "[key=value | +key=value | ~key ...] [--json]"
)
BUILT = ("data", "loss")  # the config nodes evaluate instantiates; the model comes from its .keras file


class EvaluateError(Exception):
    """A problem the user can fix (no such run, bad override): one line on stderr, exit status 1."""


@dataclass
class Request:
    """What the command line asked for; `overrides` are applied to the run's config in order."""

    run_id: str | None = None
    run_name: str | None = None
    uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    overrides: list[str] = field(default_factory=list)
    trusted_targets: list[str] = field(default_factory=list)  # targets the run's config may build, beyond ours
    as_json: bool = False


# --- the command line --------------------------------------------------------------------------
def parse_argv(argv: Sequence[str]) -> Request:
    """key=value by hand, as the trainer's own CLI reads: no flags to learn except --json."""
    req = Request()
    for arg in argv:
        key, eq, value = arg.partition("=")
        if arg == "--json":
            req.as_json = True
        elif arg.startswith("-"):
            raise EvaluateError(f"unknown option {arg!r}\n{USAGE}")
        elif key in SELECTORS and eq:
            if req.run_id or req.run_name:
                raise EvaluateError(f"{arg!r}: the run is already picked ({_picked(req)}); give one run_id/run_name")
            setattr(req, key, value)
        elif key in ("uri", "experiment") and eq:
            setattr(req, key, value)
        elif key == TRUST_KEY and eq:
            req.trusted_targets = _names(arg)
        elif eq or arg.startswith("~"):
            req.overrides.append(arg)
        else:
            raise EvaluateError(f"{arg!r} is not key=value\n{USAGE}")
    if not (req.run_id or req.run_name):
        raise EvaluateError(f"say which run: run_id=<id> or run_name=<name>\n{USAGE}")
    return req


def _picked(req: Request) -> str:
    return f"run_id={req.run_id}" if req.run_id else f"run_name={req.run_name}"


def _names(arg: str) -> list[str]:
    """`trusted_targets=[a.B,c.*]` (or one name) as the trainer's own command line spells a list."""
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([arg]))[TRUST_KEY]
    except (yaml.YAMLError, OmegaConfBaseException):
        value = None
    names = value if isinstance(value, list) else [value]
    if not all(isinstance(n, str) and n for n in names):
        raise EvaluateError(f"{arg!r}: expected a list of names, e.g. {TRUST_KEY}=[my_pkg.my_data,my_pkg.*]")
    return names


# --- the run, its config and its model ---------------------------------------------------------
def find_run(client: MlflowClient, run_id: str | None, run_name: str | None, experiment: str) -> Run:
    """By id, or the newest run of that name in `experiment` (names repeat; the latest is the one meant)."""
    if run_id:
        try:
            return client.get_run(run_id)
        except MlflowException:
            raise EvaluateError(f"no run {run_id!r} in {client.tracking_uri}") from None
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise EvaluateError(f"no experiment named {experiment!r} in {client.tracking_uri}")
    found = client.search_runs(
        [exp.experiment_id], f"attributes.run_name = '{run_name}'", max_results=1, order_by=["start_time DESC"]
    )
    if not found:
        raise EvaluateError(f"no run named {run_name!r} in experiment {experiment!r}")
    return found[0]


def run_config(run: Run, uri: str, overrides: Sequence[str], dst: Path) -> DictConfig:
    """The run's logged (resolved) config with the overrides applied on top: data, not yet checked."""
    try:
        path = download_artifacts(
            run_id=run.info.run_id, artifact_path="config.yaml", dst_path=str(dst), tracking_uri=uri
        )
    except (MlflowException, OSError):
        raise EvaluateError(
            f"run {run.info.run_id} has no config.yaml artifact: was it logged by the trainer?"
        ) from None
    try:
        cfg = OmegaConf.load(path)  # YAML's safe loader: a python/object tag is an error, not a call
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise EvaluateError(f"run {run.info.run_id}'s config.yaml is not plain YAML ({first_line(e)})") from None
    if not isinstance(cfg, DictConfig):
        raise EvaluateError(f"run {run.info.run_id}'s config.yaml is not a mapping: was it logged by the trainer?")
    return apply_overrides(cfg, overrides)


def named_by(overrides: Sequence[str]) -> set[str]:
    """Targets the user's own `key=value`s name (`data._target_=my.data`, `+loss={_target_:...}`)."""
    named = set()
    for override in overrides:
        key, eq, value = override.partition("=")
        if eq and not key.startswith("~"):
            with contextlib.suppress(yaml.YAMLError, OmegaConfBaseException):  # apply_overrides names it
                tree = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key.lstrip('+')}={value}"]))
                named.update(target for _, target in targets(tree))
    return named


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Dotlist entries on a plain config: a mistyped key is an error here, not a silently added key."""
    for override in overrides:
        if override.startswith("~"):
            _delete(cfg, override[1:].partition("=")[0])
            continue
        key, _, value = override.partition("=")
        current = OmegaConf.select(cfg, key.lstrip("+"), default=_ABSENT)
        if current is _ABSENT and not key.startswith("+"):
            raise EvaluateError(f"{key}: no such key in the run's config (add one with +{key}=...)")
        if isinstance(current, DictConfig):  # `data=classification`: a group choice, which needs Hydra's conf/
            raise EvaluateError(
                f"{override}: cannot switch a config group here; set its keys (data._target_=..., ~data.<key>)"
            )
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key.lstrip('+')}={value}"]))
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise EvaluateError(f"{override}: {str(e).splitlines()[0]}") from None
    return cfg


_ABSENT = object()


def _delete(cfg: DictConfig, key: str) -> None:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        raise EvaluateError(f"~{key}: no such key in the run's config")
    del parent[leaf]


def mlflow_model(client: MlflowClient, run: Run) -> tuple[str, str] | None:
    """(URI, artifact location) of the run's MLflow model: a logged model (MLflow 3) or an MLmodel under
    the run's artifacts (MLflow 2)."""
    run_id = run.info.run_id
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    if ready:
        best = next((m for m in ready if m.name == "model"), ready[0])
        return f"models:/{best.model_id}", best.artifact_location
    if any(a.path == "model/MLmodel" for a in client.list_artifacts(run_id, "model")):
        return f"runs:/{run_id}/model", f"runs:/{run_id}/model"
    return None


def load_run_model(client: MlflowClient, run: Run, uri: str, dst: Path, model_target: str | None) -> tuple[Any, str]:
    """(model, where it came from): a Keras-native `.keras` file, the MLflow model's own first, else the
    run's `model/model.keras` artifact. Never MLflow's loaders: mlflow.tensorflow's unpickles (cloudpickle)
    the custom objects logged beside the model, which is code. `model_target`, the run config's
    `model._target_` when trusted, is imported first so that a class of yours registers its name."""
    path, found = None, mlflow_model(client, run)
    if found is not None:
        source, location = found
        path = _keras_file(location, uri, dst)
    if path is None:
        source = "model/model.keras"
        try:
            path = Path(download_artifacts(run_id=run.info.run_id, artifact_path=source, dst_path=str(dst),
                                           tracking_uri=uri))  # fmt: skip
        except (MlflowException, OSError):
            raise EvaluateError(
                f"run {run.info.run_id} has no model in Keras' native format (its MLflow model's data/*.keras or "
                "a model/model.keras artifact); evaluate loads nothing else, as other formats unpickle code"
            ) from None
    if model_target:
        _import_module_of(model_target)
    return _load_keras(path, f"run {run.info.run_id}'s {source}"), source


def _keras_file(location: str, uri: str, dst: Path) -> Path | None:
    """The `.keras` file MLflow's tensorflow and keras flavours both keep under the model's `data/`."""
    from mlflow.artifacts import list_artifacts

    try:
        names = [Path(a.path).name for a in list_artifacts(artifact_uri=f"{location}/data", tracking_uri=uri)]
    except (MlflowException, OSError):
        return None
    name = next((n for n in sorted(names) if n.endswith(".keras")), None)
    if name is None:
        return None
    return Path(download_artifacts(artifact_uri=f"{location}/data/{name}", dst_path=str(dst), tracking_uri=uri))


def _import_module_of(target: str) -> None:
    """Import the module a trusted `_target_` lives in, so its @register_keras_serializable classes exist."""
    module = target.rpartition(".")[0]
    with contextlib.suppress(ImportError, ValueError):  # no such module: Keras names the class it cannot find
        importlib.import_module(module)


def _load_keras(path: Path, source: str) -> Any:
    """Keras' own format with safe_mode: a Lambda's bytecode is refused, and classes are found only among
    Keras' own and the registered ones (trainer.models, trainer.optim), never imported by module name."""
    import keras

    import trainer.models
    import trainer.optim  # noqa: F401  (both register the classes a saved model names)

    if not zipfile.is_zipfile(path):
        raise EvaluateError(f"{source} is not a .keras archive (Keras' native format)")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # a lambda, an unknown class, a damaged archive: all one line to the user
        raise EvaluateError(f"{source} cannot be loaded safely: {first_line(e)[:300]}") from None


# --- the numbers -------------------------------------------------------------------------------
def mean_metrics(model: Any, loss_fn: Any, x: np.ndarray, y: np.ndarray, accuracy: bool) -> dict[str, float]:
    """Mean loss (and accuracy) over a split, as the trainer's evaluation computes them: batch losses
    weighted by batch size, so the result does not depend on how the split is cut into batches."""
    import tensorflow as tf

    total, hits = 0.0, 0
    for start in range(0, len(x), EVAL_BATCH):
        xb, yb = tf.constant(x[start : start + EVAL_BATCH]), tf.constant(y[start : start + EVAL_BATCH])
        pred = model(xb, training=False)
        total += float(loss_fn(yb, pred)) * len(xb)
        if accuracy:
            hits += int(np.sum(_hits(yb.numpy(), np.asarray(pred))))
    out = {"loss": total / len(x)}
    if accuracy:
        out["accuracy"] = hits / len(x)
    return out


def _hits(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Correct predictions, defined as in trainer.loop: one logit > 0 for binary, argmax otherwise."""
    if y.shape[-1] == 1:
        return (pred[:, 0] > 0) == (y[:, 0] > 0.5)
    return np.argmax(pred, axis=-1) == np.argmax(y, axis=-1)


def evaluate(
    run_id: str | None = None,
    run_name: str | None = None,
    overrides: Sequence[str] = (),
    uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    trusted_targets: Iterable[str] = (),
) -> dict[str, Any]:
    """The run's model on the validation split (the training split when there is none) of its data,
    rebuilt from its config plus `overrides`; a JSON-ready report. The config builds only what
    `trusted_config` lets through: built-ins, targets the overrides name, and `trusted_targets`."""
    uri = uri or mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    run = find_run(client, run_id, run_name, experiment)
    trusted = [*trusted_targets, *named_by(overrides)]
    with tempfile.TemporaryDirectory(prefix="trainer-evaluate-") as tmp:
        logged = run_config(run, uri, overrides, Path(tmp))
        cfg = trusted_config(logged, trusted, f"run {run.info.run_id}'s config.yaml", keys=BUILT)
        model_target = OmegaConf.select(logged, "model._target_", default=None, throw_on_resolution_failure=False)
        trusted_model = isinstance(model_target, str) and is_trusted(model_target, trusted)
        model, source = load_run_model(client, run, uri, Path(tmp), model_target if trusted_model else None)
    data = build(cfg.data)
    loss_fn = build(cfg.loss)
    split = "validation" if data.x_val is not None else "train"
    x, y = (data.x_val, data.y_val) if split == "validation" else (data.x_train, data.y_train)
    metrics = mean_metrics(model, loss_fn, x, y, accuracy=data.task != "regression")
    logged_key = "val/loss" if split == "validation" else "train/final_loss"
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "model": source,
        "overrides": list(overrides),
        "split": split,
        "examples": len(x),
        **metrics,
        "logged_loss": run.data.metrics.get(logged_key),  # the run's own final value, for comparison
    }


# --- logging a model in MLflow's format --------------------------------------------------------
def log_model(model: Any, artifact_path: str = "model", input_example: np.ndarray | None = None) -> str:
    """Log `model` as an MLflow model of the active run; returns its `models:/<id>` URI.

    The `tensorflow` flavour, not `keras`: both save Keras 3 models as `.keras` files, but only the
    tensorflow flavour also stores Keras' registered custom objects (cloudpickled by reference), so
    `mlflow.pyfunc.load_model(uri)` and `mlflow.tensorflow.load_model(uri)` work in a fresh process without
    importing `trainer.models` first; with the keras flavour that load fails on `trainer>MLP`. It also takes
    plain `tf.Module` models. Requirements are given, not inferred: inference loads the model again in a
    subprocess (~25 s). `input_example` (a few float32 rows) records a signature, so pyfunc checks inputs.
    That pickle is also why `load_run_model` never uses those loaders: unpickling runs whatever code the
    file holds, so only a trusted store may be read with them; evaluate reads the `.keras` file inside.
    """
    import mlflow.tensorflow
    from mlflow.models import infer_signature

    if mlflow.active_run() is None:
        raise RuntimeError("log_model logs into the active MLflow run; call it inside trainer.tracking.Run")
    signature = None
    if input_example is not None:
        x = np.asarray(input_example[:2])
        signature = infer_signature(x, np.asarray(model(x, training=False)))
    info = mlflow.tensorflow.log_model(model, name=artifact_path, signature=signature, pip_requirements=_requirements())
    return info.model_uri


def _requirements() -> list[str]:
    """Pinned to what is installed here: the TensorFlow build actually present (cpu or not), and Keras."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for dist in ("tensorflow", "tensorflow-cpu", "keras"):
        try:
            pins.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return pins


# --- output ------------------------------------------------------------------------------------
def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run {report['run_name']} ({report['run_id']})", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = {
        "model": report["model"],
        "overrides": " ".join(report["overrides"]) or "(none: the run's own data)",
        "split": f"{report['split']} ({report['examples']} examples)",
        "loss": f"{report['loss']:.6g}",
    }
    if "accuracy" in report:
        rows["accuracy"] = f"{report['accuracy']:.4f}"
    if report["logged_loss"] is not None:
        rows["logged loss"] = f"{report['logged_loss']:.6g}"
    for key, value in rows.items():
        table.add_row(key, value)
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__.strip() + "\n\n" + USAGE)
        return 0
    try:
        req = parse_argv(argv)
        report = evaluate(req.run_id, req.run_name, req.overrides, req.uri, req.experiment, req.trusted_targets)
    except (EvaluateError, TrainerError, MlflowException) as e:
        print(f"error: {str(e).strip()}", file=sys.stderr)
        return 1
    if req.as_json:
        print(json.dumps({k: _jsonable(v) for k, v in report.items()}, indent=2))
    else:
        print_report(report)
    return 0


def _jsonable(value: Any) -> Any:
    """NaN/inf (a diverged model) as strings: strict JSON has no such numbers."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


if __name__ == "__main__":
    sys.exit(main())
