"""What a run records besides its curves: MLflow's system metrics, the data it was trained on (dataset inputs
with a cheap digest), and what reproducing it needs (git commit and dirty flag, command line, library versions).

Real SQLite stores in tmp_path, the trainer run in process, real git repositories."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import hydra
import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf

from trainer.config import TrainerError
from trainer.tracking import lineage
from trainer.train import train

sys.path.insert(0, str(Path(__file__).parent))
from test_streams import cfg_for

QUICK = ("trainer.max_steps=20", "trainer.batch_size=16", "tracking.log_model=false", "data.n_samples=200")


def runs(tmp_path: Path) -> tuple[mlflow.MlflowClient, list]:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("tape-trainer").experiment_id
    return client, client.search_runs([experiment], order_by=["attributes.start_time ASC"])


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip


@pytest.fixture
def repo(tmp_path: Path, monkeypatch) -> Path:
    """A git repository with one commit, the working directory of the test."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    (root / "train.sh").write_text("python -m trainer\n")
    git(root, "add", "train.sh")
    git(root, "commit", "-q", "-m", "one")
    monkeypatch.chdir(root)
    return root


def test_system_metrics_are_sampled_under_system_when_on_and_absent_when_off(tmp_path, repo):
    """MLflow's sampler every 0.2 s: a run of a few seconds holds several samples of each system metric;
    the same run with tracking.system_metrics=false holds none. Run in a clean git repo: its commit is tagged."""
    store = tmp_path / "store"
    train(cfg_for(store, *QUICK, "tracking.system_metrics_interval=0.2"), output_dir=tmp_path / "on")
    train(cfg_for(store, *QUICK, "tracking.system_metrics=false"), output_dir=tmp_path / "off")
    client, (on, off) = runs(store)
    system = sorted(k for k in on.data.metrics if k.startswith("system/"))
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(system)
    history = client.get_metric_history(on.info.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 1 and [m.step for m in history] == list(range(len(history)))
    assert not [k for k in off.data.metrics if k.startswith("system/")]
    assert "train/loss" in off.data.metrics  # the run itself logged as ever
    tags = on.data.tags
    assert tags["trainer.git_commit"] == git(repo, "rev-parse", "HEAD") and tags["trainer.git_dirty"] == "false"
    assert tags["trainer.command"] == shlex.join(sys.argv)
    assert tags["trainer.versions.tensorflow"] == tf.__version__
    assert tags["trainer.versions.keras"] == keras.__version__
    assert tags["trainer.versions.mlflow"] == mlflow.__version__
    assert tags["trainer.versions.hydra"] == hydra.__version__


def test_a_run_shorter_than_the_sampling_interval_has_a_sample_at_its_start_and_its_end(tmp_path):
    """Before: 20 steps in well under the default 10-s interval logged no system metric at all."""
    store = tmp_path / "store"
    train(cfg_for(store, *QUICK), output_dir=tmp_path / "short")
    client, (run,) = runs(store)
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [0, 1], key  # the start's sample, then the end's
    memory = client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
    assert all(m.value > 100 for m in memory)  # a real reading: this process alone holds TensorFlow


def test_a_bad_sampling_interval_is_named():
    with pytest.raises(TrainerError, match=r"tracking.system_metrics_interval=0.0 is invalid"):
        from trainer.config import check

        check(cfg_for(Path("/nonexistent"), "tracking.system_metrics_interval=0"))


def write_csv(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    y = x @ [1.0, -2.0, 0.5]
    lines = ["a,b,c,y", *(",".join(f"{v:.6f}" for v in (*r, t)) for r, t in zip(x, y, strict=True))]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow  # 8-18 s of CLI runs: the fast suite stays under 10 minutes (make test-slow runs it)
def test_csv_runs_log_training_and_validation_inputs_whose_digest_follows_the_file(tmp_path):
    """Two runs on the same file: the same digests (one dataset in the store); the file edited: new ones."""
    data = tmp_path / "houses.csv"
    write_csv(data, 200)
    args = ("data=csv", f"data.path={data}", "data.target=y", "trainer.max_steps=5", "trainer.batch_size=16",
            "tracking.log_model=false", "tracking.system_metrics=false")  # fmt: skip
    train(cfg_for(tmp_path, *args), output_dir=tmp_path / "a")
    train(cfg_for(tmp_path, *args), output_dir=tmp_path / "b")
    write_csv(data, 201, seed=1)
    train(cfg_for(tmp_path, *args), output_dir=tmp_path / "c")
    client, found = runs(tmp_path)

    def inputs(run) -> dict[str, mlflow.entities.Dataset]:
        got = client.get_run(run.info.run_id).inputs.dataset_inputs
        return {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in got}

    a, b, c = (inputs(r) for r in found)
    assert set(a) == set(b) == set(c) == {"training", "validation"}
    assert {d.name for d in (*a.values(), *c.values())} == {"houses.csv"}
    assert a["training"].source_type == "local" and str(data) in a["training"].source
    assert '"x"' in a["training"].schema and "[-1, 3]" in a["training"].schema
    for split in ("training", "validation"):
        assert a[split].digest == b[split].digest != c[split].digest
    assert a["training"].digest != a["validation"].digest


def test_synthetic_data_source_is_the_generator_config(tmp_path):
    train(cfg_for(tmp_path, *QUICK, "tracking.system_metrics=false", "data=regression"), output_dir=tmp_path)
    client, (run,) = runs(tmp_path)
    (training, validation) = sorted(client.get_run(run.info.run_id).inputs.dataset_inputs,
                                    key=lambda i: i.tags[0].value)  # fmt: skip
    assert [training.tags[0].value, validation.tags[0].value] == ["training", "validation"]
    assert training.dataset.name == "regression" and training.dataset.source_type == "code"
    assert '"n_samples": "200"' in training.dataset.source and '"noise": "0.1"' in training.dataset.source


def bytes_read() -> int:
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")
                    ).split()[1])  # fmt: skip


def test_the_digest_of_a_2_gb_file_reads_2_mib_of_it(tmp_path):
    """A sparse 2 GB file (no disk used): its digest reads the first and last MiB, not the file."""
    big = tmp_path / "big.csv"
    subprocess.run(["truncate", "-s", "2G", str(big)], check=True)
    before, start = bytes_read(), time.perf_counter()
    first = lineage.file_digest(big)
    read, took = bytes_read() - before, time.perf_counter() - start
    assert read <= 2 * lineage.SAMPLE_BYTES + 4096 and took < 0.5
    assert lineage.file_digest(big) == first
    stat = big.stat()
    with open(big, "r+b") as f:  # one byte in the last MiB, size and mtime kept
        f.seek(2 * 1024**3 - 10)
        f.write(b"x")
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert lineage.file_digest(big) != first


def test_git_tags_clean_then_dirty_and_absent_outside_a_repository(tmp_path, repo, monkeypatch):
    commit = git(repo, "rev-parse", "HEAD")
    assert lineage.git_tags(repo) == {"trainer.git_commit": commit, "trainer.git_dirty": "false"}
    (repo / "mlflow.db").write_text("")  # untracked: the trainer's own outputs do not make a tree dirty
    assert lineage.git_tags(repo)["trainer.git_dirty"] == "false"
    (repo / "train.sh").write_text("python -m trainer model=mlp\n")
    assert lineage.git_tags(repo) == {"trainer.git_commit": commit, "trainer.git_dirty": "true"}
    outside = tmp_path / "plain"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # /tmp itself might sit in a repository
    assert lineage.git_tags(outside) == {}
    monkeypatch.setenv("PATH", str(outside))  # no git at all
    assert lineage.git_tags(repo) == {}
