"""`trainer predict` and `trainer export` on real data: palmerpenguins (text columns, missing cells, a target in
grams), scikit-learn's digits as a PNG folder and as .npy, a text table. Predictions equal the served (pyfunc)
model's, streamed chunk by chunk; exports (SavedModel, TF Lite) equal it to 1e-5, preprocessing included."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from palmerpenguins import load_penguins

from trainer import export as ex
from trainer import predict as pr
from trainer.train import train

EXAMPLES = 344  # penguins
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"  # my_models.py, my_conf/


def _train(tmp_path, compose_cfg, name: str, overrides: list[str]) -> tuple[str, str]:
    cfg = compose_cfg([f"tracking.run_name={name}", "tracking.system_metrics=false", *overrides])
    train(cfg, overrides=overrides, output_dir=tmp_path / name)
    client = mlflow.MlflowClient(str(cfg.tracking.uri))
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id],
                               f"attributes.run_name = '{name}'")  # fmt: skip
    return str(cfg.tracking.uri), run.info.run_id


@pytest.fixture(scope="module")
def penguin_runs(tmp_path_factory):
    """A species classifier and a body-mass regression (grams), trained once for the module."""
    from conftest import compose_config, sqlite_uri

    root = tmp_path_factory.mktemp("penguins")
    frame = load_penguins()
    frame.to_csv(root / "penguins.csv", index=False)
    uri = sqlite_uri(root)
    base = ["data=csv", f"data.path={root / 'penguins.csv'}", "model=linear", f"tracking.uri={uri}",
            "tracking.system_metrics=false"]  # fmt: skip
    runs = {}
    for name, extra in (("species", ["data.target=species", "loss=sparse_categorical_crossentropy",
                                     "trainer.max_steps=400"]),
                        ("mass", ["data.target=body_mass_g", "loss=mse", "trainer.max_steps=400"])):  # fmt: skip
        overrides = [*base, *extra, f"tracking.run_name={name}"]
        train(compose_config(overrides), overrides=overrides, output_dir=root / name)
        client = mlflow.MlflowClient(uri)
        [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id],
                                   f"attributes.run_name = '{name}'")  # fmt: skip
        runs[name] = run.info.run_id
    return {"root": root, "uri": uri, "frame": frame, **runs}


def _predict(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()  # what came before (MLflow's download bars in a test's own loading)
    code = pr.main(list(args))
    return code, capsys.readouterr().err


def test_predict_writes_probabilities_and_labels_beside_the_files_own_columns(penguin_runs, tmp_path, capsys):
    p, frame = penguin_runs, penguin_runs["frame"]
    new = frame.drop(columns="species").assign(id=[f"P{i}" for i in range(len(frame))])  # an id the model never saw
    new.to_csv(tmp_path / "new.csv", index=False)
    out = tmp_path / "scored.csv"
    code, err = _predict(capsys, f"run_id={p['species']}", f"uri={p['uri']}", f"input={tmp_path / 'new.csv'}",
                         f"output={out}", "batch_size=50")  # fmt: skip
    assert code == 0, err
    assert f"predicted {EXAMPLES} rows" in err
    scored = pd.read_csv(out)
    assert list(scored.columns) == [*new.columns, "p_Adelie", "p_Chinstrap", "p_Gentoo", "predicted_label"]
    pd.testing.assert_frame_equal(scored[new.columns], pd.read_csv(tmp_path / "new.csv"))  # the rows, in order
    served = mlflow.pyfunc.load_model(f"runs:/{p['species']}/model").predict(frame.drop(columns="species"))
    np.testing.assert_allclose(scored[["p_Adelie", "p_Chinstrap", "p_Gentoo"]].to_numpy(),
                               served[["Adelie", "Chinstrap", "Gentoo"]].to_numpy(), atol=1e-6)  # fmt: skip
    assert (scored.predicted_label == served.label).all()
    accuracy = float((scored.predicted_label == frame.species).mean())
    print(f"penguins species, predict over all {EXAMPLES} rows: accuracy {accuracy:.4f}")
    assert accuracy > 0.9
    code, err = _predict(capsys, f"run_id={p['species']}", f"uri={p['uri']}", f"input={tmp_path / 'new.csv'}",
                         f"output={out}")  # fmt: skip
    assert code == 1 and err == f"error: output={out} exists; name another file, or add overwrite=true\n"
    downloaded = mlflow.artifacts.download_artifacts(f"runs:/{p['species']}/model", dst_path=str(tmp_path / "dl"),
                                                     tracking_uri=p["uri"])  # fmt: skip
    code, err = _predict(
        capsys, f"model={downloaded}", f"input={tmp_path / 'new.csv'}", f"output={out}", "overwrite=true"
    )  # an MLflow model directory on disk, no store: the same answer
    assert code == 0, err
    pd.testing.assert_frame_equal(pd.read_csv(out), scored)


def test_predict_streams_a_parquet_file_in_chunks_in_the_targets_units(penguin_runs, tmp_path, capsys):
    p, frame = penguin_runs, penguin_runs["frame"]
    big = pd.concat([frame] * 30, ignore_index=True)  # 10,320 rows, labelled: the target column comes along
    big.to_parquet(tmp_path / "big.parquet", row_group_size=1000)
    outs = {}
    for rows in (97, 100_000):  # many chunks (a last partial one), and one
        outs[rows] = tmp_path / f"mass-{rows}.parquet"
        code, err = _predict(capsys, f"run_id={p['mass']}", f"uri={p['uri']}", f"input={tmp_path / 'big.parquet'}",
                             f"output={outs[rows]}", f"batch_size={rows}")  # fmt: skip
        assert code == 0, err
    chunked, whole = pd.read_parquet(outs[97]), pd.read_parquet(outs[100_000])
    assert len(chunked) == len(big) and list(chunked.columns) == [*big.columns, "predicted_body_mass_g"]
    np.testing.assert_array_equal(chunked.predicted_body_mass_g, whole.predicted_body_mass_g)
    served = mlflow.pyfunc.load_model(f"runs:/{p['mass']}/model").predict(frame.drop(columns="body_mass_g"))
    np.testing.assert_allclose(chunked.predicted_body_mass_g[:EXAMPLES], np.ravel(served), rtol=1e-6)
    known = frame.body_mass_g.notna()
    error = np.sqrt(np.mean((chunked.predicted_body_mass_g[:EXAMPLES][known] - frame.body_mass_g[known]) ** 2))
    print(f"penguins body mass, predict RMSE {error:.0f} g (std {frame.body_mass_g.std():.0f} g)")
    assert error < 0.6 * frame.body_mass_g.std()  # grams, not standardized units


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["input=missing.csv"], "error: input=missing.csv: no such file or folder"),
        (["input=new.txt"], "error: input=new.txt: expected a .csv, .parquet or .npy file, or a folder of images"),
        (["input=new.csv", "output=out.json"], "error: output=out.json: expected a .csv or .parquet file name"),
        (["input=new.csv", "batch_size=0"], "error: batch_size=0 is invalid: expected a whole number of rows"),
        (["input=new.csv", "batch_size=many"], "error: batch_size=many is invalid: expected a whole number"),
        (["input=no_island.csv"], "error: input=no_island.csv has no column 'island'; the model takes"),
        (["input=text_mass.csv"], "error: input=text_mass.csv: column 'bill_length_mm' takes numbers, but row 2"),
        (["input=new.csv", "model=nowhere"], "error: model=nowhere: no such directory"),
    ],
)
def test_bad_predict_input_is_one_line(penguin_runs, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    frame = penguin_runs["frame"].drop(columns="species")
    frame.to_csv("new.csv", index=False)
    (tmp_path / "new.txt").write_text("x")
    frame.drop(columns="island").to_csv("no_island.csv", index=False)
    frame.astype({"bill_length_mm": object}).assign(bill_length_mm=["39.1", "long", *["40"] * 342]).to_csv(
        "text_mass.csv", index=False)  # fmt: skip
    pick = [] if any(a.startswith("model=") for a in args) else [f"run_id={penguin_runs['species']}"]
    code, err = _predict(capsys, *pick, f"uri={penguin_runs['uri']}", *args)
    assert code == 1 and err.startswith(message) and err.count("\n") == 1, err
    assert not list(tmp_path.glob(".*.partial")) and not (tmp_path / "new.predictions.csv").exists()


def _feed(signature: dict, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """A table's raw columns as the export takes them: numbers float32 (NaN missing), else strings ("" missing)."""
    out = {}
    for name, spec in signature.items():
        column = frame[name]
        if spec.dtype == tf.float32:
            out[name] = column.to_numpy(dtype=np.float64, na_value=np.nan).astype(np.float32)
        else:
            out[name] = column.map(lambda v: "" if pd.isna(v) else str(v)).to_numpy().astype(str).astype(object)
    return out


def _served(run_id: str, model_input) -> np.ndarray:
    out = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(model_input)
    return out.drop(columns="label").to_numpy() if isinstance(out, pd.DataFrame) else np.asarray(out)


def _exported(tmp_path, run_id: str, uri: str, fmt: str, inputs) -> dict[str, np.ndarray]:
    """`trainer export`, then the export run by its own runtime's loader (TensorFlow's, ONNX Runtime), not ours."""
    out = tmp_path / f"export-{run_id}-{fmt}{ex.SUFFIXES[fmt]}"
    assert ex.main([f"run_id={run_id}", f"uri={uri}", f"format={fmt}", f"output={out}"]) == 0
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out))
        named = inputs if isinstance(inputs, dict) else {session.get_inputs()[0].name: inputs}
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, named), strict=True))
    if fmt == "saved_model":
        serve = tf.saved_model.load(str(out)).signatures["serving_default"]
        named = inputs if isinstance(inputs, dict) else {"inputs": inputs}
        return {k: v.numpy() for k, v in serve(**{k: tf.constant(v) for k, v in named.items()}).items()}
    runner = tf.lite.Interpreter(str(out)).get_signature_runner()
    return runner(**(inputs if isinstance(inputs, dict) else {"inputs": inputs}))


@pytest.mark.parametrize(  # TF Lite's and ONNX's converters take 6-16 s each: the slow suite runs them
    "fmt", [f if f == "saved_model" else pytest.param(f, marks=pytest.mark.slow) for f in ex.FORMATS]
)
def test_exported_tables_answer_as_the_served_model_to_1e5(penguin_runs, tmp_path, fmt):
    """The typed table's schema (categories, a missing cell's indicator and fill) inside the export."""
    p, frame = penguin_runs, penguin_runs["frame"]
    signature = ex.input_signature(pr.load(pr.Options(run_id=p["species"], uri=p["uri"])).wrapper)
    assert set(signature) == {"island", "bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g",
                              "sex", "year"}  # fmt: skip
    rows = frame.drop(columns="species")
    got = _exported(tmp_path, p["species"], p["uri"], fmt, _feed(signature, rows))
    expected = _served(p["species"], rows)
    print(f"{fmt}: species probabilities, largest difference {np.abs(got['probabilities'] - expected).max():.2e}")
    np.testing.assert_allclose(got["probabilities"], expected, atol=1e-5)
    labels = mlflow.pyfunc.load_model(f"runs:/{p['species']}/model").predict(rows).label
    assert [v.decode() if isinstance(v, bytes) else v for v in got["label"]] == list(labels)
    mass_signature = ex.input_signature(pr.load(pr.Options(run_id=p["mass"], uri=p["uri"])).wrapper)
    rows = frame.drop(columns="body_mass_g")
    got = _exported(tmp_path, p["mass"], p["uri"], fmt, _feed(mass_signature, rows))
    expected = _served(p["mass"], rows)  # grams: the targets' scaling is inside the export too
    print(f"{fmt}: body mass, largest relative difference {np.abs(got['predictions'] / expected - 1).max():.2e}")
    np.testing.assert_allclose(got["predictions"], expected, rtol=1e-5)


@pytest.mark.slow  # ~7 s, a new process: test_models checks each built-in model's file in the fast suite
def test_the_logged_keras_file_loads_with_keras_alone(penguin_runs, tmp_path):
    """The MLflow model's `artifacts/model.keras`, in a new process that imports Keras and nothing of ours: Keras'
    own layers (models.portable), the targets' units included; its outputs equal the served model's raw ones."""
    p, names = penguin_runs, ("species", "mass")
    for name in names:
        path = mlflow.artifacts.download_artifacts(
            f"runs:/{p[name]}/model/artifacts/model.keras", dst_path=str(tmp_path / "download"), tracking_uri=p["uri"]
        )
        (tmp_path / name).mkdir()
        shutil.move(path, tmp_path / name / "model.keras")
        served = mlflow.pyfunc.load_model(f"runs:/{p[name]}/model").unwrap_python_model()
        x = served.cast(p["frame"].drop(columns=served.targets).head(50))
        np.save(tmp_path / name / "x.npy", x)
        np.save(tmp_path / name / "out.npy", np.asarray(served.keras_model(x)))
    code = (
        "import sys, keras, numpy as np\n"
        f"for name in {names!r}:\n"
        f"    folder = {str(tmp_path)!r} + '/' + name\n"
        "    model = keras.saving.load_model(folder + '/model.keras')\n"
        "    out = np.asarray(model(np.load(folder + '/x.npy')))\n"
        "    print(name, float(np.abs(out - np.load(folder + '/out.npy')).max()))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'trainer'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    *differences, imported = done.stdout.strip().splitlines()[-3:]
    assert differences == ["species 0.0", "mass 0.0"] and imported == "[]", done.stdout


@pytest.mark.slow  # ~10-35 s on 2 cores: the fast suite's time (the slow suite runs it)
def test_images_predict_and_export_from_the_png_folder(digits, tmp_path, compose_cfg, capsys):
    """A CNN on digits' PNG folder: predict reads the folder as training decoded it (one row per image, by
    path), from .npy too; both exports take raw uint8 pixels and answer as the served model, to 1e-5."""
    overrides = ["model=cnn", "model.filters=[8]", "loss=sparse_categorical_crossentropy", "data=image_folder",
                 f"data.path={digits['root'] / 'png'}", "data.color_mode=grayscale",
                 "trainer.max_steps=300"]  # fmt: skip
    uri, run_id = _train(tmp_path, compose_cfg, "digits", overrides)
    code, err = _predict(capsys, f"run_id={run_id}", f"uri={uri}", f"input={digits['root'] / 'png'}",
                         f"output={tmp_path / 'png.csv'}", "batch_size=500")  # fmt: skip
    assert code == 0, err
    from_png = pd.read_csv(tmp_path / "png.csv")
    assert len(from_png) == len(digits["y"]) and from_png.path[0] == "0/00000.png"
    truth = from_png.path.str.split("/").str[0].astype(int)
    accuracy = float((from_png.predicted_label == truth).mean())
    print(f"digits CNN (300 steps), predict over the PNG folder: accuracy {accuracy:.4f}")
    assert accuracy > 0.9
    code, err = _predict(capsys, f"run_id={run_id}", f"uri={uri}", f"input={digits['root'] / 'x.npy'}",
                         f"output={tmp_path / 'npy.csv'}")  # fmt: skip
    assert code == 0, err
    from_npy = pd.read_csv(tmp_path / "npy.csv")
    assert list(from_npy.row) == list(range(len(digits["y"])))
    np.testing.assert_array_equal(from_npy.predicted_label, from_png.predicted_label)  # same images, same order
    pixels = digits["x"][:200]
    expected = _served(run_id, pixels)
    for fmt in ex.FORMATS:
        got = _exported(tmp_path, run_id, uri, fmt, pixels)
        print(f"{fmt}: digits probabilities, largest difference {np.abs(got['probabilities'] - expected).max():.2e}")
        np.testing.assert_allclose(got["probabilities"], expected, atol=1e-5)


@pytest.mark.slow  # a third penguins run (~10 s) and two loads of your own class
def test_a_model_of_your_own_class_predicts_exports_and_fine_tunes_once_you_name_it(penguin_runs, tmp_path, capsys,
                                                                                     monkeypatch):  # fmt: skip
    """examples/my_models.py's Quadratic, registered nowhere: the logged file names it, so predict and export load
    it only with `trusted_targets` naming its class or module (nothing of it is imported otherwise), and
    init_from loads it as the class the new run builds."""
    from conftest import compose_config

    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))
    p = penguin_runs
    overrides = [f"hydra.searchpath=[file://{EXAMPLES_DIR / 'my_conf'}]", "model=quadratic", "data=csv",
                 f"data.path={p['root'] / 'penguins.csv'}", "data.target=body_mass_g", "loss=mse",
                 "trainer.max_steps=200", f"tracking.uri={p['uri']}", "tracking.run_name=quadratic",
                 "tracking.system_metrics=false"]  # fmt: skip
    train(compose_config(overrides), overrides=overrides, output_dir=tmp_path / "quadratic")
    client = mlflow.MlflowClient(p["uri"])
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id],
                               "attributes.run_name = 'quadratic'")  # fmt: skip
    rows = p["frame"].drop(columns="body_mass_g").head(40)
    rows.to_csv(tmp_path / "rows.csv", index=False)
    base = [f"run_id={run.info.run_id}", f"uri={p['uri']}", f"input={tmp_path / 'rows.csv'}"]
    code, err = _predict(capsys, *base, f"output={tmp_path / 'none.csv'}")
    assert code == 1 and "names the class my_models.Quadratic" in err and "trusted_targets=[my_models.Quadratic]" in err
    code, err = _predict(capsys, *base, f"output={tmp_path / 'bad.csv'}", "trusted_targets=[nosuch.Module]")
    assert code == 1 and "trusted_targets: cannot import nosuch.Module" in err, err
    served = _served(run.info.run_id, rows).reshape(-1)
    for i, named in enumerate(("my_models.Quadratic", "my_models")):
        code, err = _predict(capsys, *base, f"output={tmp_path / f'{i}.csv'}", f"trusted_targets=[{named}]")
        assert code == 0, err
        np.testing.assert_allclose(pd.read_csv(tmp_path / f"{i}.csv")["predicted_body_mass_g"], served, rtol=1e-5)
    out = tmp_path / "export"
    assert ex.main([f"run_id={run.info.run_id}", f"uri={p['uri']}", f"output={out}",
                    "trusted_targets=[my_models.Quadratic]"]) == 0  # fmt: skip
    signature = ex.input_signature(pr.load(pr.Options(run_id=run.info.run_id, uri=p["uri"],
                                                      trusted_targets=("my_models",))).wrapper)  # fmt: skip
    serve = tf.saved_model.load(str(out)).signatures["serving_default"]
    got = serve(**{k: tf.constant(v) for k, v in _feed(signature, rows).items()})["predictions"].numpy()
    np.testing.assert_allclose(got.reshape(-1), served, rtol=1e-5)
    import my_models

    from trainer import finetune

    logged = pr.load(pr.Options(run_id=run.info.run_id, uri=p["uri"], trusted_targets=("my_models",))).wrapper
    [inner] = [layer for layer in logged.keras_model.layers if type(layer) is my_models.Quadratic]
    model = my_models.Quadratic(1)
    model(np.zeros((1, *logged.keras_model.inputs[0].shape[1:]), np.float32))
    assert finetune.init_from(model, run.info.run_id, p["uri"]).endswith(f"of run {run.info.run_id}")
    for ours, theirs in zip(model.get_weights(), inner.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
