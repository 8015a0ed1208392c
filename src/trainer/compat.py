"""The fence around library internals: every private name of Hydra, OmegaConf or Keras the trainer uses is here.

Each reach has a shape check, run once per process on first use: the attributes exist, are callable and take
the parameters the trainer passes (`inspect.signature`), and the public code that should call a hook still
names it. A library whose shape changed gets its public path instead, announced in one line on stderr, once
per process. MLflow's internals (the SQL bulk writer's) are fenced the same way in `trainer.tracking.compat`.

    TRAINER_NO_INTERNALS=all            # every public path (or a comma list: mlflow,hydra,keras,omegaconf)

Each name, its check and its public path:
- Hydra `hydra._internal.utils.run_and_report`, replaced at import so config errors print in one line and
  a sweep's parent run is closed however it ends -> Hydra's own error printing.
- OmegaConf `Node._get_full_key(None)`: a node's dotted place in the config, for one-line errors -> "".
- Keras `Optimizer._backend_update_step(grads, trainable_variables, learning_rate)`, overridden by the
  fused Adam (trainer.optim) -> Keras' own per-variable Adam/AdamW update.

Nothing here imports TensorFlow or MLflow at import time: config.py and the CLI use it before either.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

NO_INTERNALS_ENV = "TRAINER_NO_INTERNALS"
LIBRARIES = ("mlflow", "hydra", "keras", "omegaconf")
_checked: dict[str, str | None] = {}  # library -> None (its shape holds) or why its public path is used
_warned: set[str] = set()


def takes(fn: Any, *params: str) -> bool:
    """`fn` is callable and accepts each of `params` by name (or through **kwargs)."""
    if not callable(fn):
        return False
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    names = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in names.values()):
        return True
    return all(p in names for p in params)


def calls(fn: Any, name: str) -> bool:
    """The code of `fn` refers to `name` (a method or module global it looks up when it runs)."""
    code = getattr(inspect.unwrap(fn), "__code__", None) if callable(fn) else None
    return code is not None and name in code.co_names


def forced(library: str) -> bool:
    """The user asked for `library`'s public path (TRAINER_NO_INTERNALS)."""
    asked = {part.strip().lower() for part in os.environ.get(NO_INTERNALS_ENV, "").split(",")}
    return bool(asked & {library.split("-")[0], "all", "1"})  # "mlflow" covers each of MLflow's checks


def shape_ok(library: str, reason: Callable[[], str | None], instead: str) -> bool:
    """Run `library`'s check once per process; False (and one line on stderr) when its public path is used.

    `reason()` returns None when the installed library has the shape relied on, else what is missing.
    """
    if library not in _checked:
        _checked[library] = f"{NO_INTERNALS_ENV} names {library}" if forced(library) else reason()
    why = _checked[library]
    if why is not None:
        warn_once(library, f"trainer: {why}; using {instead}")
    return why is None


def warn_once(library: str, message: str) -> None:
    """One line on stderr, once per process and library."""
    if library in _warned:
        return
    _warned.add(library)
    print(" ".join(message.split()), file=sys.stderr)


def forget() -> None:
    """Check again on next use (tests that switch TRAINER_NO_INTERNALS within one process)."""
    _checked.clear()
    _warned.clear()


def version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed(dist)
    except PackageNotFoundError:
        return "?"


# --- Hydra -------------------------------------------------------------------------------------
def hydra_reason(utils: Any = None) -> str | None:
    """`hydra._internal.utils` still has `run_and_report(func)` and `_run_hydra` still looks it up by name
    (a module global), so replacing it takes effect."""
    if utils is None:
        try:
            import hydra._internal.utils as utils
        except ImportError as e:
            return f"hydra-core {version('hydra-core')} has no hydra._internal.utils ({e})"
    where = f"hydra-core {version('hydra-core')}"
    if not takes(getattr(utils, "run_and_report", None), "func"):
        return f"{where} has no hydra._internal.utils.run_and_report(func)"
    if not calls(getattr(utils, "_run_hydra", None), "run_and_report"):
        return f"{where}'s _run_hydra no longer calls run_and_report"
    return None


def wrap_hydra_errors(wrap: Callable[[Callable[[], Any]], Any], utils: Any = None) -> bool:
    """Make Hydra run its task through `wrap(func)` inside its own error report; False when it cannot
    (then errors print as Hydra prints them)."""
    if not shape_ok("hydra", lambda: hydra_reason(utils), "Hydra's own error printing"):
        return False
    if utils is None:
        import hydra._internal.utils as utils
    original = utils.run_and_report
    utils.run_and_report = lambda func: original(lambda: wrap(func))
    return True


# --- OmegaConf ---------------------------------------------------------------------------------
def omegaconf_reason(node_type: Any = None) -> str | None:
    if node_type is None:
        from omegaconf import Node as node_type
    if not takes(getattr(node_type, "_get_full_key", None), "key"):
        return f"omegaconf {version('omegaconf')} has no Node._get_full_key(key)"
    return None


def full_key(node: Any) -> str:
    """`model` for the node at cfg.model, `trainer.early_stopping` deeper down; "" where OmegaConf cannot say."""
    if not shape_ok("omegaconf", omegaconf_reason, "errors without the config key"):
        return ""
    try:
        return str(node._get_full_key(None))
    except Exception:
        return ""


# --- Keras -------------------------------------------------------------------------------------
KERAS_HOOK = "_backend_update_step"
KERAS_HOOK_PARAMS = ("grads", "trainable_variables", "learning_rate")


def keras_reason(optimizer_type: Any = None) -> str | None:
    """Keras' optimizer still applies gradients through `_backend_update_step(grads, trainable_variables,
    learning_rate)`, the one method the fused Adam overrides."""
    if optimizer_type is None:
        import keras

        optimizer_type = keras.optimizers.Optimizer
    where = f"keras {version('keras')}"
    if not takes(getattr(optimizer_type, KERAS_HOOK, None), *KERAS_HOOK_PARAMS):
        return f"{where} has no Optimizer.{KERAS_HOOK}({', '.join(KERAS_HOOK_PARAMS)})"
    caller = getattr(optimizer_type, "_backend_apply_gradients", None)
    if not calls(caller, KERAS_HOOK):
        return f"{where}'s Optimizer no longer calls {KERAS_HOOK}"
    return None


def keras_fused_ok() -> bool:
    """The fused Adam may override Keras' update hook; else Keras' own per-variable update runs."""
    return shape_ok("keras", keras_reason, "Keras' own Adam update (one per variable)")
