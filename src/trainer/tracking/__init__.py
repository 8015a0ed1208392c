"""MLflow tracking, one job per module:

    run.py      one run: lifecycle (open, resume claim, status at the end), params, artifacts, tags; QuietRun
    sink.py     the metric sink: chunks off the training thread, back-pressure, retries; Chunk, disk_full
    writers.py  the two writers: MLflow's log_batch, and the SQL bulk insert
    tensorboard.py  the same points as TensorBoard event files (tracking.tensorboard=true), by the sink's thread
    connect.py  reaching a store: the HTTP probe, the one-line reason a store cannot be opened
    compat.py   the fence around MLflow's internals (the bulk writer's), checked once, public fallback
    models.py   logging a trained model in MLflow's own format
    ui.py       what the MLflow UI shows of it: run names, the experiment's kind, the run page's link

The names below are imported from their module on first use, so `from trainer.tracking import disk_full`
costs no MLflow import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "Run": "run",
    "QuietRun": "run",
    "flatten": "run",
    "open_store": "run",
    "Chunk": "sink",
    "MetricSink": "sink",
    "disk_full": "sink",
    "LogBatchWriter": "writers",
    "SqlBulkWriter": "writers",
    "stored_through": "writers",
    "probe": "connect",
    "check_readable": "connect",
    "PROBE_TIMEOUT_S": "connect",
    "store_failed": "connect",
    "log_model": "models",
}
__all__ = [  # noqa: RUF022  (grouped by module, as _HOMES)
    "Run", "QuietRun", "flatten", "open_store", "Chunk", "MetricSink", "disk_full", "LogBatchWriter", "SqlBulkWriter",
    "stored_through", "probe", "check_readable", "PROBE_TIMEOUT_S", "store_failed", "log_model",
]  # fmt: skip

if TYPE_CHECKING:
    from trainer.tracking.connect import PROBE_TIMEOUT_S, check_readable, probe, store_failed
    from trainer.tracking.models import log_model
    from trainer.tracking.run import QuietRun, Run, flatten, open_store
    from trainer.tracking.sink import Chunk, MetricSink, disk_full
    from trainer.tracking.writers import LogBatchWriter, SqlBulkWriter, stored_through


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'trainer.tracking' has no attribute {name!r}")
    return getattr(importlib.import_module(f"trainer.tracking.{_HOMES[name]}"), name)
