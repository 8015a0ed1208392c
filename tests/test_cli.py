"""The real CLI (`python -m trainer ...`) in a subprocess, with a real MLflow SQLite store in a temp dir.

Every subprocess that gets past composition pays TensorFlow's start-up (~5-10 s), so each CLI
invocation is made once and read by several tests, and the invocations this module's selected tests
need are started together when the module starts, two at a time (`CliJobs`): on a 2-core machine the
suite then takes about half the time it would one after the other. Bad inputs that fail while
composing never import TensorFlow and cost about a second.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import compose_config, new_store, option_kwargs, run_cli
from trainer.tracking.curves import ARTIFACT

EXPERIMENT = "tape-trainer"
E2E_STEPS = 37


# --- the CLI invocations ------------------------------------------------------------------------
def _csv_job(text: str, target: str) -> Callable[[Path], list[str]]:
    def args(cwd: Path) -> list[str]:
        (cwd / "table.csv").write_text(text)
        return ["data=csv", f"data.path={cwd / 'table.csv'}", f"data.target=[{target}]"]

    return args


GOOD_CSV = "a,b,y\n1,2,3\n4,5,6\n7,8,9\n10,11,12\n"

# name -> the CLI's arguments (a function of its working directory) -- the order is the start order:
# the longest first, so the two workers finish together
JOBS: dict[str, Callable[[Path], list[str]]] = {
    "e2e": lambda cwd: [
        "model=mlp",
        "data=regression",
        "data.n_samples=512",
        f"trainer.max_steps={E2E_STEPS}",
        "trainer.steps_per_loop=5",
        "trainer.eval_every=10",
    ],
    "log_every": lambda cwd: [
        "model=mlp",
        "model.hidden=[3]",
        "data.n_samples=256",
        "trainer.max_steps=20",
        "tracking.log_every=4",
        "schedule=cosine",
        "trainer.print_gradients=true",
    ],
    "tape": lambda cwd: ["experiment=tape_example"],
    "one_step": lambda cwd: ["model=linear", "trainer.max_steps=1", "tracking.log_model=false"],
    "bad:out-of-range": lambda cwd: ["trainer.max_steps=-1"],
    "bad:missing-file": lambda cwd: ["data=csv", "data.path=missing.csv", "data.target=[y]"],
    "csv:non-numeric": _csv_job(GOOD_CSV.replace("4,5,6", "4,x,6"), "y"),
    "csv:missing-target": _csv_job(GOOD_CSV, "price"),
    "bad:bad-type": lambda cwd: ["optimizer.lr=abc"],
    "bad:unknown-key": lambda cwd: ["trainer.batch_sise=8"],
    "bad:unknown-option": lambda cwd: ["model=transformr"],
}


@dataclass
class CliResult:
    proc: subprocess.CompletedProcess[str]
    cwd: Path
    uri: str
    modules: set[str]  # top-level modules the process imported (from `-X importtime`)
    stderr: str  # stderr without the import-time lines

    @property
    def output(self) -> str:
        return self.proc.stdout + self.stderr


def _split_importtime(stderr: str) -> tuple[set[str], str]:
    """`-X importtime` output -> (top-level modules imported, the rest of stderr)."""
    modules, rest = set(), []
    for line in stderr.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[-1].strip()
            if name != "package":  # the header line
                modules.add(name.split(".")[0])
        else:
            rest.append(line)
    return modules, "\n".join(rest)


class CliJobs:
    """Runs the JOBS this module needs in the background, two at a time; `result(name)` waits for one."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, store_template: Path, workers: int = 2):
        self._tmp, self._template = tmp_path_factory, store_template
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="cli")
        self._futures: dict[str, Future[CliResult]] = {}
        self._lock = threading.Lock()

    def start(self, name: str) -> None:
        with self._lock:
            if name not in self._futures:
                cwd = self._tmp.mktemp(re.sub(r"\W", "_", name))
                self._futures[name] = self._pool.submit(self._run, name, cwd)

    def result(self, name: str) -> CliResult:
        self.start(name)
        return self._futures[name].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, name: str, cwd: Path) -> CliResult:
        uri = new_store(cwd, self._template)
        args = [*JOBS[name](cwd), f"tracking.uri={uri}"]
        flags = ["-X", "importtime"] if name.startswith("bad:") or name == "one_step" else []  # what it imported
        proc = run_cli(args, cwd, python_flags=flags)
        modules, stderr = _split_importtime(proc.stderr)
        return CliResult(proc, cwd, uri, modules, stderr)


@pytest.fixture(scope="module")
def cli(request, tmp_path_factory, mlflow_template):
    """Starts every job that this module's selected tests name (`cli_job` marks), then hands them out."""
    jobs = CliJobs(tmp_path_factory, mlflow_template)
    wanted = {
        name
        for item in request.session.items
        if item.module is request.module
        for mark in item.iter_markers("cli_job")
        for name in mark.args
    }
    for name in sorted(wanted, key=list(JOBS).index):
        jobs.start(name)
    yield jobs
    jobs.close()


@pytest.fixture(autouse=True, scope="module")
def _start_jobs_first(cli):
    """The background jobs start before this module's first test, whichever it is."""


def _finished(cli: CliJobs, name: str) -> CliResult:
    result = cli.result(name)
    assert result.proc.returncode == 0, f"stdout:\n{result.proc.stdout}\nstderr:\n{result.stderr}"
    return result


# --- MLflow helpers -------------------------------------------------------------------------------
def _runs(uri: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def _single_run(uri: str):
    runs = _runs(uri)
    assert len(runs) == 1, f"expected one run in {uri}, found {len(runs)}"
    return runs[0]


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _values(uri: str, run_id: str, key: str) -> list[float]:
    return [v for _, v in _history(uri, run_id, key)]


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    return [s for s, _ in _history(uri, run_id, key)]


def _load_text(run, name: str) -> str:
    return mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{name}")


def _artifact_files(run) -> set[str]:
    """The run's artifact files, relative to its artifact root (a local directory with a SQLite store).

    Read from disk: MLflow 3's list_artifacts on "model" also looks for a logged model of that name
    through the *global* tracking URI, which is not this test's store.
    """
    location = urlparse(run.info.artifact_uri)
    assert location.scheme in ("", "file"), run.info.artifact_uri
    root = Path(location.path)
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# --- in-process tracking checks (first, so they overlap with the background jobs) -------------------
@pytest.fixture
def sparse_run(tmp_path, mlflow_template):
    """A real Run on a fresh SQLite store with tracking.log_every=4; yields (run, uri) inside it.

    The sink retries a failing store until close_timeout (60 s) at the end; 2 s keeps a failure cheap.
    """
    from trainer.tracking import Run

    uri = new_store(tmp_path, mlflow_template)
    with Run(compose_config(["tracking.log_every=4", f"tracking.uri={uri}"])) as run:
        run.sink.close_timeout = 2.0
        yield run, uri


def test_log_every_does_not_drop_summaries(sparse_run):
    run, uri = sparse_run
    run.log(37, {"val/loss": 1.5, "perf/steps_per_sec": 100.0})  # how a run of max_steps=37 ends
    run.sink.close()
    assert _history(uri, run.run_id, "val/loss") == [(37, 1.5)]
    assert _history(uri, run.run_id, "perf/steps_per_sec") == [(37, 100.0)]


def test_chunk_without_kept_steps_is_not_a_failed_write(sparse_run):
    from trainer.tracking import Chunk

    run, uri = sparse_run
    run.sink.submit(Chunk(1, {"train/loss": np.array([1.0, 2.0, 3.0])}, t_start=1.0, t_end=2.0))  # steps 1-3
    started = time.monotonic()
    run.sink.close()  # nothing to write
    assert run.sink.error is None, run.sink.error
    assert time.monotonic() - started < run.sink.close_timeout
    assert _history(uri, run.run_id, "train/loss") == []


# --- a. bad inputs: non-zero exit, no traceback, the message names the culprit --------------------
BAD_INPUTS = {
    "bad:bad-type": ["optimizer.lr", "abc"],
    "bad:unknown-key": ["batch_sise"],
    "bad:out-of-range": ["trainer.max_steps", "-1"],
    "bad:unknown-option": ["transformr", "mlp", "linear"],
    "bad:missing-file": ["missing.csv", "no such file"],
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.cli_job(n)) for n in BAD_INPUTS])
def test_bad_input_fails_cleanly(name, cli):
    result = cli.result(name)
    assert result.proc.returncode != 0
    assert "Traceback" not in result.output
    for needle in BAD_INPUTS[name]:
        assert needle in result.output, f"{needle!r} not in the CLI's output:\n{result.output}"
    assert not _runs(result.uri)  # no MLflow run was started for a bad input


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.cli_job(n)) for n in ["bad:bad-type", "bad:unknown-key", "bad:unknown-option"]],
)
def test_compose_errors_fail_before_tensorflow(name, cli):
    result = cli.result(name)
    assert "trainer" in result.modules  # the CLI's own package did load: the check below means something
    assert "tensorflow" not in result.modules


@pytest.mark.cli_job("bad:out-of-range")
def test_range_errors_fail_before_tensorflow(cli):
    result = cli.result("bad:out-of-range")
    assert result.proc.returncode != 0 and "trainer" in result.modules
    assert "tensorflow" not in result.modules and "mlflow" not in result.modules  # Hydra's sweep callback: light


@pytest.mark.cli_job("one_step")
def test_a_one_step_run_logs_its_plot_without_matplotlib(cli):
    """The end-of-run plot is drawn for the shortest run too (its one point marked in each panel), and the whole
    run never imports matplotlib: not with TensorFlow (startup.py hides it there) nor for the plot (curves.py)."""
    import matplotlib.image

    result = _finished(cli, "one_step")
    run = _single_run(result.uri)
    assert run.info.status == "FINISHED" and ARTIFACT in _artifact_files(run)
    png = matplotlib.image.imread(Path(urlparse(run.info.artifact_uri).path) / ARTIFACT)
    assert png.shape[:2] == (900, 1200)
    blue = (png[..., 2] > 0.5) & (png[..., 0] < 0.4)  # the curves' colour, C0
    assert all(blue[rows].any() for rows in (slice(0, 300), slice(300, 600), slice(600, 900)))
    assert {"trainer", "tensorflow"} <= result.modules
    lines = result.proc.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    # what loading matplotlib would log (Keras' tries of `import matplotlib` and its pyplot are logged too: they fail)
    assert not {"matplotlib.rcsetup", "matplotlib.figure"} & imported


CSV_ERRORS = {
    "csv:non-numeric": ["'b'", "not numeric", "'x'"],
    "csv:missing-target": ["'price'", "a, b, y"],
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.cli_job(n)) for n in CSV_ERRORS])
def test_csv_errors_name_the_column(name, cli):
    result = cli.result(name)
    assert result.proc.returncode == 1
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert str(result.cwd / "table.csv") in lines[0]
    for needle in CSV_ERRORS[name]:
        assert needle in lines[0]


# --- b. end to end: every step of a short MLP run in MLflow ----------------------------------------
@pytest.fixture(scope="module")
def e2e(cli):
    result = _finished(cli, "e2e")
    return result, result.uri, _single_run(result.uri)


@pytest.mark.cli_job("e2e")
def test_e2e_run_finished_and_reported(e2e):
    result, _, run = e2e
    assert run.info.status == "FINISHED"
    assert "Traceback" not in result.output
    assert re.search(r"[\d,.]+ steps/s", result.output)
    assert run.info.run_id in result.output
    assert f"{E2E_STEPS} steps" in result.output


@pytest.mark.cli_job("e2e")
def test_e2e_every_step_is_logged(e2e):
    _, uri, run = e2e
    run_id, steps = run.info.run_id, list(range(E2E_STEPS))
    per_variable = sorted(k for k in run.data.metrics if k.startswith("train/grad_norm_by_var/"))
    assert len(per_variable) == 6  # hidden [64, 64] + head: 3 kernels, 3 biases
    assert sum(k.endswith("/kernel") for k in per_variable) == 3
    assert sum(k.endswith("/bias") for k in per_variable) == 3
    for key in ["train/loss", "train/grad_norm", "train/lr", *per_variable]:
        assert _steps(uri, run_id, key) == steps, key
        values = np.array(_values(uri, run_id, key))
        assert np.all(np.isfinite(values)), key
        if "grad_norm" in key:
            assert np.all(values > 0), key
    np.testing.assert_allclose(_values(uri, run_id, "train/lr"), 0.001, rtol=1e-6)
    losses = _values(uri, run_id, "train/loss")
    assert np.mean(losses[-10:]) < np.mean(losses[:10])  # it learns

    assert _steps(uri, run_id, "val/loss") == [10, 20, 30, E2E_STEPS]
    assert all(np.isfinite(v) and v > 0 for v in _values(uri, run_id, "val/loss"))
    speed = _history(uri, run_id, "perf/steps_per_sec")
    assert len(speed) == 1 and speed[0][0] == E2E_STEPS and speed[0][1] > 0


@pytest.mark.cli_job("e2e")
def test_e2e_global_norm_matches_per_variable_norms(e2e):
    _, uri, run = e2e
    run_id = run.info.run_id
    per_variable = [k for k in run.data.metrics if k.startswith("train/grad_norm_by_var/")]
    columns = np.array([_values(uri, run_id, k) for k in per_variable])  # [6, steps]
    total = np.array(_values(uri, run_id, "train/grad_norm"))
    assert columns.shape == (6, E2E_STEPS)
    np.testing.assert_allclose(total, np.sqrt(np.sum(columns**2, axis=0)), rtol=1e-5)


@pytest.mark.cli_job("e2e")
def test_e2e_params_and_artifacts(e2e):
    _, _, run = e2e
    params = run.data.params
    assert params["optimizer.lr"] == "0.001"
    assert params["trainer.max_steps"] == str(E2E_STEPS)
    assert params["model.hidden"] == "[64, 64]"
    assert params["model._target_"] == "trainer.models.MLP"
    assert params["data.n_samples"] == "512"

    assert {"config.yaml", "overrides.yaml", "model/model.keras"} <= _artifact_files(run)
    config = yaml.safe_load(_load_text(run, "config.yaml"))
    assert config["trainer"]["max_steps"] == E2E_STEPS
    assert config["trainer"]["eval_every"] == 10
    assert config["model"]["hidden"] == [64, 64]
    overrides = yaml.safe_load(_load_text(run, "overrides.yaml"))
    assert f"trainer.max_steps={E2E_STEPS}" in overrides
    assert "model=mlp" in overrides


@pytest.mark.cli_job("e2e")
def test_e2e_saved_model_reproduces_the_final_val_loss(e2e, tmp_path):
    import keras

    import trainer.models  # noqa: F401  (registers the serializable model classes)
    from trainer.data import regression

    _, uri, run = e2e
    local = MlflowClient(uri).download_artifacts(run.info.run_id, "model/model.keras", str(tmp_path))
    model = keras.saving.load_model(local)
    data = regression(**option_kwargs("data", "regression", n_samples=512))  # the run's data: same defaults, same seed
    pred = np.asarray(model(data.x_val)).astype(np.float64)
    expected = np.mean((data.y_val.astype(np.float64) - pred) ** 2)
    final_step, final_val = _history(uri, run.info.run_id, "val/loss")[-1]
    assert final_step == E2E_STEPS
    assert final_val == pytest.approx(expected, rel=1e-4)


# --- c. the GradientTape introduction --------------------------------------------------------------
@pytest.fixture(scope="module")
def tape(cli):
    result = _finished(cli, "tape")
    return result, result.uri, _single_run(result.uri)


@pytest.mark.cli_job("tape")
def test_tape_example_prints_the_gradients(tape):
    result, _, run = tape
    lines = result.proc.stdout.splitlines()
    assert "Gradients of w: -4.0" in lines
    assert "Gradients of b: -2.0" in lines
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tape_example"
    assert run.data.metrics["first_step/grad/w"] == -4.0
    assert run.data.metrics["first_step/grad/b"] == -2.0
    assert json.loads(_load_text(run, "first_step_gradients.json")) == {"w": [[-4.0]], "b": [-2.0]}


@pytest.mark.cli_job("tape")
def test_tape_example_loss_shrinks_geometrically(tape):
    _, uri, run = tape
    run_id = run.info.run_id
    # residual r = y - (w x + b) = 1 at first; an SGD step (lr 0.01, x = 2) multiplies it by
    # 1 - 2 * 0.01 * (x^2 + 1) = 0.9, so the loss r^2 goes 0.81^k
    assert _steps(uri, run_id, "train/loss") == list(range(10))
    np.testing.assert_allclose(_values(uri, run_id, "train/loss"), 0.81 ** np.arange(10), rtol=1e-5)
    # |dL/dw| = 2 r x = 4 r, |dL/db| = 2 r, global norm 2 r sqrt(5), with r = 0.9^k
    r = 0.9 ** np.arange(10)
    norms = {key.rsplit("/", 1)[-1]: key for key in run.data.metrics if key.startswith("train/grad_norm_by_var/")}
    assert set(norms) == {"w", "b"}
    np.testing.assert_allclose(_values(uri, run_id, norms["w"]), 4 * r, rtol=1e-5)
    np.testing.assert_allclose(_values(uri, run_id, norms["b"]), 2 * r, rtol=1e-5)
    np.testing.assert_allclose(_values(uri, run_id, "train/grad_norm"), 2 * math.sqrt(5) * r, rtol=1e-5)
    np.testing.assert_allclose(_values(uri, run_id, "train/lr"), 0.01, rtol=1e-6)


# --- d. tracking.log_every -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sparse(cli):
    result = _finished(cli, "log_every")
    return result, result.uri, _single_run(result.uri)


@pytest.mark.cli_job("log_every")
def test_log_every_keeps_every_nth_step(sparse):
    _, uri, run = sparse
    run_id = run.info.run_id
    per_variable = [k for k in run.data.metrics if k.startswith("train/grad_norm_by_var/")]
    assert len(per_variable) == 4  # one hidden layer + head
    for key in ["train/loss", "train/grad_norm", "train/lr", *per_variable]:
        assert _steps(uri, run_id, key) == [0, 4, 8, 12, 16], key
    # the logged lr is the one each step used: cosine from 1e-3 to 0 over the 20 steps
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 20)) for k in (0, 4, 8, 12, 16)]
    np.testing.assert_allclose(_values(uri, run_id, "train/lr"), expected, rtol=1e-5)
    # the end-of-run summary (step 20, a multiple of 4) is there
    assert _steps(uri, run_id, "val/loss") == [20]
    assert _steps(uri, run_id, "perf/steps_per_sec") == [20]


@pytest.mark.cli_job("log_every")
def test_print_gradients_reports_every_variable(sparse):
    result, _, run = sparse
    printed = [line for line in result.proc.stdout.splitlines() if line.startswith("Gradients of ")]
    logged = json.loads(_load_text(run, "first_step_gradients.json"))
    assert len(printed) == 4  # dense_0/kernel, dense_0/bias, head/kernel, head/bias
    assert len(logged) == 4
