"""Logging a trained model in MLflow's own format, so MLflow's loaders, its server (`mlflow models serve`) and
`trainer.evaluate` can read it."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

KERAS_ARTIFACT = "keras_model"  # the key of the `.keras` file among the pyfunc model's artifacts (artifacts/)
SETTINGS_ARTIFACT, SETTINGS_FILE = "settings", "predict.json"  # the wrapper's settings as plain JSON (artifacts/)
SETTINGS = ("task", "names", "from_logits", "dtype", "columns", "table", "targets", "inputs")  # predict.json's keys
LABEL_COLUMN = "label"  # a classifier's pyfunc output: one probability column per class, then this one


class KerasPyfunc(mlflow.pyfunc.PythonModel):
    """What a user of the logged model gets from `predict`: float64 or float32 arrays and DataFrames of the
    training columns (in training order) are cast to the model's input dtype; a regression model gives its
    outputs, a classifier a DataFrame of class probabilities (one column per class name) and `label`.

    Keras' own `predict` with verbose=0 (its default prints a progress bar on every call). The class is pickled
    by reference (this module), so loading needs `trainer` installed; the model itself is a `.keras` file
    loaded with Keras' safe_mode, after importing the modules its classes come from."""

    def __init__(
        self,
        task: str,
        names: Sequence[str] | None,
        from_logits: bool,
        dtype: str,
        modules: Sequence[str],
        columns: int | None = None,
        table: dict[str, Any] | None = None,
        targets: Sequence[str] = (),
        inputs: Sequence[str] | None = None,
        model: Any = None,
    ):
        self.task, self.names, self.from_logits = task, list(names) if names else None, from_logits
        self.dtype, self.modules, self.columns = dtype, list(modules), columns
        self.table, self.targets = table, list(targets)
        self.inputs = list(inputs) if inputs else None  # a plain table's feature columns, in training order
        self._model = model  # None when logged (the model is its .keras artifact, loaded by load_context)

    def settings(self) -> dict[str, Any]:
        """Everything but the model, as plain JSON (`artifacts/predict.json`): what `trainer predict` and
        `trainer export` read to rebuild this wrapper without unpickling `python_model.pkl`, which is code."""
        return {key: getattr(self, key, None) for key in SETTINGS}

    @classmethod
    def from_settings(cls, settings: dict[str, Any], model: Any) -> KerasPyfunc:
        """The wrapper of `settings()` around an already loaded Keras `model` (loaded with safe_mode)."""
        known = {k: settings.get(k) for k in SETTINGS if k != "targets"}
        return cls(modules=(), targets=settings.get("targets") or (), model=model, **known)

    def load_context(self, context: Any) -> None:
        import keras

        for module in ["trainer.models", "trainer.optim"]:  # registered classes, by name
            importlib.import_module(module)
        own = trusted_classes(self.modules, strict=False)  # the model's own classes, registered or not
        self._model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT], custom_objects=own, compile=False,
                                              safe_mode=True)  # fmt: skip

    @property
    def keras_model(self) -> Any:
        """The loaded Keras model (after `mlflow.pyfunc.load_model(uri).unwrap_python_model()`): raw outputs."""
        return self._model

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        """`model_input`: a DataFrame for a table, an ndarray for images; a DataFrame hint is one that MLflow 3
        validates nothing by (a list[...] hint would convert the input; none warns on every import)."""
        return self.outputs(np.asarray(self._model.predict(self.cast(model_input), verbose=0)))

    def cast(self, model_input: Any) -> np.ndarray:
        """The input as the model's dtype (any numeric dtype pandas reads: int64 too). Refused, as an
        MlflowException of INVALID_PARAMETER_VALUE (`mlflow models serve` answers 400): NaN and infinity, and a
        table with more or fewer columns than the model takes. Both were answered 200 with a label; MLflow's own
        column schema keeps a table's first columns and drops the rest, so a table's model is logged without an
        input schema (log_model) and its column count is checked here."""
        if getattr(self, "table", None) is not None:  # a typed table: raw rows through the fitted schema
            return self._encoded(model_input)
        values = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else model_input
        columns = getattr(self, "columns", None)  # None: a model logged before the check
        if columns is not None and (np.ndim(values) != 2 or np.shape(values)[1] != columns):
            got = f"{np.shape(values)[1]} columns" if np.ndim(values) == 2 else f"shape {np.shape(values)}"
            raise _invalid(f"input has {got}: the model takes rows of {columns} columns, in training order")
        try:
            values = np.asarray(values, dtype=self.dtype)
        except (TypeError, ValueError) as e:
            raise _invalid(f"input is not numeric ({e}): the model takes numbers") from None
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            row, *column = (int(i) for i in np.argwhere(~np.isfinite(values))[0])
            where = f"row {row}" + (f", column {column[0]}" if values.ndim == 2 else "")
            raise _invalid(f"input {where} is {values[(row, *column)]}: the model takes finite numbers only")
        return values

    def _encoded(self, model_input: Any) -> np.ndarray:
        """Raw rows (a DataFrame of the file's columns: strings, missing cells, pandas' dtypes) as the model's
        numbers, by the schema fitted on the training split (data/columns.py). A column it does not know is
        refused (the target's may come along); one it needs and lacks is named."""
        from trainer.config import TrainerError
        from trainer.data.columns import TableSchema

        schema = TableSchema.from_dict(self.table)
        if not isinstance(model_input, pd.DataFrame):
            kind = type(model_input).__name__
            raise _invalid(f"the model takes a table of named columns {schema.inputs}, not a {kind}")
        known = {c.name for c in schema.columns} | set(self.targets)
        if unknown := [str(c) for c in model_input.columns if c not in known]:
            raise _invalid(f"input has column {unknown[0]!r}, which the model does not take; it takes {schema.inputs}")
        try:
            return schema.transform(model_input, "input").astype(self.dtype)
        except TrainerError as e:
            raise _invalid(str(e)) from None

    def outputs(self, out: np.ndarray) -> Any:
        """Raw model outputs as the user reads them; a binary model of several targets: their probabilities."""
        if self.task == "binary":
            p = _sigmoid(out) if self.from_logits else out
            if p.ndim > 1 and p.shape[1] > 1:
                return p
            p = p.reshape(-1)
            return self._classes(np.stack([1 - p, p], axis=1))
        if self.task == "multiclass":
            return self._classes(_softmax(out) if self.from_logits else out)
        return out

    def _classes(self, probs: np.ndarray) -> pd.DataFrame:
        names = self.names or [str(i) for i in range(probs.shape[1])]
        frame = pd.DataFrame({name: probs[:, i] for i, name in enumerate(names)})
        frame[LABEL_COLUMN] = np.asarray(names, dtype=object)[probs.argmax(axis=1)]
        return frame


def trusted_classes(names: Iterable[str], strict: bool = True) -> dict[str, type]:
    """The Keras classes a `.keras` file may name besides Keras' own and the registered ones: those of `names`,
    which you named (a class `my_pkg.models.MyNet`, or the classes a module `my_pkg.models` / `my_pkg.models.*`
    defines). Importing them also registers any @keras.saving.register_keras_serializable class; an unregistered
    one (examples/my_models.py's Quadratic) is found only by being passed (Keras: "Could not locate class
    'Quadratic'"). `strict`: a name that cannot be imported is one line naming trusted_targets; else it is skipped
    (Keras then names the class it cannot find)."""
    import keras

    from trainer.config import TrainerError, first_line

    found: dict[str, type] = {}
    for name in names:
        name = name.removesuffix(".*")
        try:
            module = importlib.import_module(name)
            classes = [c for c in vars(module).values() if getattr(c, "__module__", None) == module.__name__]
        except ImportError:
            parent, _, attr = name.rpartition(".")
            try:
                classes = [getattr(importlib.import_module(parent), attr)]
            except (ImportError, ValueError, AttributeError) as e:
                if strict:
                    raise TrainerError(f"trusted_targets: cannot import {name} ({first_line(e)})") from None
                continue
        found.update({c.__name__: c for c in classes if isinstance(c, type) and issubclass(c, keras.layers.Layer)})
    return found


def _invalid(message: str) -> Exception:
    """A bad request: MLflow's server answers it with 400 and the message."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (1 / (1 + np.exp(-z.astype(np.float64)))).astype(np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z.astype(np.float64) - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def log_model(
    model: Any,
    artifact_path: str = "model",
    input_example: np.ndarray | None = None,
    *,
    task: str = "regression",
    labels: Sequence[str] | None = None,
    from_logits: bool = True,
    registered_model_name: str | None = None,
    table: dict[str, Any] | None = None,
    targets: Sequence[str] = (),
    inputs: Sequence[str] | None = None,
) -> str:
    """Log the Keras `model` as an MLflow pyfunc model (KerasPyfunc) of the active run; returns its URI.

    `input_example` (a few raw rows) is logged and gives the signature. A table's signature has outputs and no
    input schema: MLflow's column schema keeps a table's first columns and silently drops extra ones (10 columns
    sent to an 8-column model got 200), and its double columns refused int64 (pandas' dtype for whole numbers),
    so KerasPyfunc.cast checks the column count and casts any numeric dtype itself. Images and other tensors
    keep the tensor signature of the raw data, whose shape MLflow checks. `task`, `labels`
    (class names by id) and `from_logits` (the loss's) turn a classifier's logits into probabilities and
    labels. `registered_model_name`: also a new version of that registered model. Requirements are given,
    not inferred: inference loads the model again in a subprocess (~25 s). The model's `.keras` file sits
    under `artifacts/`: `trainer.evaluate.load_run_model` reads only that file (safe_mode), never the
    pickled `python_model.pkl` beside it, which is code.
    """
    import keras
    from mlflow.models import ModelSignature, infer_signature

    if mlflow.active_run() is None:
        raise RuntimeError("log_model logs into the active MLflow run; call it inside trainer.tracking.Run")
    if not isinstance(model, keras.Model):
        raise TypeError(f"log_model logs Keras models; got {type(model).__name__}")
    dtype = str(model.inputs[0].dtype) if getattr(model, "inputs", None) else "float32"
    if table is not None:  # raw rows of a typed table: the example is a DataFrame, the checks are the wrapper's
        example = input_example.head(2)
        wrapper = KerasPyfunc(task, labels, from_logits, dtype, _modules(model), None, table, targets, inputs)
        out = wrapper.outputs(np.asarray(model(wrapper.cast(example), training=False)))
        signature = infer_signature(None, out)  # outputs only (see above)
    else:
        example = None if input_example is None else np.asarray(input_example[:2])
        rows = example is not None and example.ndim == 2
        wrapper = KerasPyfunc(task, labels, from_logits, dtype, _modules(model), example.shape[1] if rows else None,
                              targets=targets, inputs=inputs)  # fmt: skip
        signature = None
        if example is not None:
            out = wrapper.outputs(np.asarray(model(wrapper.cast(example), training=False)))
            signature = infer_signature(example, out)
            if rows:  # checked by KerasPyfunc.cast (see above)
                example = example.astype(np.float64)
                signature = ModelSignature(inputs=None, outputs=signature.outputs)
    with tempfile.TemporaryDirectory(prefix="trainer-model-") as tmp, _quiet_pyfunc():
        path, settings = Path(tmp) / "model.keras", Path(tmp) / SETTINGS_FILE
        model.save(path)
        settings.write_text(json.dumps(wrapper.settings(), indent=1))
        artifacts = {KERAS_ARTIFACT: str(path), SETTINGS_ARTIFACT: str(settings)}
        info = mlflow.pyfunc.log_model(
            name=artifact_path, python_model=wrapper, artifacts=artifacts, signature=signature,
            input_example=example, pip_requirements=_requirements(), registered_model_name=registered_model_name,
        )  # fmt: skip
    return info.model_uri


@contextlib.contextmanager
def _quiet_pyfunc() -> Iterator[None]:
    """MLflow's pyfunc warns that a Python object is pickled, on every log (the class goes by reference to
    this module; the docstring above says why loaders are trusted-store only), and draws a download bar
    while it checks the input example: noise at the end of each run. Its errors still print."""
    logger, key = logging.getLogger("mlflow.pyfunc"), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    level, bar = logger.level, os.environ.get(key)
    logger.setLevel(logging.ERROR)
    os.environ.setdefault(key, "false")
    try:
        yield
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop(key, None)


def _modules(model: Any) -> list[str]:
    """Modules of the model's own (non-Keras) classes: imported before loading, so their names register."""
    classes = {type(model), *(type(layer) for layer in _all_layers(model))}
    return sorted({c.__module__ for c in classes if not c.__module__.startswith("keras")})


def _all_layers(layer: Any) -> list[Any]:
    """Every layer inside `layer`, nested models' too, through the public `layers` lists."""
    found = []
    for child in getattr(layer, "layers", []):
        found += [child, *_all_layers(child)]
    return found


def _requirements() -> list[str]:
    """Pinned to what is installed here: the TensorFlow build actually present (cpu or not), Keras, pandas."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for dist in ("tensorflow", "tensorflow-cpu", "keras", "pandas"):
        try:
            pins.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return pins
