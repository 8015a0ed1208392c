"""trainer.compare against a real MLflow SQLite store: real training runs, and a sweep written through
trainer.tracking.Run with chosen values, so the expected order, objectives and best steps are known."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import matplotlib.image
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from conftest import compose_config, new_store
from trainer import compare
from trainer.tracking import Chunk, Run

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SMALL = ["data.n_samples=256", "trainer.max_steps=30", "trainer.progress=false"]

# The simulated sweep's children: train/loss per step, val/* points as {step: value}, end-of-run extras.
CHILDREN = {
    "a": dict(overrides="optimizer.lr=0.1", loss=[1.0, 0.6, 0.5, 0.45, 0.4, 0.38], val={3: 0.30, 6: 0.40}),
    "b": dict(overrides="optimizer.lr=0.01", loss=[1.0, 0.8, 0.3, 0.5, 0.35, 0.4], val={6: 0.20}),
    "c": dict(overrides="optimizer.lr=0.001", loss=[1.0, 0.9, 0.8, 0.7, 0.6, 0.55], end={"train/final_loss": 0.35}),
    "d": dict(overrides="optimizer.lr=10", loss=[1.0, 5.0, 25.0], fail=True),  # diverged: no objective
}
ORDER = ["b", "c", "a", "d"]  # by objective: 0.20, 0.35 (train/final_loss), 0.40 (last val/loss), none


@dataclass
class Store:
    uri: str
    client: MlflowClient
    parent_id: str
    child_ids: dict[str, str]
    real_ids: list[str]


def write_child(cfg: DictConfig, parent_id: str, name: str, spec: dict) -> str:
    """One sweep job as the trainer would log it, through the real Run and metric sink."""
    cfg = cfg.copy()
    cfg.tracking.run_name = name
    run = Run(cfg, [spec["overrides"]], tags={"mlflow.parentRunId": parent_id})
    try:
        with run:
            loss = np.array(spec["loss"], np.float32)
            run.sink.submit(Chunk(0, {"train/loss": loss, "train/grad_norm": 2 * loss}, t_start=1.0, t_end=2.0))
            for step, value in spec.get("val", {}).items():
                run.log(step, {"val/loss": value})
            run.log(len(loss), {"perf/steps_per_sec": 1000.0, **spec.get("end", {})})
            if spec.get("fail"):
                raise FloatingPointError("diverged")
    except FloatingPointError:
        pass
    return run.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_template) -> Store:
    from trainer.train import train

    tmp = tmp_path_factory.mktemp("compare")
    uri = new_store(tmp, mlflow_template)
    client = MlflowClient(uri)
    exp_id = client.create_experiment("tape-trainer", artifact_location=str(tmp / "artifacts"))  # not ./mlruns
    base = [f"tracking.uri={uri}", *SMALL]
    real_ids = []
    for lr in ("0.05",):
        overrides = [f"optimizer.lr={lr}", f"tracking.run_name=real-{lr}"]
        train(compose_config([*base, *overrides]), overrides=overrides, output_dir=tmp / lr)
        [run] = client.search_runs([exp_id], f"attributes.run_name = 'real-{lr}'")
        real_ids.append(run.info.run_id)
    parent_id = client.create_run(exp_id, run_name="sweep-test", tags={"sweep": "true"}).info.run_id
    cfg = compose_config(base)
    child_ids = {name: write_child(cfg, parent_id, name, spec) for name, spec in CHILDREN.items()}
    client.set_terminated(parent_id)
    yield Store(uri, client, parent_id, child_ids, real_ids)
    mlflow.set_tracking_uri(None)


def test_sweep_rows_sorted_by_objective_with_fallback_and_best_step(store):
    runs, parent = compare.select_runs(store.client, "tape-trainer", parent=store.parent_id)
    assert parent.info.run_id == store.parent_id
    rows = compare.summarize(store.client, runs)
    assert [r.name for r in rows] == ORDER
    by = {r.name: r for r in rows}
    assert [r.objective for r in rows] == pytest.approx([0.20, 0.35, 0.40, None])
    assert by["c"].objective_key == "train/final_loss" and by["a"].objective_key == "val/loss"
    # a: val/loss has two points, its minimum is at step 3; b: one val point, so train/loss's minimum (step 2)
    assert (by["a"].best_step, by["b"].best_step, by["c"].best_step, by["d"].best_step) == (3, 2, 5, 0)
    assert by["d"].status == "FAILED" and by["b"].status == "FINISHED"
    assert by["b"].final_train_loss == pytest.approx(0.4) and by["b"].points == 6 and by["d"].points == 3
    assert by["a"].overrides == "optimizer.lr=0.1" and by["a"].steps_per_sec == pytest.approx(1000.0)
    assert [s for s, _ in by["a"].grad_norm] == list(range(6))


def test_latest_sweep_cli_writes_table_and_png_and_logs_them_on_the_parent(store, tmp_path, capsys):
    out = tmp_path / "report"
    assert compare.main([f"uri={store.uri}", "latest_sweep=true", "format=csv", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert printed == (out / "compare.csv").read_text()
    table = list(csv.DictReader(io.StringIO(printed)))
    assert [r["run"] for r in table] == ORDER
    assert [r["run_id"] for r in table] == [store.child_ids[n] for n in ORDER]
    assert float(table[0]["objective"]) == pytest.approx(0.20) and table[3]["objective"] == ""
    assert table[1]["objective_key"] == "train/final_loss" and table[0]["best_step"] == "2"
    md = (out / "compare.md").read_text().splitlines()
    assert md[0].startswith("| run | overrides | status | final train loss | val/loss |") and len(md) == 2 + 4
    assert md[2].startswith("| b | optimizer.lr=0.01 | FINISHED |")
    assert "0.35 (train/final_loss)" in md[3]
    png = matplotlib.image.imread(out / "compare.png")  # fails unless it is a real PNG
    assert png.shape[:2] == (450, 1200)
    assert (png[..., :3] < 0.9).mean() > 0.01  # something was drawn
    logged = {a.path for a in store.client.list_artifacts(store.parent_id)}
    assert {"compare.png", "compare.md", "compare.csv"} <= logged
    parent = store.client.get_run(store.parent_id).data
    assert parent.tags["best_run_id"] == store.child_ids["b"] and parent.tags["best_run_name"] == "b"
    assert parent.metrics["best/val/loss"] == pytest.approx(0.20)


def test_whole_experiment_holds_real_runs_and_leaves_out_sweep_parents(store, tmp_path, capsys):
    assert compare.main([f"uri={store.uri}", "format=markdown", f"out={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "compare.md").read_text() and "sweep-test" not in printed
    runs, parent = compare.select_runs(store.client, "tape-trainer")
    assert parent is None and len(runs) == len(store.real_ids) + len(CHILDREN)
    rows = compare.summarize(store.client, runs)
    objectives = [r.objective for r in rows if r.objective is not None]
    assert objectives == sorted(objectives)
    for run_id in store.real_ids:
        [row] = [r for r in rows if r.run_id == run_id]
        metrics = store.client.get_run(run_id).data.metrics
        assert row.points == 30 and len(row.grad_norm) == 30 and 0 <= row.best_step < 30
        assert row.objective == pytest.approx(metrics["val/loss"]) and row.objective_key == "val/loss"
        assert row.final_train_loss == pytest.approx(metrics["train/loss"])
        assert row.status == "FINISHED" and row.steps_per_sec > 0
    assert compare.main([f"uri={store.uri}", "format=table", f"out={tmp_path}"]) == 0
    assert "real-0.05" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["experiment=nope"], "no experiment named 'nope'"),
        (["parent=0123456789abcdef"], "no run '0123456789abcdef'"),
        (["parent=CHILD"], "has no child runs"),
    ],
)
def test_errors_are_one_line(store, tmp_path, capsys, args, message):
    args = [a.replace("CHILD", store.child_ids["a"]) for a in args]
    assert compare.main([f"uri={store.uri}", f"out={tmp_path}", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "compare.png").exists()


def test_missing_store_and_no_sweep(store, tmp_path, capsys):
    missing = f"sqlite:///{tmp_path / 'absent.db'}"
    assert compare.main([f"uri={missing}"]) == 1
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "absent.db").exists()  # not created as a side effect
    exp_id = store.client.create_experiment("no-sweeps", str(tmp_path / "artifacts"))
    store.client.create_run(exp_id, run_name="lonely")
    assert compare.main([f"uri={store.uri}", "experiment=no-sweeps", "latest_sweep=true"]) == 1
    assert "experiment 'no-sweeps' has no sweep run" in capsys.readouterr().err
    assert compare.main([f"uri={store.uri}", "experiment=no-sweeps", f"out={tmp_path}"]) == 0


def test_legend_keeps_only_what_differs_between_runs():
    def row(name: str, overrides: str) -> compare.Row:
        return compare.Row(name, name, overrides, "FINISHED", None, "val/loss", None, None, None, 0)

    rows = [row("x", "data=big optimizer.lr=0.1"), row("y", "data=big optimizer.lr=0.01"), row("z", "data=big")]
    assert compare.legend_labels(rows) == (["optimizer.lr=0.1", "optimizer.lr=0.01", "(shared only)"], "data=big")
    assert compare.legend_labels([row("x", ""), row("y", "optimizer.lr=1")]) == (["x", "optimizer.lr=1"], "")


def test_best_child_is_the_finished_one_with_the_lowest_finite_objective(store, tmp_path, capsys):
    """A FAILED child's finite val/loss and a NaN are no result; a run without val/loss competes with its
    train/final_loss (trainer.objective's rule, applied once, by compare, also at a sweep's end)."""
    client = store.client
    exp_id = client.create_experiment("best-rule", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp_id, run_name="sweep-best", tags={"sweep": "true"}).info.run_id
    children = {}
    for name, status, metrics in [
        ("ok", "FINISHED", {"val/loss": 0.5}),
        ("broke", "FAILED", {"val/loss": 0.1}),
        ("nan", "FINISHED", {"val/loss": float("nan")}),
        ("noval", "FINISHED", {"train/final_loss": 0.3}),
    ]:
        tags = {"mlflow.parentRunId": parent, "overrides": f"x={name}"}
        run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        for key, value in metrics.items():
            client.log_metric(run_id, key, value, step=0)
        client.set_terminated(run_id, status)
        children[name] = run_id
    assert compare.main([f"uri={store.uri}", f"parent={parent}", f"out={tmp_path}", "format=csv"]) == 0
    assert [r["run"] for r in csv.DictReader(io.StringIO(capsys.readouterr().out))] == ["broke", "noval", "ok", "nan"]
    data = client.get_run(parent).data
    assert (data.tags["best_run_id"], data.tags["best_run_name"], data.tags["best_overrides"]) == (
        children["noval"],
        "noval",
        "x=noval",
    )
    assert data.metrics["best/objective"] == 0.3 and data.metrics["best/train/final_loss"] == 0.3
    assert "best/val/loss" not in data.metrics


def test_table_shows_shared_overrides_once_task_metrics_as_columns_and_four_digits(store, tmp_path, capsys):
    """Runs that share most overrides: those are printed once above the table; each row keeps what differs;
    every val/* a run logged is a column; numbers have 4 significant digits (the CSV keeps them whole)."""
    client = store.client
    exp_id = client.create_experiment("shared-overrides", artifact_location=str(tmp_path / "artifacts"))
    shared = "data=csv data.path=/very/long/path/to/the/training/table.csv model=mlp trainer.max_steps=20000"
    for lr, val_loss, accuracy in (("0.1", 0.0018527400612343, 0.912345678), ("0.01", 0.25, 0.5)):
        tags = {"overrides": f"{shared} optimizer.lr={lr}"}
        run_id = client.create_run(exp_id, run_name=f"lr{lr}", tags=tags).info.run_id
        for step, loss in enumerate((1.0, 0.123456789)):
            client.log_metric(run_id, "train/loss", loss, step=step)
        client.log_metric(run_id, "val/loss", val_loss, step=2)
        client.log_metric(run_id, "val/accuracy", accuracy, step=2)
        client.set_terminated(run_id)
    args = [f"uri={store.uri}", "experiment=shared-overrides", f"out={tmp_path}"]
    assert compare.main([*args, "format=markdown"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0] == f"Overrides shared by every run: `{shared}`" and md[1] == ""
    assert (
        md[2]
        == "| run | overrides | status | final train loss | val/loss | val/accuracy | best step | steps/s | points |"
    )
    assert md[4] == "| lr0.1 | optimizer.lr=0.1 | FINISHED | 0.1235 | 0.001853 | 0.9123 | 1 |  | 2 |"
    assert md[5] == "| lr0.01 | optimizer.lr=0.01 | FINISHED | 0.1235 | 0.25 | 0.5 | 1 |  | 2 |"
    assert compare.main([*args, "format=csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert table[0]["overrides"] == f"{shared} optimizer.lr=0.1" and table[0]["val/accuracy"] == "0.912345678"
    assert table[0]["objective"] == "0.0018527400612343"
    assert compare.main([*args, "format=table"]) == 0
    printed = capsys.readouterr().out
    assert "overrides shared by every run: data=csv" in printed and printed.count("model=mlp") == 1
    assert "0.9123" in printed and "0.912345678" not in printed


def test_smooth_outside_its_range_is_one_line(store, tmp_path, capsys):
    for value, message in (("1", "smooth=1.0 is invalid: expected a number in [0, 1)"), ("high", "expected a number")):
        assert compare.main([f"uri={store.uri}", f"out={tmp_path}", f"smooth={value}"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: smooth=") and message in err and "\n" not in err


def test_names_and_overrides_from_the_store_cannot_drive_the_terminal(tmp_path, mlflow_template, capsys):
    """A run name or overrides tag holding ESC sequences (set the title, clear the screen, hide text), a bidi
    override or rich markup is printed as visible escapes, in every format; the CSV file keeps them escaped too."""
    uri = new_store(tmp_path, mlflow_template)
    client = MlflowClient(uri)
    exp_id = client.create_experiment("tape-trainer", artifact_location=str(tmp_path / "artifacts"))
    hostile = "\x1b]0;pwned\x07\x1b[2J\x1b[8mhidden\u202e[red]x[/red]"
    run_id = client.create_run(
        exp_id, run_name=f"run{hostile}", tags={"overrides": f"optimizer.lr=1{hostile}"}
    ).info.run_id
    client.log_metric(run_id, "train/loss", 0.5, step=0)
    client.log_metric(run_id, "val/loss", 0.4, step=1)
    client.set_terminated(run_id)
    for fmt in ("table", "markdown", "csv"):
        assert compare.main([f"uri={uri}", f"format={fmt}", f"out={tmp_path / fmt}"]) == 0
        out, err = capsys.readouterr()
        for text in (out, err):
            assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text, (fmt, text)
        assert "\\x1b]0;pwned\\x07\\x1b[2J\\x1b[8mhidden\\u202e" in out, (fmt, out)
        if fmt == "table":
            assert "[red]x[/red]" in out  # markup from the store is text, not a style
