"""What a run was made from: its data (MLflow dataset inputs) and its code (git commit, command, versions as tags).

Each split is one MLflow dataset input, context `training` or `validation`: its digest is a hash of the data
option's files (size, mtime and the first and last MiB of each, never a full read: a 2 GB file is
fingerprinted in milliseconds) and of the option's settings that change which examples the split holds
(target, features, val_fraction, seed, ...). Two runs on the same files and settings show the same digest in
the UI; an edited file, or another split, a different one. Synthetic data has no file: its source is the
generator's config.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag
from mlflow.types import Schema, TensorSpec
from omegaconf import DictConfig, OmegaConf

SAMPLE_BYTES = 1 << 20  # read from each end of a file for its digest
FILE_KEYS = ("path", "y")  # data keys that may name files (numpy's y: the .npy of targets)
HOW_HELD = ("in_memory", "memory_limit_mb", "shuffle", "shuffle_buffer", "cache")  # same examples either way
GIT_TIMEOUT_S = 5
VERSIONED = {"tensorflow": "tensorflow", "keras": "keras", "mlflow": "mlflow", "hydra": "hydra-core"}
TAG = "trainer."  # the prefix of the trainer's own tags (lifecycle's trainer.host, ...)


class LocalFiles(DatasetSource):
    """Files on this machine, as MLflow's local artifact source records them (source type `local`)."""

    def __init__(self, uri: str):
        self.uri = uri

    @staticmethod
    def _get_source_type() -> str:
        return "local"

    def load(self, **kwargs: Any) -> str:
        return self.uri

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False  # never picked by MLflow's own resolver: only made here

    @classmethod
    def _resolve(cls, raw_source: Any) -> LocalFiles:
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, str]:
        return {"uri": self.uri}

    @classmethod
    def from_dict(cls, source_dict: dict[str, Any]) -> LocalFiles:
        return cls(source_dict["uri"])


# --- data --------------------------------------------------------------------------------------------
def file_digest(path: str | Path) -> str:
    """sha256 of the size, the mtime and the first and last SAMPLE_BYTES: cheap for any size of file.

    A file rewritten with the same bytes gets a new digest (its mtime moved); an edit inside the middle of a
    file larger than 2 MiB that keeps its size and mtime goes unseen: the price of not reading it whole."""
    stat = os.stat(path)
    h = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_BYTES))
        if stat.st_size > SAMPLE_BYTES:
            f.seek(max(stat.st_size - SAMPLE_BYTES, SAMPLE_BYTES))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def _files(value: Any) -> list[str]:
    """The files a data key names: a file, a glob, a list of them, or a folder (image_folder: every file)."""
    names = [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]
    found: list[str] = []
    for name in names:
        matches = sorted(glob.glob(name)) if glob.has_magic(name) else [name]
        for match in matches:
            if os.path.isdir(match):
                found += sorted(str(p) for p in Path(match).rglob("*") if p.is_file())
            elif os.path.isfile(match):
                found.append(match)
    return found


def _file_keys(node: Mapping[str, Any]) -> dict[str, list[str]]:
    """The data keys whose values are files that exist, with those files (tape_example's y is a number)."""
    keys = {}
    for key in FILE_KEYS:
        value = node.get(key)
        if isinstance(value, str | list) and (files := _files(value)):
            keys[key] = files
    return keys


def data_inputs(node: DictConfig, data: Any) -> list[DatasetInput]:
    """One dataset input per split the run has: `training`, and `validation` when there is one."""
    raw = OmegaConf.to_container(node, resolve=True)
    files = _file_keys(raw)
    settings = {k: v for k, v in raw.items() if k not in HOW_HELD and k not in files}
    fingerprint = {key: [[f, file_digest(f)] for f in fs] for key, fs in files.items()}
    target = str(raw.get("_target_", "data"))
    if files:
        shown = raw[next(iter(files))]
        name = Path(shown).name if isinstance(shown, str) else target.rsplit(".", 1)[-1]
        source: DatasetSource = LocalFiles(str(Path(shown).resolve()) if isinstance(shown, str) else str(shown))
    else:
        name, source = target.rsplit(".", 1)[-1], CodeDatasetSource({k: str(v) for k, v in settings.items()})
    schema = _schema(data)
    splits = ["training", *(["validation"] if _has_validation(data) else [])]
    inputs = []
    for split in splits:
        key = json.dumps({"files": fingerprint, "settings": settings, "split": split}, sort_keys=True, default=str)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        d = MetaDataset(source, name=name, digest=digest, schema=schema).to_dict()  # public; the entity from it
        entity = DatasetEntity(d["name"], d["digest"], d["source_type"], d["source"], d.get("schema"), d.get("profile"))
        inputs.append(DatasetInput(entity, [InputTag("mlflow.data.context", split)]))
    return inputs


def _has_validation(data: Any) -> bool:
    return getattr(data, "x_val", None) is not None or getattr(data, "val", None) is not None


def _schema(data: Any) -> Schema | None:
    """x and y as tensor specs (dtype, shape per batch): known without reading the data again."""
    try:
        x_dtype = data.x_train.dtype if data.x_train is not None else np.dtype("float32")
        return Schema([
            TensorSpec(np.dtype(x_dtype), (-1, *data.x_shape), "x"),
            TensorSpec(np.dtype(data.y_dtype), (-1, *data.y_shape), "y"),
        ])  # fmt: skip
    except (AttributeError, TypeError, ValueError):  # a stream whose element spec is not numpy-typed
        return None


# --- code ------------------------------------------------------------------------------------------------
def git_tags(cwd: str | Path | None = None) -> dict[str, str]:
    """The commit and dirty flag of the git working tree the trainer runs in; {} outside one or without git.

    Dirty: a tracked file differs from the commit. Untracked files do not count: the trainer's own outputs
    (mlflow.db, outputs/) would make every second run in a fresh repository dirty."""
    try:
        head = _git(["rev-parse", "HEAD"], cwd)
        status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    except (OSError, subprocess.SubprocessError):
        return {}
    return {f"{TAG}git_commit": head.strip(), f"{TAG}git_dirty": str(bool(status.strip())).lower()}


def _git(args: list[str], cwd: str | Path | None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True,
                          timeout=GIT_TIMEOUT_S).stdout  # fmt: skip


def version_tags() -> dict[str, str]:
    """The libraries' versions as this process imported them; the installed ones for those it has not."""
    tags = {}
    for module, dist in VERSIONED.items():
        version = getattr(sys.modules.get(module), "__version__", None)
        if version is None:
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
        tags[f"{TAG}versions.{module}"] = str(version)
    return tags


def code_tags(argv: Iterable[str] | None = None) -> dict[str, str]:
    """Git state, the command line and the library versions: what reproducing the run needs besides its config."""
    command = shlex.join(sys.argv if argv is None else argv)
    return {**git_tags(), f"{TAG}command": command[:5000], **version_tags()}


def log_data(run: Any, node: DictConfig, data: Any) -> None:
    """The run's dataset inputs (see data_inputs), logged once at its start."""
    from trainer.lifecycle import retry_busy

    retry_busy(run.client.log_inputs, run.run_id, datasets=data_inputs(node, data))
