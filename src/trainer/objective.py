"""The objective and the best run: one rule for training (fit), sweeps, compare and evaluate.

A run's objective is its final `val/loss`, or `train/final_loss` (the loss over the whole training set) when it
has no validation split. The best child of a sweep is the FINISHED one with the lowest finite objective: a
FAILED or KILLED run may have logged a finite val/loss before it broke, and a diverged one logs NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

PRIMARY = "val/loss"
FALLBACK = "train/final_loss"  # what training logs instead of val/loss without a validation split


def objective_key(metrics: Mapping[str, float]) -> str:
    """Which metric is the objective of a run that logged `metrics`."""
    return PRIMARY if PRIMARY in metrics else FALLBACK


def objective_value(metrics: Mapping[str, float]) -> float | None:
    """The objective, None when the run has none or a non-finite one (it cannot be the best)."""
    value = metrics.get(objective_key(metrics))
    return value if value is not None and math.isfinite(value) else None


def best_run(runs: Iterable[Any]) -> Any | None:
    """The FINISHED MLflow run with the lowest finite objective (the first of equals), None if there is none."""
    scored = [(v, i, r) for i, r in enumerate(runs) if r.info.status == "FINISHED"
              and (v := objective_value(r.data.metrics)) is not None]  # fmt: skip
    return min(scored, key=lambda s: s[:2])[2] if scored else None
