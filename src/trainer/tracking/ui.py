"""What a user sees of the trainer's runs in the MLflow UI: the run names, the experiment's kind, the link.

Pure functions (no MLflow import): the callers pass the client.

The kind. MLflow 3's UI opens an experiment on the tab its workflow type picks: "genai" (its default) lands on
the GenAI overview and traces, "machine_learning" on the runs list. In MLflow 3.17.2's bundle
(mlflow/server/js/build/static/js/main.*.js, module 31080) the type comes from the `workflowType` URL query
parameter, else the sidebar's switch (browser local storage `mlflow.workflowType`), while the feature flag that
makes it so is on (hard-wired on in 3.17.2: checked in headless Chromium, a tagged experiment still opened on
"Detect Issues" without the query, on its runs with it); with the flag off it is the experiment tag
`mlflow.experimentKind`, which the UI's own kind selector sets to `custom_model_development` ("Machine
learning"). So the trainer does both: it tags the experiment, and the link it prints carries the query.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

QUIET_URL_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"  # MLflow's switch for its "🏃 View run" lines
KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # the UI's CUSTOM_MODEL_DEVELOPMENT: "Machine learning"
WORKFLOW_QUERY = "workflowType=machine_learning"
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
NAME_LIMIT = 250  # MLflow's runs.name column: String(250)
VALUE_LIMIT = 48  # one override's shown value; longer ones are cut in the middle
# Overrides that never tell runs apart in a list: where it is logged, how it prints, what it resumes.
QUIET_KEYS = ("tracking.", "hydra.", "resume", "verbose", "trainer.progress", "trainer.print_gradients")
_CHOICE = re.compile(r"^[A-Za-z_][\w\-/]*$")  # a config group's option name: `mlp`, `vision/resnet`
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")


def mark_training(client: Any, experiment_id: str) -> bool:
    """Tag the experiment as model training (so the UI opens it on its runs) unless it has a kind already:
    a kind set by the user (or the UI's own selector) stays. True if this call set it."""
    tags = client.get_experiment(experiment_id).tags
    if tags.get(KIND_TAG):
        return False
    client.set_experiment_tag(experiment_id, KIND_TAG, TRAINING_KIND)
    return True


def run_name(overrides: Sequence[str], varying: Iterable[str] | None = None, job: int | None = None) -> str:
    """A run's name from its command-line overrides: what tells it apart from its neighbours in the runs list.

    A multirun job (`varying`: the keys the sweep changes) shows only those; a single run every override but
    the quiet ones (tracking.*, hydra.*, resume, verbose, ...), the data ones last (the hyperparameters are
    what usually differ from run to run). Short, since MLflow 3.17's runs list shows a name's first ~22
    characters (`adam lr=0.001 max_step…` in docs/mlflow-ui.png): a config group's choice as its value
    (`optimizer=adam` -> `adam`), a key as its last part unless two shown keys share it (`optimizer.lr` ->
    `lr`), a path as its file name (`data.path=/a/long/dir/houses.csv` -> `path=houses.csv`), a float with 4
    significant digits (an Optuna trial's lr 0.0012345678 -> 0.001235; the params keep every digit), a long
    value as its two ends.
    Nothing left: `job-<n>` in a multirun, else the time (`run-20260101-120000`)."""
    keep = {k.lstrip("+~") for k in varying} if varying is not None else None
    chosen = [o for o in overrides if _shown(o, keep)]
    if keep is None:
        chosen.sort(key=lambda o: _key(o).startswith("data"))  # stable: the user's order otherwise
    leaves = [_key(o).rsplit(".", 1)[-1] for o in chosen]
    shown = [_short(o, leaves.count(leaf) > 1) for o, leaf in zip(chosen, leaves, strict=True)]
    name = _fit(shown, NAME_LIMIT)
    if job is not None and keep is not None and not shown:
        return f"job-{job}"
    return name or time.strftime("run-%Y%m%d-%H%M%S")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _shown(override: str, varying: set[str] | None) -> bool:
    key = _key(override)
    if varying is not None:
        return key in varying
    return not key.startswith(QUIET_KEYS)


def _short(override: str, ambiguous: bool = False) -> str:
    """One override as the name shows it: a group's choice, or the key's last part (all of it if `ambiguous`)
    with a path's file name, a float's 4 significant digits, a long value cut."""
    if "=" not in override:
        return override  # `~data.path`: a deletion
    key, value = override.split("=", 1)
    key = key.lstrip("+~")
    stripped = value.strip("'\"")
    if "." not in key and _CHOICE.match(stripped) and stripped.lower() not in ("true", "false", "null", "none"):
        return stripped  # `model=mlp`, `experiment=tape_example`: a config group's option
    if _FLOAT.match(stripped) and ("." in stripped or "e" in stripped.lower()):
        value = f"{float(stripped):.4g}"
    elif _is_path(key, stripped):
        value = os.path.basename(stripped.rstrip("/")) or stripped
    if len(value) > VALUE_LIMIT:
        half = (VALUE_LIMIT - 1) // 2
        value = f"{value[:half]}…{value[-half:]}"
    return f"{key if ambiguous else key.rsplit('.', 1)[-1]}={value}"


def _is_path(key: str, value: str) -> bool:
    """A file or directory (absolute, relative, a URI, or the value of a `*path*`/`*dir*`/`*file*` key), not a
    config group's choice (`model=vision/resnet`) or a list."""
    if "/" not in value or value.startswith(("[", "{")):
        return False
    leaf = key.rsplit(".", 1)[-1]
    named = any(word in leaf for word in ("path", "dir", "file"))
    return named or value.startswith(("/", "./", "../", "~")) or "://" in value


def _fit(parts: list[str], limit: int) -> str:
    """Whole overrides joined while they fit the limit, then `…`: never half a key."""
    name = ""
    for part in parts:
        candidate = f"{name} {part}" if name else part
        if len(candidate) > limit - 2:
            return f"{name} …" if name else part[: limit - 1] + "…"
        name = candidate
    return name


def run_link(uri: str, experiment_id: str, run_id: str) -> str:
    """One line: the address of the run's page. On a tracking server, there; over a local store (SQLite, a
    directory), where `mlflow ui` serves it by default, and the command that does. The query opens the UI as
    model training (see top). MLflow's own "View run ... at" lines are switched off (QUIET_URL_ENV): they
    repeated this one, without the query, and only for servers."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}?{WORKFLOW_QUERY}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"{UI_ADDRESS}/{page} (serve it with: mlflow ui --backend-store-uri {uri})"
