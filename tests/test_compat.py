"""The fence around library internals (trainer/compat.py, trainer/tracking/compat.py): the fast paths are taken
on the installed libraries, each check refuses a library that lost the shape relied on, and each public
fallback works for real: a real SQLite store, a real training run, the real CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
import types
from pathlib import Path

import mlflow
import numpy as np
import pytest
import sqlalchemy as sa
from mlflow.tracking import MlflowClient

from trainer import compat
from trainer.tracking import compat as mlflow_compat
from trainer.tracking.sink import Chunk, MetricSink
from trainer.tracking.writers import LogBatchWriter, SqlBulkWriter, stored_through

STEPS = 120


@pytest.fixture
def checks(monkeypatch):
    """A process whose checks run again (TRAINER_NO_INTERNALS unset), and again after the test."""
    monkeypatch.delenv(compat.NO_INTERNALS_ENV, raising=False)
    compat.forget()
    yield monkeypatch
    compat.forget()


@pytest.fixture
def client(tmp_path, mlflow_template):
    from conftest import new_store

    uri = new_store(tmp_path, mlflow_template)
    mlflow.set_tracking_uri(uri)
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)


def new_run(client: MlflowClient) -> str:
    found = client.get_experiment_by_name("compat")
    return client.create_run(found.experiment_id if found else client.create_experiment("compat")).info.run_id


def write_points(client: MlflowClient, run_id: str) -> MetricSink:
    """STEPS training steps in chunks of 40 (loss, lr and two per-variable norms) and one validation point."""
    sink = MetricSink(client, run_id)
    for first in range(0, STEPS, 40):
        steps = np.arange(first, first + 40, dtype=np.float64)
        values = {"train/loss": 1 / (1 + steps), "train/lr": np.full(40, 0.01), "train/norm/": np.stack([steps] * 2, 1)}
        sink.submit(Chunk(first, values, ("a", "b"), t_start=1000.0 + first, t_end=1040.0 + first))
    sink.submit(Chunk(STEPS, {"val/loss": np.array([0.5])}, t_start=2000.0, t_end=2000.0, per_step=False))
    sink.close()
    return sink


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# --- the fast paths, on the installed libraries ----------------------------------------------------
def test_the_installed_libraries_have_every_shape_relied_on(checks, client, capsys):
    assert compat.hydra_reason() is None
    assert compat.omegaconf_reason() is None
    assert compat.keras_reason() is None
    assert mlflow_compat.mlflow_reason() is None
    assert mlflow_compat.http_probe() is not None
    run_id = new_run(client)
    sink = write_points(client, run_id)
    assert isinstance(sink.writer, SqlBulkWriter)  # the fast path
    assert stored_through(client.tracking_uri, run_id, 1) == STEPS  # newest train/loss step 119, + log_every
    assert capsys.readouterr().err == ""  # nothing to warn about


def test_the_fused_adam_is_used_on_the_installed_keras(checks):
    from trainer.optim import Adam

    optimizer = Adam(1e-2)
    optimizer.build([__import__("keras").Variable(np.ones((3, 2), np.float32))])
    assert optimizer._fused is not None
    assert [v.path.rsplit("/", 1)[-1] for v in optimizer.variables] == [
        "iteration",
        "learning_rate",
        "flat_momentum",
        "flat_velocity",
    ]


# --- each check refuses a library without the shape ------------------------------------------------
class StoreWithoutGetRun:
    def _check_run_is_active(self, run): ...

    def _update_latest_metrics_if_necessary(self, logged_metrics, session): ...


class StoreWithRenamedParameter(StoreWithoutGetRun):
    def _get_run(self, session, run_id): ...  # MLflow's is (session, run_uuid): the writer passes run_uuid=


def table(name: str, *columns: sa.Column) -> types.SimpleNamespace:
    """A stand-in ORM class: only its `__table__`, a real SQLAlchemy table."""
    return types.SimpleNamespace(__table__=sa.Table(name, sa.MetaData(), *columns))


def metric_columns(*names: str) -> list[sa.Column]:
    return [sa.Column(n, sa.Float) for n in names]


def test_the_mlflow_check_names_what_is_missing():
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    version = compat.version("mlflow")
    real = (SqlMetric, SqlLatestMetric)
    assert mlflow_compat.mlflow_reason(SqlAlchemyStore, real) is None
    assert mlflow_compat.mlflow_reason(StoreWithoutGetRun, real) == (
        f"mlflow {version} has no SqlAlchemyStore._get_run(session, run_uuid)"
    )
    assert mlflow_compat.mlflow_reason(StoreWithRenamedParameter, real) == (
        f"mlflow {version} has no SqlAlchemyStore._get_run(session, run_uuid)"
    )
    all_six = mlflow_compat.COLUMNS
    no_is_nan = table("metrics", *metric_columns("key", "value", "timestamp", "step", "run_uuid"))
    assert mlflow_compat.mlflow_reason(SqlAlchemyStore, (no_is_nan, SqlLatestMetric)) == (
        f"mlflow {version}: table 'metrics' lacks is_nan"
    )
    required = table("metrics", *metric_columns(*all_six), sa.Column("unit", sa.String, nullable=False))
    assert mlflow_compat.mlflow_reason(SqlAlchemyStore, (required, SqlLatestMetric)) == (
        f"mlflow {version}: table 'metrics' has new required columns unit"
    )
    optional = table("metrics", *metric_columns(*all_six), sa.Column("unit", sa.String, nullable=True))
    assert mlflow_compat.mlflow_reason(SqlAlchemyStore, (optional, SqlLatestMetric)) is None
    renamed = table("metric_points", *metric_columns(*all_six))
    assert mlflow_compat.mlflow_reason(SqlAlchemyStore, (renamed, SqlLatestMetric)) == (
        f"mlflow {version}: no ORM table 'metrics'"
    )


def run_and_report(func): ...  # a stand-in hydra._internal.utils: its _run_hydra looks run_and_report up


def _run_hydra(args):
    return run_and_report(args)


def test_the_hydra_keras_and_omegaconf_checks_name_what_is_missing():
    hydra, keras, omegaconf = (compat.version(d) for d in ("hydra-core", "keras", "omegaconf"))
    assert compat.hydra_reason(types.SimpleNamespace(run_and_report=run_and_report, _run_hydra=_run_hydra)) is None
    assert compat.hydra_reason(types.SimpleNamespace(_run_hydra=_run_hydra)) == (
        f"hydra-core {hydra} has no hydra._internal.utils.run_and_report(func)"
    )
    assert compat.hydra_reason(types.SimpleNamespace(run_and_report=run_and_report, _run_hydra=len)) == (
        f"hydra-core {hydra}'s _run_hydra no longer calls run_and_report"
    )

    class Optimizer:
        def _backend_update_step(self, grads, trainable_variables, learning_rate): ...

        def _backend_apply_gradients(self, grads, trainable_variables):
            self._backend_update_step(grads, trainable_variables, 0.1)

    class Renamed(Optimizer):
        _backend_update_step = None

        def _backend_update(self, grads, variables, learning_rate): ...

    class NotCalled(Optimizer):
        def _backend_apply_gradients(self, grads, trainable_variables): ...

    assert compat.keras_reason(Optimizer) is None
    assert compat.keras_reason(Renamed) == (
        f"keras {keras} has no Optimizer._backend_update_step(grads, trainable_variables, learning_rate)"
    )
    assert compat.keras_reason(NotCalled) == f"keras {keras}'s Optimizer no longer calls _backend_update_step"
    assert compat.omegaconf_reason(type("Node", (), {})) == f"omegaconf {omegaconf} has no Node._get_full_key(key)"


# --- each public fallback, for real ----------------------------------------------------------------
def test_mlflow_fallback_writes_every_point_through_log_batch(checks, client, capsys):
    checks.setenv(compat.NO_INTERNALS_ENV, "mlflow")
    run_id = new_run(client)
    sink = write_points(client, run_id)
    assert isinstance(sink.writer, LogBatchWriter)
    assert sink.error is None and sink.points_lost == 0 and sink.points_written == STEPS * 4 + 1
    for key in ("train/loss", "train/lr", "train/norm/a", "train/norm/b"):
        assert steps_of(client, run_id, key) == list(range(STEPS)), key
    assert steps_of(client, run_id, "val/loss") == [STEPS]
    metrics = client.get_run(run_id).data.metrics
    assert metrics["train/loss"] == pytest.approx(1 / STEPS) and metrics["val/loss"] == 0.5
    assert stored_through(client.tracking_uri, run_id, 1) is None  # as for stores that cannot say cheaply
    write_points(client, new_run(client))  # a second sink: no second warning
    assert capsys.readouterr().err == (
        "trainer: TRAINER_NO_INTERNALS names mlflow; using MLflow's public log_batch for metrics (slower)\n"
    )


def test_a_client_without_its_store_attribute_gets_log_batch(checks, capsys):
    assert mlflow_compat.sql_store(types.SimpleNamespace(tracking_uri="sqlite:///x.db")) is None
    assert mlflow_compat.sql_store(types.SimpleNamespace(_tracking_client=None)) is None
    version = compat.version("mlflow")
    assert capsys.readouterr().err == (
        f"trainer: mlflow {version}'s client has no _tracking_client.store; "
        "using MLflow's public log_batch for metrics (slower)\n"
    )


def test_a_shape_warning_is_one_line_once_per_process(checks, capsys):
    for _ in range(3):
        assert not compat.shape_ok("demo", lambda: "demo 9.0 has no\n  thing()", "the public\tpath")
    assert capsys.readouterr().err == "trainer: demo 9.0 has no thing(); using the public path\n"


def losses(client: MlflowClient, run_name: str) -> list[float]:
    (run,) = client.search_runs(client.get_experiment_by_name("tape-trainer").experiment_id,
                                f"attributes.run_name = '{run_name}'")  # fmt: skip
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]


def test_keras_fallback_trains_like_the_fused_adam(checks, compose_cfg, tracking_uri, tmp_path, capsys):
    """A real short training with the fence off (Keras' own per-variable Adam): the same loss trajectory."""
    from trainer.train import train

    overrides = ["model=mlp", "trainer.max_steps=60", "trainer.deterministic=true", "tracking.log_model=false"]
    train(compose_cfg([*overrides, "tracking.run_name=fused"]), output_dir=tmp_path / "fused")
    assert capsys.readouterr().err.count("trainer:") == 0
    checks.setenv(compat.NO_INTERNALS_ENV, "keras")
    compat.forget()  # as a new process with the variable set
    train(compose_cfg([*overrides, "tracking.run_name=keras"]), output_dir=tmp_path / "keras")
    assert "trainer: TRAINER_NO_INTERNALS names keras; using Keras' own Adam update (one per variable)\n" in (
        capsys.readouterr().err
    )
    client = MlflowClient(tracking_uri)
    fused, stock = losses(client, "fused"), losses(client, "keras")
    assert len(fused) == len(stock) == 60
    assert fused[-1] < 0.5 * fused[0]  # it trained
    np.testing.assert_allclose(stock, fused, rtol=1e-5)


def test_hydra_fallback_still_fails_a_typo_with_a_nonzero_exit(run_cli, tmp_path):
    fenced = run_cli(["optimizer.lrr=1"], cwd=tmp_path)
    assert fenced.returncode == 1
    assert fenced.stderr == "error: Could not override 'optimizer.lrr'.; Key 'lrr' not in 'AdamOptimizer'\n"
    public = run_cli(["optimizer.lrr=1"], cwd=tmp_path, env={compat.NO_INTERNALS_ENV: "hydra"})
    assert public.returncode == 1
    lines = public.stderr.splitlines()
    assert lines[0] == "trainer: TRAINER_NO_INTERNALS names hydra; using Hydra's own error printing"
    assert lines[1:3] == ["Could not override 'optimizer.lrr'.", "To append to your config use +optimizer.lrr=1"]
    assert lines[-1] == "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."


def test_importing_the_tracking_package_costs_no_mlflow_import():
    """The CLI's error path (disk_full) and the chunk type load without MLflow (~1 s of import)."""
    code = "import sys, trainer.tracking as t; t.disk_full, t.Chunk; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False"]
    import trainer.tracking as tracking

    assert set(tracking.__all__) == set(tracking._HOMES)
    assert all(getattr(tracking, name) is not None for name in tracking.__all__)  # each resolves in its module


HOOKS = {("optim.py", "_backend_update_step")}  # the fused Adam's override of Keras' hook: compat.keras_reason
STDLIB_PUBLIC = {("os", "_exit")}  # documented, public: the process ends without unwinding (process.StopFlag)
OWN_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}  # Hydra's public config keys


def private_reaches(path: Path) -> list[str]:
    """`obj._name` (obj not self/cls), getattr(obj, "_name"), and imports of modules named `_...` of a library."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        name = None
        if isinstance(node, ast.Attribute) and not (
            isinstance(node.value, ast.Name)
            and (node.value.id in ("self", "cls") or (node.value.id, node.attr) in STDLIB_PUBLIC)
        ):
            name = node.attr
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("getattr", "hasattr", "setattr"):
            target, *rest = node.args
            own = isinstance(target, ast.Name) and target.id in ("self", "cls")
            name = None if own or not rest or not isinstance(rest[0], ast.Constant) else str(rest[0].value)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            parts = [p for m in modules if not m.startswith(("trainer", "__future__")) for p in m.split(".")]
            name = next((p for p in parts if p.startswith("_")), None)
        private = name and name.startswith("_") and not name.startswith("__") and name not in OWN_KEYS
        if private and (path.name, name) not in HOOKS:
            found.append(f"{path.name}:{node.lineno}: {name}")
    return found


def test_every_private_library_name_in_src_is_behind_a_compat_module():
    """Outside the two compat.py modules, src/ reaches no private name of a library (but the one checked hook)."""
    src = Path(__file__).resolve().parents[1] / "src" / "trainer"
    reaches = [r for path in sorted(src.rglob("*.py")) if path.name != "compat.py" for r in private_reaches(path)]
    assert reaches == []
    inside = private_reaches(src / "tracking" / "compat.py") + private_reaches(src / "compat.py")
    assert {r.rsplit(" ", 1)[1] for r in inside} >= {"_get_run", "_check_run_is_active", "_internal", "_get_full_key"}
