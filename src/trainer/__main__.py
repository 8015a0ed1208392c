"""The CLI: `trainer model=mlp optimizer.lr=3e-3` (or `python -m trainer ...`) trains and returns the objective;
`trainer compare ...` and `trainer evaluate ...` read the store (trainer.cli: one key=value grammar for all three).

TensorFlow is imported only once Hydra has composed and checked the config, so a typo fails in
a second, not after TensorFlow's start-up.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from trainer import cli, compat, startup
from trainer.config import TrainerError, causes, check, conf_dir, first_line, register

if TYPE_CHECKING:
    from trainer.sweep import FailedJob, Outcome

register()
# A log record that cannot be written (Hydra's job log on a full disk) is dropped, not printed with a
# traceback per record: the failure itself reaches the user as one `error:` line.
logging.raiseExceptions = False


def _one_line(error: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line config errors as one line: the message, the key, what is valid."""
    from trainer.config import unimportable_target

    if unimportable := unimportable_target(error):  # e.g. a hydra.callbacks target: the reason, not Hydra's lines
        return unimportable
    lines = [ln for e in (error, error.__cause__) if e is not None for ln in str(e).splitlines()]
    kept, options = [], []
    for line in lines:
        text = line.strip()
        if text.startswith("Config search path"):
            break
        if line.startswith("\t") and kept and kept[-1].startswith("available options"):
            options.append(text)
        elif text and not line.startswith((" ", "\t")) and not text.startswith(("To append", "Config search path")):
            kept.append(text[0].lower() + text[1:] if text.startswith("Available") else text)
    message = "; ".join(dict.fromkeys(kept))  # the cause often repeats the error's own line
    return f"{message} {', '.join(options)}" if options else message


def _report_errors(func):
    """Stands in for Hydra's run_and_report: config errors print one line (no stack trace hint), others as
    Hydra prints them. HYDRA_FULL_ERROR=1 still shows everything. A multirun's parent run is closed however
    the sweep ends; a sweep whose every job failed exits 1 with one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        result = func()
    except BaseException as e:
        outcome = _end_sweep(e)
        if isinstance(e, Exception) and outcome and outcome.all_failed:  # Optuna: "No trials are completed yet"
            _exit_all_failed(outcome)
        if isinstance(e, ValueError) and "Config group override must be a string" in str(e):
            nulled = [a for a in sys.argv[1:] if a.endswith(("=null", "=None")) and "." not in a.partition("=")[0]]
            group = nulled[0].partition("=")[0] if nulled else "GROUP"
            sys.exit(cli.print_error(f"{group}=null: a config group is left out with ~{group} (Hydra's delete)"))
        if not isinstance(e, (HydraException, OmegaConfBaseException)) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(cli.print_error(_one_line(e)))
    outcome = _end_sweep(None)
    if outcome and outcome.all_failed:
        _exit_all_failed(outcome)
    elif outcome and outcome.failed:  # each one's error was printed as it failed
        print(f"sweep: {outcome}", file=sys.stderr)
    return result


def _end_sweep(error: BaseException | None) -> Outcome | None:
    """The outcome of a multirun that ended (or broke) in this call, its parent run closed; None otherwise.

    trainer.sweep is looked up, not imported: only a multirun loads it, and a single run's typo should not
    wait for MLflow's import."""
    sweep = sys.modules.get("trainer.sweep")
    return sweep.end(error) if sweep else None


def _exit_all_failed(outcome: Outcome) -> None:
    sys.exit(cli.print_error(str(outcome)))


# Hydra's private run_and_report, fenced (trainer/compat.py); without it, Hydra prints errors its own way and
# _report_errors wraps the whole command instead, so a sweep's parent run is still closed.
_HYDRA_HOOKED = compat.wrap_hydra_errors(_report_errors)


def main() -> None:
    """The `trainer` command: `trainer compare|evaluate key=value ...` run that command (before Hydra sees
    argv); `trainer lr-find ...` is training with lr_find=true; anything else is training, Hydra's command
    line unchanged (`trainer --help`, `-m`, overrides)."""
    cli.plain_when_piped()
    sys.argv[1:] = cli.training_argv(sys.argv[1:])  # `trainer lr-find ...`: training with lr_find=true
    status = cli.main(sys.argv[1:])
    if status is not None:
        sys.exit(status)
    if not {"-m", "--multirun"} & set(sys.argv[1:]):  # one run: before Hydra's callback imports start threads
        from trainer.process import hold_signals

        hold_signals()  # until the config is known (_train): a multi-worker run holds them on (trainer/cluster.py)
    _train_main() if _HYDRA_HOOKED else _report_errors(_train_main)  # the objective goes to the sweeper


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def _train_main(cfg: DictConfig) -> float | FailedJob:
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return _sweep_job(cfg, hc)
    try:
        return _train(cfg, hc, {})
    except TrainerError as e:
        _fail(e)


def _train(cfg: DictConfig, hc: DictConfig, tags: dict[str, str]) -> float:
    from trainer import process

    if cfg.trainer.get("strategy") != "multi_worker":
        process.release_signals(take=False)  # held since main(): only a multi-worker run needs them held on
        return _start_training(cfg, hc, tags)
    process.hold_signals()  # held since main() for one run; a multirun's job holds them from here
    try:
        return _start_training(cfg, hc, tags)
    finally:
        process.release_signals()


def _start_training(cfg: DictConfig, hc: DictConfig, tags: dict[str, str]) -> float:
    from trainer.secrets import scrub_files

    scrub_files(Path(hc.runtime.output_dir) / hc.output_subdir) if hc.output_subdir else None  # Hydra's copies
    check(cfg)  # range errors too fail before TensorFlow is imported
    startup.before_training(cfg)  # quiet libraries, the store opened, TensorFlow imported (its chatter dropped)

    from trainer.cluster import Stopped
    from trainer.fit import Interrupted
    from trainer.process import stop_within
    from trainer.train import train

    stop_within()  # a signal ends this process within seconds, whatever the model's size

    try:
        return train(cfg, overrides=list(hc.overrides.task), output_dir=hc.runtime.output_dir, tags=tags)
    except Stopped as e:  # before training began: nothing to save
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except Interrupted as e:
        print(f"stopped: {e}; continue with: python -m trainer resume={Path(e.directory).parent}", file=sys.stderr)
        sys.exit(128 + e.signum)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    except Exception as e:
        from trainer.secrets import redact
        from trainer.tracking import disk_full, store_failed

        resume = f"python -m trainer resume={cfg.get('resume') or hc.runtime.output_dir}"
        if disk_full(e):
            raise TrainerError(f"no space left on the device ({_last_line(e)}); what was stored is kept: free space, "
                               f"then resume: {resume}") from e  # fmt: skip
        if store_failed(e) and not isinstance(e, TrainerError):
            import mlflow

            store = redact(mlflow.get_tracking_uri())
            raise TrainerError(f"the tracking store {store} failed ({_last_line(e)[:300]}); what was stored is "
                               f"kept: once it works again, resume: {resume}") from e  # fmt: skip
        raise


def _last_line(error: BaseException) -> str:
    """The innermost cause's first line: SQLAlchemy and TensorFlow wrap the OS's words in their own."""
    *_, innermost = causes(error)
    return first_line(innermost)


def _sweep_job(cfg: DictConfig, hc: DictConfig) -> float | FailedJob:
    """One job of a multirun. Its failure is one line, a FAILED child run and a failed trial for the sweeper,
    never the end of the sweep: the other jobs run, in this process or beside it."""
    from trainer import sweep

    tags, name = sweep.job_identity(hc.sweep.dir, hc.job.num, hc.overrides.task)
    if name and not cfg.tracking.run_name:
        cfg.tracking.run_name = name
    try:
        return _train(cfg, hc, tags)
    except Exception as e:  # a bug or a TensorFlow error in one job is that job's failure too
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not isinstance(e, TrainerError):
            traceback.print_exc()
        label = name or " ".join(hc.overrides.task)
        cli.print_error(f"job {hc.job.num} ({label}): {sweep.first_line(e)}")  # the sweep goes on
        sweep.record_failed_job(cfg.tracking.uri, hc.sweep.dir, hc.job.num, tags, list(hc.overrides.task), e)
        return sweep.FailedJob(sweep.first_line(e))


def _fail(error: TrainerError) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    sys.exit(cli.print_error(error))


if __name__ == "__main__":
    main()
