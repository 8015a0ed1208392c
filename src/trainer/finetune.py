"""Fine-tuning: `model.freeze` keeps layers as they are, `trainer.init_from` starts from another run's weights.

    python -m trainer model=cnn data=image_folder ... 'model.freeze=[conv_*,bn_*]'       # phase 1: the head only
    python -m trainer model=cnn data=image_folder ... trainer.init_from=<phase 1 run id> optimizer.lr=1e-4

A frozen layer's variables are not trainable (Keras' `layer.trainable = False`): no optimizer sees them, their
values stay bitwise as they were, and a BatchNormalization among them runs in inference mode (its moving
statistics stay too), as in Keras' transfer-learning guide. `init_from` copies weights only, from the other
run's logged model (its `.keras` file, loaded with Keras' safe_mode: classes by registered name, never code
from the store); the new run has its own optimizer, learning rate and schedule, and its own data's scaling.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras

from trainer.callbacks import Callback
from trainer.config import TrainerError, first_line

BACKBONE = "backbone"  # model.freeze=[backbone]: a keras_app model's pretrained network, all of it


def freeze(model: keras.Model, patterns: Sequence[str] | None) -> list[str]:
    """Make the layers `patterns` name untrainable (fnmatch on a layer's name or its path), from the model's
    constructor (the built-in models take `freeze`); the patterns, for its config. A pattern that names no
    layer is one line listing the layers there are."""
    patterns = [] if patterns is None else [patterns] if isinstance(patterns, str) else list(patterns)
    if not all(isinstance(p, str) and p for p in patterns):
        raise TrainerError(f"model.freeze={patterns} is invalid: expected layer names or patterns, e.g. "
                           "model.freeze=[conv_*,bn_*], or [backbone] for model=keras_app")  # fmt: skip
    for layer in _select(model, patterns, "model.freeze"):
        layer.trainable = False
    return patterns


def unfreeze(model: keras.Model, patterns: Sequence[str] | None) -> None:
    """trainer.unfreeze's layers trainable again: `patterns`, or (None) every one model.freeze named."""
    patterns = list(patterns) if patterns is not None else list(getattr(model, "freeze", None) or [])
    if not patterns:
        raise TrainerError("trainer.unfreeze.layers=null unfreezes what model.freeze froze, and it froze nothing: "
                           "set model.freeze=[...], or name the layers in trainer.unfreeze.layers")  # fmt: skip
    for layer in _select(model, patterns, "trainer.unfreeze.layers"):
        layer.trainable = True


def _select(model: keras.Model, patterns: list[str], key: str) -> list[Any]:
    layers = _layers(model) if patterns else []
    selected = []
    for pattern in patterns:
        if pattern == BACKBONE:
            found = [getattr(model, "backbone", None)] if getattr(model, "backbone", None) is not None else []
            if not found:
                raise TrainerError(f"{key}=[{BACKBONE}] is for model=keras_app; name this model's layers "
                                   f"instead: {', '.join(sorted(_names(layers)))}")  # fmt: skip
        else:
            found = [layer for layer in layers if _matches(layer, pattern)]
            if not found:
                raise TrainerError(f"{key}: {pattern!r} names no layer of the model; its layers: "
                                   f"{', '.join(sorted(_names(layers)))}")  # fmt: skip
        selected += found
    return selected


class Unfreeze(Callback):
    """trainer.unfreeze: at `at_step` (a chunk ends there) the second phase begins (`begin`: layers unfrozen, a
    new optimizer, the loop retraced once, checkpoints holding the new layout). A run resumed past it began
    that phase before restoring (train.py)."""

    def __init__(self, at_step: int, begin: Callable[[], None], start: int) -> None:
        self.at_step, self.begin, self.done = at_step, begin, start >= at_step
        self.boundaries = (at_step,)

    def on_chunk_end(self, ctx: Any, step: int, arrays: Any) -> bool:
        if not self.done and step >= self.at_step:
            self.begin()
            self.done = True
            ctx.run.set_tag("unfrozen_at_step", str(step))
        return False


def _layers(model: Any) -> list[Any]:
    """Every layer inside `model`, nested ones too; _Stack models keep theirs in `stack`."""
    found = []
    for child in [*getattr(model, "layers", []), *getattr(model, "stack", [])]:
        if all(child is not f for f in found):
            found += [child, *(c for c in _layers(child) if all(c is not f for f in found))]
    return found


def _names(layers: list[Any]) -> set[str]:
    return {layer.name for layer in layers}


def _matches(layer: Any, pattern: str) -> bool:
    return fnmatch.fnmatchcase(layer.name, pattern) or fnmatch.fnmatchcase(getattr(layer, "path", None) or "", pattern)


def init_from(model: keras.Model, source: str, uri: str | None) -> str:
    """Copy the weights of `source`'s logged model into `model` (same architecture); returns where they came
    from. `source`: a run directory (its `model.keras`), a registered version (models:/<name>/<version>), or a
    run id in the tracking store `uri`."""
    own = {type(c).__name__: type(c) for c in [model, *_layers(model)] if not type(c).__module__.startswith("keras")}
    loaded, where = _load(source, uri, own)  # a model of your own class: the one you built here, no other
    donor = _same_model(loaded, model)  # a model logged whole, by its class (before models.portable)
    if donor is not None:
        _copy(model, donor, source)
        return where
    if not getattr(loaded, "inputs", None):
        raise TrainerError(f"trainer.init_from={source}: {where} holds no {type(model).__name__} model to take "
                           f"weights from (it holds {type(loaded).__name__}); init_from takes a run of the same "
                           "model")  # fmt: skip
    _copy_by_layer(loaded, model, source)
    return where


def _copy_by_layer(loaded: Any, model: Any, source: str) -> None:
    """Weights from a logged model of Keras' own layers (models.portable) into `model`: layer by layer, by name
    (the built-in models name every layer by its place), through `model`'s own graph, which shares its layers."""
    from trainer import models

    shape = tuple(loaded.inputs[0].shape[1:])
    try:
        graph = models.portable(model, shape, loaded.inputs[0].dtype)
    except Exception as e:  # Keras' ValueError or TypeError, whichever layer refuses the shape
        raise TrainerError(f"trainer.init_from={source}: its model takes examples of shape {shape}, which this "
                           f"{type(model).__name__} cannot ({first_line(e)[:200]}); init_from takes a run of the "
                           "same model and data") from None  # fmt: skip
    theirs = {layer.name: layer for layer in loaded.layers}
    for layer in graph.layers:
        if not layer.weights:
            continue
        donor = theirs.get(layer.name)
        if donor is None:
            raise TrainerError(f"trainer.init_from={source}: its model has no layer {layer.name!r}, which this one "
                               "has; init_from takes a run of the same model")  # fmt: skip
        _copy(layer, donor, source)
    models.from_portable(model, graph)


def _copy(target: Any, donor: Any, source: str) -> None:
    """`donor`'s weights into `target` (a model or a layer), refused when they do not fit: a shape, then a count."""
    ours, theirs = target.weights, donor.weights
    for a, b in zip(ours, theirs, strict=False):
        if tuple(a.shape) != tuple(b.shape):
            raise TrainerError(f"trainer.init_from={source}: its weights do not fit this model ({b.path} is "
                               f"{tuple(b.shape)}, {a.path} here is {tuple(a.shape)}); init_from takes a run of "
                               "the same model and data shape")  # fmt: skip
    if len(ours) != len(theirs):
        raise TrainerError(f"trainer.init_from={source}: its model has {len(theirs)} weights, this one "
                           f"{len(ours)}; init_from takes a run of the same model")  # fmt: skip
    target.set_weights(donor.get_weights())


def _same_model(loaded: Any, model: Any) -> Any:
    """The model inside the logged one (it may be wrapped with its preprocessing) of `model`'s class."""
    for candidate in [loaded, *_layers(loaded)]:
        if type(candidate) is type(model):
            return candidate
    return None


def _load(source: str, uri: str | None, own: dict[str, type]) -> tuple[Any, str]:
    """The logged Keras model `source` names, loaded safely, and a description of where it came from."""
    from trainer import evaluate as ev

    path = Path(source)
    if path.is_dir():
        found = path / "model.keras"
        if not found.is_file():
            raise TrainerError(f"trainer.init_from={source}: the directory has no model.keras (a run's output "
                               "directory has one when tracking.log_model is true)")  # fmt: skip
        return ev.load_keras(found, f"trainer.init_from={source}", own), str(found)
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri or mlflow.get_tracking_uri())
    try:
        with tempfile.TemporaryDirectory(prefix="trainer-init-") as tmp, ev.no_progress_bars():
            found = None
            run_id = source
            if source.startswith("models:/"):
                run_id, found = ev.registered_version(client, source)
            run = ev.find_run(client, run_id, None, "")
            model, where = ev.load_run_model(client, run, client.tracking_uri, Path(tmp), None, found, own)
    except TrainerError as e:
        raise TrainerError(f"trainer.init_from={source}: {first_line(e)}") from None
    except MlflowException as e:
        raise TrainerError(f"trainer.init_from={source}: not a run directory, run id or models:/<name>/<version> "
                           f"in {client.tracking_uri} ({first_line(e)})") from None  # fmt: skip
    return model, f"{where} of run {run.info.run_id}"
