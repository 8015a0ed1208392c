"""A Hydra multirun as one MLflow parent run with a child run per job.

`SweepCallback` is registered in conf/config.yaml under `hydra.callbacks`. At the start of a multirun it
creates the parent run and leaves its id in the sweep directory, where every job finds it whatever the
launcher (in-process, joblib processes, SLURM nodes sharing the directory). At the end it gives the parent
the sweep's summary: job count, the best job and its objective, Optuna's best params when an Optuna
sweeper ran, and the comparison table and plot of the children.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import yaml
from hydra.experimental.callback import Callback
from mlflow.entities import RunStatus
from omegaconf import DictConfig, OmegaConf

from trainer.tracking import flatten

PARENT_FILE = ".mlflow_sweep.json"


def parent_run_id(sweep_dir: str | Path) -> str | None:
    """The parent run of the sweep this job belongs to, if a SweepCallback made one."""
    return _sweep_record(sweep_dir).get("run_id")


def job_identity(sweep_dir: str | Path, job_num: int, overrides: Sequence[str]) -> tuple[dict[str, str], str]:
    """Tags tying a job to its parent run, and a run name made of only the overrides the sweep varies."""
    record = _sweep_record(sweep_dir)
    if "run_id" not in record:
        return {}, ""
    varying = set(record.get("varying", []))
    shown = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in varying]
    return {"mlflow.parentRunId": record["run_id"], "sweep_job": str(job_num)}, " ".join(shown)


def _sweep_record(sweep_dir: str | Path) -> dict:
    path = Path(sweep_dir) / PARENT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _varying_keys(overrides: Sequence[str], sweeper: dict) -> list[str]:
    """Keys the sweep changes from job to job: comma/range overrides and the sweeper's own params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    keys = [o.get_key_element() for o in parsed if o.is_sweep_override()]
    return keys + [str(k) for k in (sweeper.get("params") or {})]


class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        client = _client(config)
        experiment = client.get_experiment_by_name(config.tracking.experiment)
        exp_id = experiment.experiment_id if experiment else client.create_experiment(config.tracking.experiment)
        sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=False)
        overrides = list(config.hydra.overrides.task)
        tags = {"sweep": "true", "overrides": " ".join(overrides), "sweeper": str(sweeper.get("_target_", ""))}
        run = client.create_run(exp_id, run_name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
        params = {f"sweep.{k}": v for k, v in flatten(sweeper.get("params") or {}).items()}
        params["sweep.overrides"] = " ".join(overrides)[:6000]
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        record = {"run_id": run.info.run_id, "varying": _varying_keys(overrides, sweeper)}
        (sweep_dir / PARENT_FILE).write_text(json.dumps(record))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        run_id = parent_run_id(sweep_dir)
        if run_id is None:
            return
        client = _client(config)
        children = client.search_runs(
            [client.get_run(run_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=10000
        )
        client.log_metric(run_id, "sweep/jobs", len(children))
        failed = [c for c in children if c.info.status != "FINISHED"]
        client.log_metric(run_id, "sweep/failed_jobs", len(failed))
        scored = [(_objective(c), c) for c in children if _objective(c) is not None]
        if scored:
            value, best = min(scored, key=lambda pair: pair[0])
            client.log_metric(run_id, "best/objective", value)
            client.set_tag(run_id, "best_run_id", best.info.run_id)
            client.set_tag(run_id, "best_overrides", best.data.tags.get("overrides", ""))
        _log_optuna_result(client, run_id, sweep_dir)
        _log_comparison(client, run_id, config)
        status = "FAILED" if failed and len(failed) == len(children) else "FINISHED"
        client.set_terminated(run_id, RunStatus.to_string(getattr(RunStatus, status)))


def _client(config: DictConfig) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(config.tracking.uri or None)


def _objective(run) -> float | None:
    metrics = run.data.metrics
    return metrics.get("val/loss", metrics.get("train/final_loss"))


def _log_optuna_result(client: mlflow.MlflowClient, run_id: str, sweep_dir: Path) -> None:
    path = sweep_dir / "optimization_results.yaml"
    if not path.is_file():
        return
    result = yaml.safe_load(path.read_text())
    for key, value in (result.get("best_params") or {}).items():
        client.log_param(run_id, f"best.{key}", value)
    if result.get("best_value") is not None:
        client.log_metric(run_id, "best/optuna_value", float(result["best_value"]))
    client.log_artifact(run_id, str(path))


def _log_comparison(client: mlflow.MlflowClient, run_id: str, config: DictConfig) -> None:
    """The children's table and loss/grad-norm plot, as artifacts of the parent (trainer.compare)."""
    try:
        from trainer import compare
    except ImportError:
        return
    out = Path(config.hydra.sweep.dir) / "compare"
    compare.main(["--uri", client.tracking_uri, "--experiment", config.tracking.experiment, "--parent", run_id,
                  "--out", str(out), "--format", "markdown"])  # fmt: skip
