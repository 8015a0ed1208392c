"""Shared fixtures: the repo's paths, real Hydra composition and the real CLI in a subprocess."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

import trainer.config

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
CLI_TIMEOUT_S = 120


def sqlite_uri(directory: Path) -> str:
    """An MLflow SQLite store inside `directory` (absolute path: sqlite:////abs/path/mlflow.db)."""
    return f"sqlite:///{Path(directory).resolve() / 'mlflow.db'}"


def new_store(directory: Path, template: Path) -> str:
    """A fresh, empty MLflow store at directory/mlflow.db: a copy of `template` (see `mlflow_template`)."""
    shutil.copyfile(template, Path(directory) / "mlflow.db")
    return sqlite_uri(directory)


_composed: dict[tuple[str, ...], DictConfig] = {}


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose conf/config.yaml exactly as the CLI does (schemas registered, version_base 1.3).

    Hydra's compose costs ~0.3 s, so each distinct override list is composed once per session and
    every caller gets its own deep copy. Errors are not cached: a bad override raises every time.
    """
    key = tuple(overrides)
    if key not in _composed:
        trainer.config.register()
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                _composed[key] = compose(config_name="config", overrides=list(overrides))
        finally:
            GlobalHydra.instance().clear()
    return copy.deepcopy(_composed[key])


def option_kwargs(group: str, name: str, **changes: Any) -> dict[str, Any]:
    """The keyword arguments Hydra gives the builder of conf/<group>/<name>.yaml (the one home of its
    defaults; the builders have none), with `changes`: for tests that call a builder directly."""
    node = trainer.config.option(group, name)
    if group == "data":  # the shared settings first (conf/data_defaults.yaml), as its defaults list says
        node = OmegaConf.merge(OmegaConf.load(trainer.config.conf_dir() / "data_defaults.yaml"), node)
    values = {k: v for k, v in OmegaConf.to_container(node).items() if not k.startswith("_")}
    if group == "data":  # the keys its function takes, as trainer.data.prepare.load passes them
        from hydra.utils import get_method

        from trainer.data.prepare import _accepted

        accepted = _accepted(get_method(node._target_))
        values = {k: v for k, v in values.items() if accepted is None or k in accepted}
    return {**values, **changes}


def run_cli(
    args: Sequence[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    python_flags: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """`python [flags] -m trainer ARGS` in `cwd`, so outputs/, mlruns/ and mlflow.db land there."""
    full_env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "COLUMNS": "200",  # rich wraps its summary at the console width; keep ids and paths on one line
        "PYTHONUNBUFFERED": "1",
    }
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *python_flags, "-m", "trainer", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cli_job(*names): CLI invocations (test_cli.JOBS) the test reads")


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, created once by MLflow itself (its schema migrations cost ~3 s of
    CPU per new database); `new_store` copies it wherever a test or a CLI run needs a store."""
    from mlflow.tracking import MlflowClient

    directory = tmp_path_factory.mktemp("mlflow-template")
    MlflowClient(sqlite_uri(directory)).search_experiments()  # creates and migrates the database
    return directory / "mlflow.db"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def conf_dir() -> Path:
    return CONF_DIR


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return sqlite_uri(tmp_path)


@pytest.fixture
def compose_cfg(tracking_uri: str) -> Callable[..., DictConfig]:
    """compose_cfg(overrides) -> DictConfig with the MLflow store in tmp_path and no progress bar.

    trainer.progress=false goes first in the overrides, so a test's own override wins; tracking.uri is
    assigned after composing (keeping the composition cache shared) unless the test sets it itself.
    """

    def _compose(overrides: Sequence[str] = ()) -> DictConfig:
        cfg = compose_config(["trainer.progress=false", *overrides])
        if not any(o.lstrip("+~").startswith("tracking.uri=") for o in overrides):
            cfg.tracking.uri = tracking_uri  # set after composing so the cache is shared across tmp_paths
        return cfg

    return _compose


@pytest.fixture(scope="session", name="run_cli")
def run_cli_fixture() -> Callable[..., subprocess.CompletedProcess[str]]:
    """run_cli(args, cwd, env=None, python_flags=()) -> CompletedProcess (text, ~120 s timeout)."""
    return run_cli


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> dict:
    """load_digits (1,797 8x8 images, values 0..16) as uint8 pixels 0..255, written in every format.

    The PNG folder orders examples class by class, files sorted: every other format is written in that order.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tensorflow as tf
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    d = load_digits()
    pixels = (d.images * 255 / 16).round().astype(np.uint8)
    order = np.lexsort((np.arange(len(d.target)), d.target))  # class by class, then the file names below
    x, y = pixels[order], d.target[order].astype(np.int64)
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        folder = root / "png" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{i:05d}.png")
    flat = x.reshape(len(x), -1)
    columns = [f"p{j}" for j in range(64)]
    table = pa.table({**{c: flat[:, j].astype(np.float64) for j, c in enumerate(columns)}, "label": y})
    pq.write_table(table.slice(0, 1000), root / "a.parquet", row_group_size=300)
    pq.write_table(table.slice(1000), root / "b.parquet", row_group_size=300)
    header = ",".join([*columns, "label"])
    np.savetxt(root / "digits.csv", np.column_stack([flat, y]), fmt="%d", delimiter=",", header=header, comments="")
    np.savez(root / "digits.npz", images=x[..., None], labels=y)
    np.save(root / "x.npy", x[..., None])
    np.save(root / "y.npy", y)
    with tf.io.TFRecordWriter(str(root / "digits.tfrecord.gz"), "GZIP") as w:
        for image, label in zip(x, y, strict=True):
            features = {
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
            }
            w.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
    return {"root": root, "x": x[..., None], "y": y}
