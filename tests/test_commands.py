"""One command, one grammar, plain output: `trainer compare|evaluate key=value ...` through the real CLI in a
subprocess with pipes (not a terminal, COLUMNS=80 as rich assumes when piped), a real MLflow SQLite store."""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import CLI_TIMEOUT_S, REPO_ROOT, compose_config, new_store, run_cli
from trainer import cli, compare, evaluate, startup
from trainer.config import TRUST_KEY

PIPED = {"COLUMNS": "80"}  # what rich assumes for a pipe without COLUMNS: its wrap width
RUN_NAME = "csv run [y]"  # brackets: rich markup would swallow "[y]"
ANSI = "\x1b["


def clean(proc: subprocess.CompletedProcess[str]) -> str:
    """stdout + stderr, checked for ANSI codes and tracebacks."""
    both = proc.stdout + proc.stderr
    assert ANSI not in both and "Traceback" not in both, both[-3000:]
    return both


@dataclasses.dataclass
class Trained:
    uri: str
    run_id: str
    cwd: Path
    proc: subprocess.CompletedProcess[str]
    metrics: dict[str, float]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mlflow_template) -> Trained:
    """One real training run on a CSV with `data.target=[y]`, named with brackets, its output piped."""
    cwd = tmp_path_factory.mktemp("commands")
    uri = new_store(cwd, mlflow_template)
    rows = np.random.default_rng(0).random((64, 3)).round(4)
    (cwd / "t.csv").write_text("a,b,y\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    args = ["data=csv", f"data.path={cwd / 't.csv'}", "data.target=[y]", "trainer.max_steps=20",
            f'tracking.run_name="{RUN_NAME}"', f"tracking.uri={uri}", "trainer.progress=false"]  # fmt: skip
    proc = run_cli(args, cwd, env=PIPED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    return Trained(uri, run.info.run_id, cwd, proc, run.data.metrics)


# --- grammar and errors (no TensorFlow: about a second each) ----------------------------------------
@pytest.mark.parametrize(("command", "options"), [("compare", compare.Options), ("evaluate", evaluate.Options)])
def test_help_lists_every_key(tmp_path, command, options):
    proc = run_cli([command, "--help"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: trainer {command} [key=value ...]")
    listed = re.findall(r"^  (\w+)=", proc.stdout, flags=re.M)
    assert listed == [f.name for f in dataclasses.fields(options)]
    assert "format=           what to print on stdout:" in proc.stdout


def test_training_help_is_still_hydras(tmp_path):
    proc = run_cli(["--help"], tmp_path)
    assert proc.returncode == 0 and "Powered by Hydra (https://hydra.cc)" in proc.stdout


VALID_COMPARE = "uri=, experiment=, parent=, latest_sweep=, objective=, format=, out=, smooth="


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["compare", "foo=1"],
         f"error: foo: no such key for trainer compare; valid: {VALID_COMPARE} (trainer compare --help)"),
        (["compare", "format=xml"], "error: format=xml is invalid: expected table | markdown | csv"),
        (["compare", "latest_sweep=maybe"], "error: latest_sweep=maybe is invalid: expected true | false"),
        (["compare", "--latest-sweep"],
         "error: unknown option '--latest-sweep': trainer compare takes key=value; use latest_sweep=true"),
        (["compare", "out=a,b"], "error: 'out=a,b': trainer compare takes one value per key, not a sweep"),
        (["compare", "uri=sqlite:///absent.db"],
         "error: no MLflow store at sqlite:///absent.db (no such file): set uri=... or MLFLOW_TRACKING_URI"),
        (["evaluate", "--json", "run_id=x"],
         "error: unknown option '--json': trainer evaluate takes key=value; use format=json"),
        (["evaluate", "data.seed=1"], "error: say which model: run_id=<id>, run_name=<name> or "
         "model=models:/<name>/<version> (trainer evaluate --help)"),
        (["evaluate", "run_name=a b=c"],
         "error: 'run_name=a b=c' is not key=value in Hydra's override grammar (mismatched input '=' expecting "
         "<EOF>); quote a value holding spaces or '=': 'key=\"a b\"'"),
        (["evaluate", "run_id=x", "trusted_targets={a:1}"],
         "error: trusted_targets={a:1} is invalid: expected a list of names, e.g. "
         "trusted_targets=[my_pkg.my_data,my_pkg.*]"),
    ],
)  # fmt: skip
def test_bad_arguments_are_one_error_line(tmp_path, args, line):
    proc = run_cli(args, tmp_path)
    assert (proc.returncode, proc.stderr, proc.stdout) == (1, line + "\n", "")


def test_old_module_entry_points_take_the_same_grammar(tmp_path):
    """`python -m trainer.compare ...` is `trainer compare ...`: same keys, same error line."""
    proc = subprocess.run([sys.executable, "-m", "trainer.compare", "format=xml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, check=False)  # fmt: skip
    assert (proc.returncode, proc.stderr) == (1, "error: format=xml is invalid: expected table | markdown | csv\n")


def test_parse_reads_values_as_hydra_does():
    argv = ['run_name="a [b] c=d"', "uri=null", "run_id=12e45", "trusted_targets=x.*", "data.seed=3",
            "+data.extra=[1,2]", "~data.path"]  # fmt: skip
    opts, rest = cli.parse("evaluate", argv, evaluate.Options, rest=True)
    assert (opts.run_name, opts.uri, opts.run_id, opts.trusted_targets) == ("a [b] c=d", None, "12e45", ("x.*",))
    assert rest == ["data.seed=3", "+data.extra=[1,2]", "~data.path"]
    assert TRUST_KEY in {f.name for f in dataclasses.fields(evaluate.Options)}  # the name resume= also reads


def test_the_experiment_name_has_one_home():
    """compare and evaluate default to training's tracking.experiment, read from conf/, never a copy of it."""
    assert cli.default_experiment() == compose_config([]).tracking.experiment
    assert yaml.safe_load((REPO_ROOT / "conf/tracking/default.yaml").read_text())["experiment"] == "tape-trainer"
    holders = {p.name for p in (REPO_ROOT / "src/trainer").rglob("*.py") if '"tape-trainer"' in p.read_text()}
    assert not holders  # the schema states no default either (tests/test_defaults.py)


# --- plain output when piped ------------------------------------------------------------------------
@pytest.mark.slow  # 8-22 s of CLI runs: the fast suite stays under 10 minutes (make test-slow runs it)
def test_training_summary_is_two_whole_lines(trained):
    err = clean(trained.proc)
    m = trained.metrics
    done = (f"done: 20 steps, final train loss {m['train/loss']:.6g}, val loss {m['val/loss']:.6g}, "
            f"{m['perf/steps_per_sec']:,.0f} steps/s")  # fmt: skip
    exp = MlflowClient(trained.uri).get_run(trained.run_id).info.experiment_id
    where = (f"MLflow: http://127.0.0.1:5000/#/experiments/{exp}/runs/{trained.run_id}?workflowType=machine_learning "
             f"(serve it with: mlflow ui --backend-store-uri {trained.uri})")  # fmt: skip
    assert len(where) > 80 and f"{done}\n{where}\n" in err


@pytest.mark.slow  # 8-22 s of CLI runs: the fast suite stays under 10 minutes (make test-slow runs it)
def test_first_contact_is_the_trainers_own_lines_and_verbose_brings_the_rest_back(trained, tmp_path):
    """TensorFlow's C++ start-up lines (absl's preamble, oneDNN, cpu_feature_guard: 5 before), MLflow's
    "Creating a new experiment" INFO: gone by default; `verbose=true` prints them as the libraries do."""
    assert trained.proc.stderr.splitlines()[0].startswith("done: 20 steps"), trained.proc.stderr[:3000]
    assert "INFO mlflow" not in trained.proc.stdout + trained.proc.stderr
    loud = run_cli(["trainer.max_steps=2", "tracking.log_model=false", f"tracking.uri=sqlite:///{tmp_path}/new.db",
                    "trainer.progress=false", "verbose=true"], tmp_path, env=PIPED)  # fmt: skip
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert any(startup.NOISE.match(line) for line in loud.stderr.splitlines()), loud.stderr[:3000]
    assert "INFO mlflow.tracking.fluent: Experiment with name 'tape-trainer' does not exist" in loud.stderr


def test_compare_table_keeps_brackets_and_does_not_fold(trained):
    proc = run_cli(["compare", f"uri={trained.uri}", f"out={trained.cwd / 'report'}"], trained.cwd, env=PIPED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    clean(proc)
    [line] = [ln for ln in proc.stdout.splitlines() if RUN_NAME in ln]
    assert f'data.target=[y] trainer.max_steps=20 tracking.run_name="{RUN_NAME}" tracking.uri={trained.uri}' in line
    assert f"{trained.metrics['val/loss']:.4g}" in line and "FINISHED" in line  # 4 significant digits


@pytest.mark.slow  # 8-22 s of CLI runs: the fast suite stays under 10 minutes (make test-slow runs it)
def test_evaluate_by_quoted_name_keeps_brackets_and_draws_no_progress_bars(trained):
    args = ["evaluate", f"uri={trained.uri}", f'run_name="{RUN_NAME}"', "data.target=[y]"]
    proc = run_cli(args, trained.cwd, env=PIPED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    clean(proc)
    assert "Downloading artifacts" not in proc.stderr and "%|" not in proc.stderr
    lines = [ln.strip(" │") for ln in proc.stdout.splitlines()]
    assert f"run {RUN_NAME} ({trained.run_id})" in lines
    rows = dict(re.split(r"\s+│\s+", ln, maxsplit=1) for ln in lines if "│" in ln)
    assert rows["overrides"] == "data.target=[y]" and rows["loss"] == f"{trained.metrics['val/loss']:.6g}"
    proc = run_cli(["evaluate", f"uri={trained.uri}", f"run_id={trained.run_id}", "format=json"], trained.cwd)
    assert json.loads(proc.stdout)["logged_loss"] == trained.metrics["val/loss"]


@pytest.mark.slow
def test_optuna_sweep_logs_without_colour_codes(tmp_path, mlflow_template):
    """Optuna's colorlog formatter colours every line it writes, piped or not, unless NO_COLOR is set."""
    uri = new_store(tmp_path, mlflow_template)
    args = ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=1", "data.n_samples=128", "trainer.max_steps=5",
            f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path / 'sweep'}", "trainer.progress=false"]  # fmt: skip
    proc = run_cli(args, tmp_path, env=PIPED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    both = clean(proc)
    assert re.search(r"^\[I [-\d: ,]+\] A new study created", both, flags=re.M), both[-3000:]


def test_tensorflow_imported_by_the_trainer_leaves_scikit_learn_and_matplotlib_importable():
    """startup.import_tensorflow hides scikit-learn and matplotlib from `import tensorflow` alone (Keras' optional
    wrappers and image gallery: 0.75 s and 0.2-0.6 s of the import); user code imports them as usual afterwards,
    and TensorFlow works."""
    code = ("import sys; from trainer import startup; tf = startup.import_tensorflow(); "
            "hidden = not {'sklearn', 'matplotlib'} & set(sys.modules); import sklearn.datasets as d; "
            "from matplotlib.figure import Figure; Figure().subplots().plot([1, 2]); x, y = d.load_diabetes("
            "return_X_y=True); print(hidden, x.shape, float(tf.reduce_sum(tf.ones([3]))))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "True (442, 10) 3.0"
    assert not any(map(startup.NOISE.match, proc.stderr.splitlines()))


def test_the_collector_is_paused_for_a_first_start_up_only():
    """startup.collector_paused: no cyclic collection within the block, then what is alive is frozen out of later
    collections and the collector is on again; a process that already imported the module is left as it is."""
    code = ("import gc, sys; from trainer import startup\n"
            "with startup.collector_paused(first_only='not_imported_yet'): paused = not gc.isenabled()\n"
            "frozen = gc.get_freeze_count()\n"
            "with startup.collector_paused(first_only='sys'): again = not gc.isenabled()\n"
            "print(paused, gc.isenabled(), frozen > 0, again, gc.get_freeze_count() == frozen)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True", "True", "False", "True"]


# --- reading commands never write ---------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["compare", "evaluate run_id=abc"])
def test_reading_commands_refuse_a_foreign_sqlite_file_and_leave_it_as_it_was(tmp_path, command):
    """Opening it through MLflow wrote MLflow's 30 tables into another program's database (and a mistyped path
    became an empty store); the reading commands now check first and say so."""
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE foo (x)")
    before = db.read_bytes()
    proc = run_cli([*command.split(), f"uri=sqlite:///{db}"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"error: no MLflow store at sqlite:///{db} (the file holds no "
                                                     "MLflow tables): set uri=... or MLFLOW_TRACKING_URI")  # fmt: skip
    assert db.read_bytes() == before


@pytest.mark.parametrize("command", ["compare", "evaluate run_id=abc"])
def test_reading_commands_fail_in_seconds_on_a_dead_server(tmp_path, command):
    """MLflow's own retries took ~4 minutes, and evaluate then blamed the run ("no run 'abc'")."""
    started = time.monotonic()
    proc = run_cli([*command.split(), "uri=http://127.0.0.1:9"], tmp_path)
    assert time.monotonic() - started < 60 and proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: tracking.uri='http://127.0.0.1:9': no MLflow server answers (Connection refused)"
    )


def test_compare_refuses_an_objective_no_run_logged(trained):
    proc = run_cli(["compare", f"uri={trained.uri}", "objective=foo/bar"], trained.cwd)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: objective=foo/bar: no run here logged a finite foo/bar"
    )
