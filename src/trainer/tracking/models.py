"""Logging a trained model in MLflow's own format, so MLflow's loaders (and `trainer.evaluate`) can read it."""

from __future__ import annotations

from typing import Any

import numpy as np


def log_model(model: Any, artifact_path: str = "model", input_example: np.ndarray | None = None) -> str:
    """Log `model` as an MLflow model of the active run; returns its `models:/<id>` URI.

    The `tensorflow` flavour, not `keras`: both save Keras 3 models as `.keras` files, but only the
    tensorflow flavour also stores Keras' registered custom objects (cloudpickled by reference), so
    `mlflow.pyfunc.load_model(uri)` and `mlflow.tensorflow.load_model(uri)` work in a fresh process without
    importing `trainer.models` first; with the keras flavour that load fails on `trainer>MLP`. It also takes
    plain `tf.Module` models. Requirements are given, not inferred: inference loads the model again in a
    subprocess (~25 s). `input_example` (a few float32 rows) records a signature, so pyfunc checks inputs.
    That pickle is also why `load_run_model` never uses those loaders: unpickling runs whatever code the
    file holds, so only a trusted store may be read with them; `trainer.evaluate.load_run_model` reads the
    `.keras` file inside.
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
