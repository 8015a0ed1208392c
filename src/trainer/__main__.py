"""The CLI: `python -m trainer model=mlp optimizer.lr=3e-3` (or `trainer ...`). Returns the objective.

TensorFlow is imported only once Hydra has composed and checked the config, so a typo fails in
a second, not after TensorFlow's start-up.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from trainer.config import TrainerError, register


def _conf_dir() -> str:
    """Installed wheels carry conf/ inside the package; an editable install reads the repo's conf/."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return str(packaged if packaged.is_dir() else here.parents[1] / "conf")


register()


@hydra.main(version_base="1.3", config_path=_conf_dir(), config_name="config")
def main(cfg: DictConfig) -> float:
    from trainer.fit import Interrupted
    from trainer.train import train

    hc = HydraConfig.get()
    tags = {}
    if hc.mode == RunMode.MULTIRUN:
        from trainer.sweep import job_identity

        tags, name = job_identity(hc.sweep.dir, hc.job.num, hc.overrides.task)
        if name and not cfg.tracking.run_name:
            cfg.tracking.run_name = name
    try:
        return train(cfg, overrides=list(hc.overrides.task), output_dir=hc.runtime.output_dir, tags=tags)
    except TrainerError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        print(f"stopped: {e}; continue with: python -m trainer resume={Path(e.directory).parent}", file=sys.stderr)
        sys.exit(128 + e.signum)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


if __name__ == "__main__":
    main()
