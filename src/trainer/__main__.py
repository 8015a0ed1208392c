"""The CLI: `python -m trainer model=mlp optimizer.lr=3e-3` (or `trainer ...`). Returns the objective.

TensorFlow is imported only once Hydra has composed and checked the config, so a typo fails in
a second, not after TensorFlow's start-up.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import hydra._internal.utils as hydra_utils
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from trainer.config import TrainerError, check, register


def _conf_dir() -> str:
    """Installed wheels carry conf/ inside the package; an editable install reads the repo's conf/."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return str(packaged if packaged.is_dir() else here.parents[1] / "conf")


register()


def _one_line(error: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line config errors as one line: the message, the key, what is valid."""
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


def _report_config_errors(func):
    """Stands in for Hydra's run_and_report: config errors print one line (no stack trace hint), others as
    Hydra prints them. HYDRA_FULL_ERROR=1 still shows everything."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return func()
    except (HydraException, OmegaConfBaseException) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)


_hydra_run_and_report = hydra_utils.run_and_report
hydra_utils.run_and_report = lambda func: _hydra_run_and_report(lambda: _report_config_errors(func))


@hydra.main(version_base="1.3", config_path=_conf_dir(), config_name="config")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    try:
        check(cfg)  # range errors too fail before TensorFlow is imported
    except TrainerError as e:
        _fail(e)

    from trainer.fit import Interrupted
    from trainer.train import train

    tags = {}
    if hc.mode == RunMode.MULTIRUN:
        from trainer.sweep import job_identity

        tags, name = job_identity(hc.sweep.dir, hc.job.num, hc.overrides.task)
        if name and not cfg.tracking.run_name:
            cfg.tracking.run_name = name
    try:
        return train(cfg, overrides=list(hc.overrides.task), output_dir=hc.runtime.output_dir, tags=tags)
    except TrainerError as e:
        _fail(e)
    except Interrupted as e:
        print(f"stopped: {e}; continue with: python -m trainer resume={Path(e.directory).parent}", file=sys.stderr)
        sys.exit(128 + e.signum)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def _fail(error: TrainerError) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
