"""Evaluate a logged run's model again, on its own data or on other data, from the run's logged config.

    trainer evaluate run_id=<id>                                 # reproduces the run's final val/loss
    trainer evaluate run_name=<name> data.seed=3 data.n_samples=10000 format=json
    trainer evaluate run_id=<id> uri=sqlite:///other.db '~data.n_samples' data._target_=...
    trainer evaluate model=models:/<name>/<version>              # a registered version, on its source run's data

The run's `config.yaml` is the starting point, so the data are rebuilt exactly as in training unless a
`key=value` says otherwise: Hydra's override grammar, as in training (`+key=value` adds a key the config lacks,
`++key=value` sets it either way, `~key` removes one); `python -m trainer.evaluate` is the same command. The
model is the Keras-native `.keras` file of the run's MLflow model when it has one (see
`trainer.tracking.models.log_model`), else its `model/model.keras` artifact.

A tracking store is shared data, so nothing read from it runs code: the config's `data` and `loss` may
build only built-in targets, those your own `key=value`s name and those `trusted_targets=[...]` allows
(config.trusted_config), and the model loads with Keras' safe_mode, its classes found by registered name,
never through the pickles MLflow logs beside it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.artifacts import download_artifacts
from mlflow.entities import LoggedModelStatus, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer import cli, startup
from trainer.config import (
    TrainerError,
    build,
    causes,
    check_option,
    first_line,
    is_trusted,
    targets,
    trusted_config,
    with_option_defaults,
)
from trainer.objective import FALLBACK, PRIMARY
from trainer.tracking.connect import check_readable
from trainer.tracking.models import (
    log_model,  # noqa: F401  (tests and scripts log a model as trainer.evaluate did)
    trusted_classes,
)

BUILT = ("data", "loss")  # the config nodes evaluate instantiates; the model comes from its .keras file


@dataclass
class Options:
    """The command's own keys (`trainer evaluate --help` lists them from here); any other key=value, +key=value
    or ~key is applied to the run's config."""

    run_id: str | None = cli.key(None, "the run to evaluate (or run_name)")
    run_name: str | None = cli.key(None, "the newest run of this name in experiment")
    model: str | None = cli.key(None, "a registered model version, models:/<name>/<version> (or @<alias>): "
                                "evaluated on its source run's config and data")  # fmt: skip
    uri: str | None = cli.key(None, "tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    experiment: str | None = cli.key(None, "where run_name is looked up; null: tracking.experiment's")
    trusted_targets: tuple[str, ...] = cli.key((), "what the run's config may build beyond the built-ins and your "
                                             "key=values: [my_pkg.my_data,my_pkg.*]")  # fmt: skip
    split: str = cli.key("validation", "which rows to score: the run's validation split (its training split when it "
                         "had none), or all of the file's rows:", ("validation", "all"))  # fmt: skip
    format: str = cli.key("table", "what to print on stdout:", ("table", "json"))
    verbose: bool = cli.key(False, "TensorFlow's and MLflow's start-up lines as they print them")


# --- the run, its config and its model ---------------------------------------------------------
def find_run(client: MlflowClient, run_id: str | None, run_name: str | None, experiment: str) -> Run:
    """By id, or the newest run of that name in `experiment` (names repeat; the latest is the one meant)."""
    if run_id:
        try:
            return client.get_run(run_id)
        except MlflowException:
            raise TrainerError(f"no run {run_id!r} in {client.tracking_uri}") from None
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise TrainerError(f"no experiment named {experiment!r} in {client.tracking_uri}")
    found = client.search_runs(
        [exp.experiment_id], f"attributes.run_name = '{run_name}'", max_results=1, order_by=["start_time DESC"]
    )
    if not found:
        raise TrainerError(f"no run named {run_name!r} in experiment {experiment!r}")
    return found[0]


def run_config(run: Run, uri: str, overrides: Sequence[str], dst: Path) -> DictConfig:
    """The run's logged (resolved) config with the overrides applied on top: data, not yet checked."""
    try:
        path = download_artifacts(
            run_id=run.info.run_id, artifact_path="config.yaml", dst_path=str(dst), tracking_uri=uri
        )
    except (MlflowException, OSError):
        raise TrainerError(
            f"run {run.info.run_id} has no config.yaml artifact: was it logged by the trainer?"
        ) from None
    try:
        cfg = OmegaConf.load(path)  # YAML's safe loader: a python/object tag is an error, not a call
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise TrainerError(f"run {run.info.run_id}'s config.yaml is not plain YAML ({first_line(e)})") from None
    if not isinstance(cfg, DictConfig):
        raise TrainerError(f"run {run.info.run_id}'s config.yaml is not a mapping: was it logged by the trainer?")
    return apply_overrides(with_option_defaults(cfg), overrides)


def named_by(overrides: Sequence[str]) -> set[str]:
    """Targets the user's own `key=value`s name (`data._target_=my.data`, `+loss={_target_:...}`)."""
    named = set()
    for override in overrides:
        with contextlib.suppress(TrainerError):  # apply_overrides names a bad one
            parsed = cli.parse_override("evaluate", override)
            if not parsed.is_delete():
                tree = parsed.value()
                for part in reversed(parsed.key_or_group.split(".")):
                    tree = {part: tree}
                named.update(target for _, target in targets(tree))
    return named


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Hydra overrides on a plain config, with Hydra's meaning: `key=value` changes a key the config has (a
    mistyped key is an error, not a silently added key), `+key` adds one it lacks, `++key` sets either way,
    `~key` deletes one. A group choice (`data=csv`) needs Hydra's conf/: set the group's keys instead."""
    for override in overrides:
        parsed = cli.parse_override("evaluate", override)
        key, value = parsed.key_or_group, parsed.value()
        current = OmegaConf.select(cfg, key, default=_ABSENT)
        if parsed.is_delete():
            _delete(cfg, key)
        elif current is _ABSENT and not (parsed.is_add() or parsed.is_force_add()):
            raise TrainerError(f"{key}: no such key in the run's config (add one with +{key}=...; trainer "
                               f"evaluate's own keys: {', '.join(_keys())})")  # fmt: skip
        elif current is not _ABSENT and parsed.is_add():
            raise TrainerError(f"+{key}: the run's config has {key} already (set it with {key}=...)")
        elif isinstance(current, DictConfig) and not isinstance(value, dict):
            raise TrainerError(
                f"{override}: cannot switch a config group here; set its keys (data._target_=..., ~data.<key>)"
            )
        else:
            try:
                OmegaConf.update(cfg, key, value, merge=True, force_add=True)
            except OmegaConfBaseException as e:
                raise TrainerError(f"{override}: {first_line(e)}") from None
    return cfg


def _keys() -> list[str]:
    from dataclasses import fields

    return [f"{f.name}=" for f in fields(Options)]


_ABSENT = object()


def _delete(cfg: DictConfig, key: str) -> None:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        raise TrainerError(f"~{key}: no such key in the run's config")
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


def load_run_model(client: MlflowClient, run: Run, uri: str, dst: Path, model_target: str | None,
                   found: tuple[str, str] | None = None,
                   custom_objects: dict[str, type] | None = None) -> tuple[Any, str]:  # fmt: skip
    """(model, where it came from): a Keras-native `.keras` file, the MLflow model's own first (`found`: a
    registered version's (URI, location), else the run's model), else the run's `model/model.keras` artifact.
    Never MLflow's loaders: they unpickle (cloudpickle) the python model or custom objects logged beside the
    model, which is code. `model_target`, the run config's `model._target_` when trusted, and `custom_objects`
    are the classes of yours it may name (trusted_classes)."""
    path, found = None, found or mlflow_model(client, run)
    if found is not None:
        source, location = found
        path = _keras_file(location, uri, dst)
    if path is None:
        source = "model/model.keras"
        try:
            path = Path(download_artifacts(run_id=run.info.run_id, artifact_path=source, dst_path=str(dst),
                                           tracking_uri=uri))  # fmt: skip
        except (MlflowException, OSError):
            raise TrainerError(
                f"run {run.info.run_id} has no model in Keras' native format (its MLflow model's data/*.keras or "
                "a model/model.keras artifact); evaluate loads nothing else, as other formats unpickle code"
            ) from None
    own = trusted_classes([model_target], strict=False) if model_target else {}
    return load_keras(path, f"run {run.info.run_id}'s {source}", {**own, **(custom_objects or {})}), source


def logged_labels(client: MlflowClient, run: Run, uri: str, dst: Path) -> list[str] | None:
    """The class names by id that the run's data had (`labels.json`, train.py), None when it had none."""
    if not any(a.path == "labels.json" for a in client.list_artifacts(run.info.run_id)):
        return None
    path = download_artifacts(run_id=run.info.run_id, artifact_path="labels.json", dst_path=str(dst), tracking_uri=uri)
    try:
        labels = json.loads(Path(path).read_text())["labels"]
    except (OSError, ValueError, KeyError, TypeError):
        raise TrainerError(f'run {run.info.run_id}\'s labels.json is not a {{"labels": [...]}} file') from None
    if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise TrainerError(f"run {run.info.run_id}'s labels.json does not list class names")
    return labels


def _keras_file(location: str, uri: str, dst: Path) -> Path | None:
    """The `.keras` file the trainer's pyfunc model keeps under `artifacts/` (tracking.models.log_model), or
    MLflow's tensorflow and keras flavours under `data/` (models logged before it)."""
    from mlflow.artifacts import list_artifacts

    for folder in ("artifacts", "data"):
        try:
            names = [Path(a.path).name for a in list_artifacts(artifact_uri=f"{location}/{folder}", tracking_uri=uri)]
        except (MlflowException, OSError):
            continue
        name = next((n for n in sorted(names) if n.endswith(".keras")), None)
        if name is not None:
            target = f"{location}/{folder}/{name}"
            return Path(download_artifacts(artifact_uri=target, dst_path=str(dst), tracking_uri=uri))
    return None


def registered_version(client: MlflowClient, model: str) -> tuple[str, tuple[str, str]]:
    """(source run id, (URI, artifact location)) of `models:/<name>/<version>` or `models:/<name>@<alias>`."""
    spec = model.removeprefix("models:/")
    name, at, alias = spec.partition("@")
    if not at:
        name, _, alias = spec.rpartition("/")
    if not (model.startswith("models:/") and name and alias):
        raise TrainerError(f"model={model}: expected models:/<name>/<version> or models:/<name>@<alias>")
    try:
        mv = client.get_model_version_by_alias(name, alias) if at else client.get_model_version(name, alias)
    except MlflowException:
        raise TrainerError(f"model={model}: no such registered model version in {client.tracking_uri}") from None
    if not mv.run_id:
        raise TrainerError(f"model={model}: the version names no source run, so there is no config to evaluate on")
    model_id = mv.model_id or (mv.source.removeprefix("models:/") if mv.source.startswith("models:/m-") else None)
    location = client.get_logged_model(model_id).artifact_location if model_id else mv.source  # MLflow 3: an id
    _check_own_source(client, model, mv.run_id, model_id, location)
    return mv.run_id, (model, location)


def _check_own_source(client: MlflowClient, model: str, run_id: str, model_id: str | None, location: str) -> None:
    """A version is evaluated on its run's config and data, so its files must be that run's own: a logged model
    of the run (MLflow 3), or a place under the run's artifacts. A version whose source points anywhere else
    (another run's model, any directory: `create_model_version` takes any path) was loaded under the run's name."""
    if model_id:
        owner = client.get_logged_model(model_id).source_run_id
        if owner == run_id:
            return
        why = f"its logged model {model_id} belongs to run {owner}"
    else:
        root = client.get_run(run_id).info.artifact_uri.rstrip("/")
        if location.startswith((f"{root}/", f"runs:/{run_id}/")):
            return
        why = f"its source {location} is outside the run's artifacts ({root})"
    raise TrainerError(f"model={model}: {why}, not run {run_id}'s own; evaluate takes only a run's own model")


def load_keras(path: Path, source: str, custom_objects: dict[str, type] | None = None) -> Any:
    """Keras' own format with safe_mode: a Lambda's bytecode is refused, and classes are found only among
    Keras' own, the registered ones (trainer.models, trainer.optim) and `custom_objects` (trusted_classes:
    those you named), never imported by module name."""
    import keras

    import trainer.models
    import trainer.optim  # noqa: F401  (both register the classes a saved model names)

    if not zipfile.is_zipfile(path):
        raise TrainerError(f"{source} is not a .keras archive (Keras' native format)")
    try:
        return keras.saving.load_model(path, custom_objects=custom_objects, compile=False, safe_mode=True)
    except Exception as e:  # a lambda, an unknown class, a damaged archive: all one line to the user
        raise TrainerError(f"{source} cannot be loaded safely: {_unknown_class(e) or first_line(e)[:300]}") from None


def _unknown_class(error: BaseException) -> str | None:
    """Keras' "Could not locate class 'Quadratic'" (under a first line about Functional) as the class's full name
    and the fix: a class of yours, not registered, that the file names."""
    import re

    text = "\n".join(str(e) for e in causes(error))
    found = re.search(r"Could not locate class '([\w.]+)'", text)
    if found is None:
        return None
    module = re.search(rf"'module': '([\w.]+)', 'class_name': '{re.escape(found[1])}'", text)
    name = f"{module[1]}.{found[1]}" if module else found[1]
    return (f"it names the class {name}, neither Keras' own nor registered; if you trust it, name it: "
            f"trusted_targets=[{name}]")  # fmt: skip


def evaluate(
    run_id: str | None = None,
    run_name: str | None = None,
    overrides: Sequence[str] = (),
    uri: str | None = None,
    experiment: str | None = None,
    trusted_targets: Iterable[str] = (),
    model: str | None = None,
    split: str = "validation",
) -> dict[str, Any]:
    """The run's model on the validation split (the training split when there is none) of its data,
    rebuilt from its config plus `overrides`; a JSON-ready report. The config builds only what
    `trusted_config` lets through: built-ins, targets the overrides name, and `trusted_targets`.
    `model`: a registered version (models:/<name>/<version>), evaluated on its source run's config and data.
    `split="all"`: every row of the data (a new labelled file: `data.path=...`), no split made."""
    uri = uri or mlflow.get_tracking_uri()
    check_readable(uri)  # a server answers, a SQLite file is MLflow's: nothing is made or migrated
    client = MlflowClient(uri)
    found = None
    if model:
        run_id, found = registered_version(client, model)
    run = find_run(client, run_id, run_name, experiment or cli.default_experiment())
    trusted = [*trusted_targets, *named_by(overrides)]
    with tempfile.TemporaryDirectory(prefix="trainer-evaluate-") as tmp, no_progress_bars():
        logged = run_config(run, uri, overrides, Path(tmp))
        cfg = trusted_config(logged, trusted, f"run {run.info.run_id}'s config.yaml", keys=BUILT)
        model_target = OmegaConf.select(logged, "model._target_", default=None, throw_on_resolution_failure=False)
        trusted_model = isinstance(model_target, str) and is_trusted(model_target, trusted)
        keras_model, source = load_run_model(client, run, uri, Path(tmp), model_target if trusted_model else None,
                                             found)  # fmt: skip
        labels = logged_labels(client, run, uri, Path(tmp))
        for group in BUILT:  # the run's config with your overrides, checked as training checks its own
            check_option(group, cfg[group])
        from trainer.data.prepare import load as load_data  # TensorFlow: only once the run and its model are found
        from trainer.data.prepare import relabel

        node = _with_schema(_run_task(cfg.data, run), client, run, uri, Path(tmp))
        if split == "all":  # no held-out part: every row is scored, as one split
            node = node.copy()
            node.val_fraction, node.folds = 0.0, None
        data = relabel(load_data(node), labels)  # class ids as the model learnt them
    from trainer.metrics import Metrics, default_metrics, evaluate_model

    loss_fn = build(cfg.loss)
    split = "all" if split == "all" else "validation" if data.has_val else "train"
    batch_size = OmegaConf.select(logged, "trainer.batch_size", default=None, throw_on_resolution_failure=False)
    batch_size = batch_size if isinstance(batch_size, int) else 0  # the same cut as the run's own evaluation
    names = OmegaConf.select(logged, "trainer.val_metrics", default=None, throw_on_resolution_failure=False)
    names = default_metrics(data.task) if names is None else list(names)
    metrics = Metrics(names, data.task, sparse=data.task == "multiclass" and not data.one_hot)
    if data.streamed:  # the logged model carries the preprocessing: it takes the raw inputs
        from trainer.metrics import eval_batch

        stream = data.val if split == "validation" else data.train  # all: the one split there is
        x, y, examples = stream.blocks().rebatch(eval_batch(batch_size)), None, stream.count
    else:
        x, y = (data.x_val, data.y_val) if split == "validation" else (data.x_train, data.y_train)
        examples = len(x)
    results = evaluate_model(keras_model, loss_fn, x, y, batch_size, metrics)  # trainer.metrics
    logged_key = {"validation": PRIMARY, "train": FALLBACK}.get(split)  # trainer.objective: what the run logged
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "model": source,
        "overrides": list(overrides),
        "split": split,
        "examples": examples,
        **results,
        "logged_loss": run.data.metrics.get(logged_key) if logged_key else None,  # the run's own, to compare
    }


def _with_schema(node: DictConfig, client: MlflowClient, run: Run, uri: str, dst: Path) -> DictConfig:
    """A typed table's run (its `table_schema.json`): the file is read through the run's fitted column types,
    never types fitted on the file at hand (its categories would be other columns)."""
    if (
        "schema" not in node
        or node.get("schema")
        or not any(a.path == "table_schema.json" for a in client.list_artifacts(run.info.run_id))
    ):
        return node
    path = download_artifacts(run_id=run.info.run_id, artifact_path="table_schema.json", dst_path=str(dst),
                              tracking_uri=uri)  # fmt: skip
    node = node.copy()
    node.schema = str(path)
    return node


def _run_task(node: DictConfig, run: Run) -> DictConfig:
    """The data option with `task: auto` set to the run's task (its `data.task` tag): a file holding some of
    the classes is read as the model's task. Inferred from such a file instead, one malignant-only label of a
    binary run was taken for one class of a multiclass task and the loss failed with a traceback on the shape."""
    task = run.data.tags.get("data.task")
    if task is None or node.get("task") != "auto":  # an option without the key: a function with **kwargs would get it
        return node
    node = node.copy()
    node.task = task
    return node


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """MLflow draws a tqdm bar per download ("Downloading artifacts: 100%|...") on stderr, terminal or not: noise
    for the two small files read here. MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true, if you set it, still wins."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ.setdefault(key, "false")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)


# --- output ------------------------------------------------------------------------------------
def print_report(report: dict[str, Any]) -> None:
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
    skip = {"run_id", "run_name", "model", "overrides", "split", "examples", "loss", "logged_loss"}
    for name, value in report.items():  # every metric the task logs (trainer.val_metrics)
        if name not in skip and isinstance(value, int | float):
            rows[name] = f"{value:.6g}"
    if report["logged_loss"] is not None:
        rows["logged loss"] = f"{report['logged_loss']:.6g}"
    for key, value in rows.items():
        table.add_row(key, value)
    cli.plain_console().print(table)  # no markup: overrides such as data.target=[target] print as given


def main(argv: Sequence[str] | None = None) -> int:
    """`trainer evaluate key=value ...`: the exit status (1 after one `error:` line)."""
    rest = "[run config: key=value | +key=value | ~key ...]"
    return cli.main_of("evaluate", Options, __doc__.splitlines()[0], _evaluate, argv, rest=rest)


def _evaluate(opts: Options, overrides: list[str]) -> None:
    cli.one_model("evaluate", opts.run_id, opts.run_name, opts.model)
    startup.quiet_libraries(opts.verbose)
    startup.import_tensorflow(opts.verbose)  # the model's loading imports it: its C++ start-up lines dropped
    report = evaluate(opts.run_id, opts.run_name, overrides, opts.uri, opts.experiment, opts.trusted_targets,
                      opts.model, opts.split)  # fmt: skip
    if opts.format == "json":
        print(json.dumps({k: _jsonable(v) for k, v in report.items()}, indent=2))
    else:
        print_report(report)


def _jsonable(value: Any) -> Any:
    """NaN/inf (a diverged model) as strings: strict JSON has no such numbers."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


if __name__ == "__main__":
    sys.exit(main())
