"""A Hydra multirun as one MLflow parent run with a child run per job.

`SweepCallback` is registered in conf/config.yaml under `hydra.callbacks`. At the start of a multirun it
creates the parent run and leaves its id in the sweep directory, where every job finds it whatever the
launcher (in-process, joblib processes, SLURM nodes sharing the directory). At the end it gives the parent
the sweep's summary: job count, Optuna's best params when an Optuna sweeper ran, and through trainer.compare
the comparison table and plot of the children and the best child (trainer.objective's rule, found once).

A job that fails does not end the sweep (see `FailedJob`): it is a FAILED child with its `error` tag,
the parent counts it in `sweep/failed_jobs` and ends FINISHED unless every job failed.

MLflow is imported where a sweep uses it, not with this module: Hydra instantiates the callback for every
command, a single run too, and a run imports MLflow later with the collector paused (trainer/startup.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from trainer.lr_find import TAG as LR_FIND_TAG
from trainer.secrets import redact, redact_tree
from trainer.tracking import ui

if TYPE_CHECKING:
    import mlflow

PARENT_FILE = ".mlflow_sweep.json"


@dataclass(frozen=True)
class FailedJob:
    """What a failed job returns to its sweeper: a failed trial, not the end of the sweep.

    Hydra's BasicSweeper keeps it; the Optuna sweeper (hydra-optuna-sweeper 1.3.0, Optuna 2.10) cannot turn it
    into a float, so it marks the trial FAIL ("Failed experiment: ...") and samples on. The alternatives end the
    sweep: a job that raises is re-raised by the BasicSweeper once its batch (all jobs, by default) has run and
    by the Optuna sweeper past `max_failure_rate`; a NaN makes that Optuna sweeper crash telling Optuna a FAIL
    with a value ("Values were told..."); `sys.exit` in a joblib worker tears down the pool with the healthy
    jobs in it (they were left RUNNING with no points)."""

    error: str

    def __float__(self) -> float:
        raise ValueError(self.error)

    def __str__(self) -> str:  # the sweeper's log line; the error itself was printed as the job failed
        return "a failed job (its error is above)"


@dataclass(frozen=True)
class Outcome:
    """How a sweep ended, for the one line the CLI prints when some or all of its jobs failed."""

    jobs: int
    failed: tuple[int, ...]  # job numbers
    first_error: str  # the lowest-numbered failed job's
    parent: str
    uri: str

    @property
    def all_failed(self) -> bool:
        return self.jobs > 0 and len(self.failed) == self.jobs

    def __str__(self) -> str:
        where = f"FAILED child runs of run {self.parent} in {self.uri}"
        if self.all_failed:  # often one cause for all (a bad shared value): the first says which
            return f"all {self.jobs} jobs of the sweep failed (job {self.failed[0]}: {self.first_error}); {where}"
        return f"{len(self.failed)} of {self.jobs} jobs failed (job {', '.join(map(str, self.failed))}); {where}"


class _Current:
    """The multirun of this process (Hydra runs one at a time): its config while the parent run is open, then
    its outcome until the CLI takes it (`end`)."""

    config: DictConfig | None = None
    outcome: Outcome | None = None


def parent_run_id(sweep_dir: str | Path) -> str | None:
    """The parent run of the sweep this job belongs to, if a SweepCallback made one."""
    return _sweep_record(sweep_dir).get("run_id")


def job_identity(sweep_dir: str | Path, job_num: int, overrides: Sequence[str]) -> tuple[dict[str, str], str]:
    """Tags tying a job to its parent run, and a run name made of only the overrides the sweep varies
    (trainer.tracking.ui.run_name)."""
    record = _sweep_record(sweep_dir)
    if "run_id" not in record:
        return {}, ""
    name = ui.run_name(overrides, varying=record.get("varying", []), job=job_num)
    return {"mlflow.parentRunId": record["run_id"], "sweep_job": str(job_num)}, name


def first_line(error: BaseException) -> str:
    """An error as one line: a TrainerError's message, anything else with its type."""
    from trainer.config import TrainerError
    from trainer.config import first_line as line

    if isinstance(error, TrainerError) or not str(error).strip():
        return line(error)  # the message (or, for an empty one, the type's name)
    return f"{type(error).__name__}: {line(error)}"


def record_failed_job(
    uri: str | None, sweep_dir: str | Path, job_num: int, tags: dict[str, str], overrides: Sequence[str],
    error: BaseException,
) -> None:  # fmt: skip
    """A job that failed before its run existed (a bad value, a missing file) still shows as a FAILED child."""
    run_id = parent_run_id(sweep_dir)
    if run_id is None:
        return
    try:
        import mlflow

        client = mlflow.MlflowClient(uri or None)
        experiment_id = client.get_run(run_id).info.experiment_id
        query = f"tags.`mlflow.parentRunId` = '{run_id}' and tags.sweep_job = '{job_num}'"
        found = client.search_runs([experiment_id], query)
        if any(r.data.tags.get(LR_FIND_TAG) != "true" for r in found):
            return  # training had started: the run closed itself as FAILED with its error
        # none, or only optimizer.lr=auto's range test (its own run, not the job's): the job's failure is recorded
        _, name = job_identity(sweep_dir, job_num, overrides)
        child_tags = redact_tree({**tags, "overrides": " ".join(overrides), "error": first_line(error)[:5000]})
        run = client.create_run(experiment_id, run_name=name or None, tags=child_tags)
        client.set_terminated(run.info.run_id, "FAILED")
    except Exception as e:  # the job's own error was printed; this only costs the sweep's count of it
        print(f"warning: job {job_num}: its failure could not be recorded in {uri} ({first_line(e)})", file=sys.stderr)


def end(error: BaseException | None = None) -> Outcome | None:
    """The outcome of the multirun that just ended, closing its parent run if the sweep broke off before
    `on_multirun_end` (a sweeper's exception, Ctrl-C): FAILED with the error, KILLED on an interrupt."""
    if _Current.config is not None:
        config, _Current.config = _Current.config, None
        _Current.outcome = _close(config, error)
    outcome, _Current.outcome = _Current.outcome, None
    return outcome


def _sweep_record(sweep_dir: str | Path) -> dict:
    path = Path(sweep_dir) / PARENT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _varying_keys(overrides: Sequence[str], sweeper: dict) -> list[str]:
    """Keys the sweep changes from job to job: comma/range overrides and the sweeper's own params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    keys = [o.get_key_element() for o in parsed if o.is_sweep_override()]
    return keys + [str(k) for k in (sweeper.get("params") or {})]


def launcher_problem(config: DictConfig) -> str | None:
    """Why the sweep's launcher cannot start a job here, found before the parent run is made; None if it can.
    launcher=slurm off a cluster was submitit's 31-line traceback, after an empty FAILED parent run."""
    target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    if target.endswith(".SlurmLauncher") and shutil.which("srun") is None:  # what submitit checks first
        return ("launcher=slurm: this machine is no SLURM cluster's (srun is not on PATH): run the sweep where "
                "sbatch and srun are (a login node), or use launcher=local_parallel here")  # fmt: skip
    return None


class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from trainer.process import release_signals

        release_signals(take=False)  # a launcher's processes and threads must not inherit signals held (hydra.mode)
        if problem := launcher_problem(config):  # SystemExit: Hydra turns a callback's exception into a warning
            from trainer import cli

            sys.exit(cli.print_error(problem))
        from trainer import lifecycle
        from trainer.tracking import flatten

        client = _client(config)
        experiment = client.get_experiment_by_name(config.tracking.experiment)
        exp_id = experiment.experiment_id if experiment else client.create_experiment(config.tracking.experiment)
        ui.mark_training(client, exp_id)  # the UI opens it on its runs
        os.environ.setdefault(ui.QUIET_URL_ENV, "true")  # no "View run" lines of MLflow's for the parent
        sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=False)
        overrides = list(config.hydra.overrides.task)
        tags = {"sweep": "true", "overrides": " ".join(overrides), "sweeper": str(sweeper.get("_target_", "")),
                **lifecycle.process_tags()}  # a multirun killed -9 is closed by the next trainer run  # fmt: skip
        run = client.create_run(exp_id, run_name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", tags=redact_tree(tags))
        params = {f"sweep.{k}": v for k, v in flatten(sweeper.get("params") or {}).items()}
        params["sweep.overrides"] = redact(" ".join(overrides))[:6000]
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        record = {"run_id": run.info.run_id, "varying": _varying_keys(overrides, sweeper)}
        (sweep_dir / PARENT_FILE).write_text(json.dumps(record))
        _Current.config, _Current.outcome = config, None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _Current.outcome = _close(config)
        _Current.config = None  # only now: if closing failed (Hydra warns and goes on), `end` tries again


def _close(config: DictConfig, error: BaseException | None = None) -> Outcome | None:
    """The parent's summary and status: FINISHED unless every job failed or the sweeper broke off (FAILED, its
    error in tag `error`) or the user stopped the sweep (KILLED)."""
    sweep_dir = Path(config.hydra.sweep.dir)
    run_id = parent_run_id(sweep_dir)
    if run_id is None:
        return None
    client = _client(config)
    children = client.search_runs(
        [client.get_run(run_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=10000
    )
    children = [c for c in children if c.data.tags.get(LR_FIND_TAG) != "true"]  # optimizer.lr=auto's finder runs
    client.log_metric(run_id, "sweep/jobs", len(children))
    failed = sorted((c for c in children if c.info.status != "FINISHED"), key=_job_num)
    client.log_metric(run_id, "sweep/failed_jobs", len(failed))
    _log_optuna_result(client, run_id, sweep_dir)
    if children:
        _log_comparison(client, run_id, config)
    first = failed[0].data.tags.get("error", failed[0].info.status) if failed else ""
    outcome = Outcome(len(children), tuple(map(_job_num, failed)), first, run_id, client.tracking_uri)
    status, tag = _status(outcome, error)
    if tag:
        client.set_tag(run_id, "error", tag[:5000])
    client.set_terminated(run_id, status)
    return outcome


def _status(outcome: Outcome, error: BaseException | None) -> tuple[str, str]:
    """The parent's status and `error` tag."""
    if error is not None and not isinstance(error, Exception):  # Ctrl-C or SIGTERM: the user stopped it
        return "KILLED", ""
    if outcome.all_failed:  # Optuna then raises "No trials are completed yet": this says more
        return "FAILED", str(outcome)
    return ("FAILED", first_line(error)) if error is not None else ("FINISHED", "")


def _job_num(run) -> int:
    return int(run.data.tags.get("sweep_job", -1))


def _client(config: DictConfig) -> mlflow.MlflowClient:
    import mlflow

    return mlflow.MlflowClient(config.tracking.uri or None)


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
    """The children's table and loss/grad-norm plot as artifacts of the parent, and its best child (tags
    best_run_id, best_overrides, metric best/objective): `trainer compare parent=<run id>`, in this process."""
    from trainer import cli, compare

    out = str(Path(config.hydra.sweep.dir) / "compare")
    opts = compare.Options(uri=client.tracking_uri, parent=run_id, out=out, format="markdown")
    cli.run(lambda: compare.compare(opts))
