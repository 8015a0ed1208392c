"""From launch to the first step: what a user sees first, and what is done before TensorFlow is imported.

Quiet. `import tensorflow` wrote 5 lines to stderr here (TF 2.21, x86-64): absl's "All log messages before
absl::InitializeLog()" preamble and oneDNN's notice, twice, plus cpu_feature_guard's two. They come from C++
before absl's logging is set up, so `TF_CPP_MIN_LOG_LEVEL` does not hold them back (tried at 2 and 3; nor does
`TF_ENABLE_ONEDNN_OPTS=1`): the import runs with file descriptor 2 pointed at a temporary file, and what it
wrote is replayed less those INFO/WARNING lines. Errors (`E`/`F` lines, Python tracebacks, anything else)
still reach the user. `TF_CPP_MIN_LOG_LEVEL` is set to 2 as well (unless the user set it), for the C++ INFO and
WARNING lines that come later; MLflow's "Creating a new experiment" INFO line and matplotlib's font-cache notice
are lowered too. `verbose=true` (or TRAINER_VERBOSE=1) leaves everything as the libraries print it.

Fast. Measured on this 2-core VM (`python scripts/bench`'s start-up column, and a timeline of one launch):
- The store is opened before TensorFlow is imported (tracking.open_store): the same SQLAlchemy set-up and
  MLflow run-context work cost ~0.3 s more after it, when every first isinstance() against an ABC walks
  TensorFlow's thousands of classes. A server is probed there too (a dead one fails before TensorFlow starts);
  a SQLite store that does not exist yet is left to the run, so a run refused for its data makes no file.
- Keras' scikit-learn wrappers (keras.wrappers, imported by `import tensorflow` whenever scikit-learn is
  installed, as it is beside MLflow) cost 0.75 s of the import; the trainer does not use them, so scikit-learn
  is hidden from that import alone. It imports normally afterwards (`import sklearn` works in user code); only
  `keras.wrappers.SKLearn*` in the same process then says scikit-learn is missing. verbose=true keeps it.
  matplotlib likewise: Keras' `plot_image_gallery` imports pyplot with TensorFlow (0.2-0.6 s of the import), and
  the trainer draws its end-of-run plot without it (tracking/curves.py); only `keras.visualization`'s plots then
  say matplotlib is missing, in that process; `import matplotlib` works as before (`trainer compare`, LR finder).
- Python's cyclic garbage collector ran again and again over the objects the imports made, ever more of them:
  `import tensorflow` took 3.2 s without it against 3.9 s with it (medians of 3). It is paused from MLflow's
  import to the end of TensorFlow's (`collector_paused`), and what those imports made is then frozen out of
  later collections (gc.freeze: modules, classes and functions that live as long as the process). That also
  spares the interpreter's last collections at exit, which walked every object TensorFlow made:
  `python -c "import tensorflow"` spends ~1.0 s from the end of the import to its exit, 0.1 s with them frozen.
  Only the first start-up of a process does this, so a sweep's later jobs in one process freeze nothing of
  earlier ones. A 1-step run, launch to exit: 8.70 s without the pause, 6.11 s with it (medians of 4; ~1.3 s of
  it before the first step, ~1.3 s at the exit). trainer/sweep.py, which Hydra loads for its callback on every
  run, no longer imports MLflow, so MLflow's import falls within the pause.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

VERBOSE_ENV = "TRAINER_VERBOSE"
# absl's INFO/WARNING lines (I1126 12:00:00.000 or I0000 00:00:1795...), its preamble, and the second line of
# cpu_feature_guard's notice: the start-up chatter of TensorFlow's C++ side.
NOISE = re.compile(r"^([IW]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl::InitializeLog|To enable the "
                   r"following instructions: .* in other operations, rebuild TensorFlow)")  # fmt: skip
QUIET_LOGGERS = {
    "mlflow.tracking.fluent": logging.WARNING,
    "alembic": logging.WARNING,
    "matplotlib": logging.ERROR,
    "mlflow.system_metrics": logging.WARNING,  # the sampler's start and stop lines (tracking.system_metrics)
}
# Imported by `import tensorflow` only for Keras features the trainer does not use, each optionally (ImportError
# -> None): keras.wrappers (scikit-learn) and keras.visualization (matplotlib.pyplot).
UNUSED_BY_TF_IMPORT = ("sklearn", "matplotlib")


def verbose(requested: bool = False) -> bool:
    return requested or os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def quiet_libraries(requested_verbose: bool = False) -> None:
    """Before TensorFlow or MLflow is imported: their start-up INFO lines off, unless verbose."""
    if verbose(requested_verbose):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def import_tensorflow(requested_verbose: bool = False):
    """`import tensorflow`, its native start-up lines dropped and Keras' scikit-learn wrappers skipped,
    unless verbose; the module."""
    if verbose(requested_verbose) or "tensorflow" in sys.modules:
        import tensorflow

        return tensorflow
    with _native_stderr_filtered(), _hidden(*UNUSED_BY_TF_IMPORT):
        import tensorflow
    return tensorflow


def before_training(cfg) -> None:
    """The training command's start: libraries quiet, the store opened, then TensorFlow imported."""
    quiet_libraries(cfg.verbose)
    with collector_paused(first_only="tensorflow"):
        import mlflow

        from trainer.lifecycle import sqlite_path
        from trainer.tracking import open_store

        uri = cfg.tracking.uri or mlflow.get_tracking_uri()
        path = sqlite_path(uri)
        if path is None or path.is_file():  # a new SQLite file is made by the run itself, once the data has loaded:
            open_store(uri, cfg.tracking.experiment)  # a bad data file leaves no empty store behind
        import_tensorflow(cfg.verbose)


@contextmanager
def collector_paused(first_only: str) -> Iterator[None]:
    """No cyclic garbage collection within the block; what is alive at its end is frozen out of later ones
    (gc.freeze). Only while module `first_only` is not imported yet (a process's first start-up), and only
    where the collector is on."""
    if first_only in sys.modules or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


@contextmanager
def _hidden(*modules: str) -> Iterator[None]:
    """`import module` raises ImportError within the block for each of `modules` (Python's documented
    sys.modules[name] = None), and works as before after it. A module imported already is not hidden."""
    hidden = [m for m in modules if m not in sys.modules]
    for module in hidden:
        sys.modules[module] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for module in hidden:
            if sys.modules.get(module, ...) is None:
                del sys.modules[module]


@contextmanager
def _native_stderr_filtered() -> Iterator[None]:
    """fd 2 into a temporary file for the block; then what it got, less NOISE, onto the real stderr."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr (a daemon): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [ln for ln in captured.read().decode(errors="replace").splitlines(True) if not NOISE.match(ln)]
            if kept:
                os.write(2, "".join(kept).encode())
