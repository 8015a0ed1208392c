"""`trainer export`: a logged model as a TensorFlow SavedModel (TF Serving), a TensorFlow Lite file, or ONNX.

    trainer export run_id=<id> output=exported/                        # format=saved_model
    trainer export model=models:/<name>/<version> format=tflite output=model.tflite
    trainer export run_id=<id> format=onnx output=model.onnx              # pip install -e ".[onnx]": tf2onnx

What is exported is what `trainer predict` and the MLflow model answer, preprocessing included: the data's
scaling (inside the logged Keras model), and for a typed table its fitted schema as TensorFlow ops (`TableEncoder`:
a missing number is NaN, a missing category or text the empty string), then the answer: a classifier's
`probabilities` (one per class, in the order of the `classes` it also returns) and `label`, a regression's
`predictions` in the targets' own units. The signature is `serving_default` (SavedModel) or the only one (TFLite).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import cli, startup
from trainer.config import TrainerError, first_line

FORMATS = ("saved_model", "tflite", "onnx")
SUFFIXES = {"saved_model": "", "tflite": ".tflite", "onnx": ".onnx"}  # a file's; a SavedModel is a folder
ONNX_OPSET = 17  # tf2onnx's opset: ONNX Runtime 1.20+ runs it
TOKEN_SPLIT = r"[^\pL\pN_]+"  # what is not a word character in Python's (?u)\w: columns.TOKEN's tokens, in RE2


@dataclass
class Options:
    """`trainer export --help` lists these."""

    run_id: str | None = cli.key(None, "the run whose logged model is exported (or run_name, or model)")
    run_name: str | None = cli.key(None, "the newest run of this name in experiment")
    model: str | None = cli.key(None, "models:/<name>/<version> (or @<alias>), or an MLflow model directory")
    format: str = cli.key("saved_model", "what to write:", FORMATS)
    output: str | None = cli.key(None, "a new directory (saved_model) or file (tflite); null: exported-<run>[.tflite]")
    overwrite: bool = cli.key(False, "replace an existing output")
    uri: str | None = cli.key(None, "tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    experiment: str | None = cli.key(None, "where run_name is looked up; null: tracking.experiment's")
    trusted_targets: tuple[str, ...] = cli.key((), "your own model classes, or their modules: [my_pkg.models.MyNet]")
    verbose: bool = cli.key(False, "TensorFlow's and MLflow's start-up lines as they print them")


def table_encoder(table: dict[str, Any]) -> Any:
    """A Keras layer computing columns.TableSchema.transform in TensorFlow ops (so it exports): a dict of raw
    columns -> float32 [rows, features]."""
    import keras
    import tensorflow as tf

    from trainer.data.columns import TableSchema

    schema = TableSchema.from_dict(table)

    class TableEncoder(keras.layers.Layer):
        def __init__(self) -> None:
            super().__init__(name="table_encoder")
            self.columns = [c for c in schema.columns if c.kind != "ignore"]
            self.lookups = {c.name: keras.layers.StringLookup(vocabulary=c.values, num_oov_indices=1,
                                                              name=f"lookup_{i}")
                            for i, c in enumerate(self.columns) if c.kind in ("categorical", "text")}  # fmt: skip
            self.blank = keras.layers.StringLookup(vocabulary=[""], num_oov_indices=1, name="blank")  # 1: a missing
            # cell (""), by lookup rather than string equality, which ONNX's converter casts to a number

        def call(self, inputs: dict[str, Any]) -> Any:
            parts = [tf.reshape(self._encode(c, inputs[c.name]), [-1, len(c.outputs())]) for c in self.columns]
            return tf.concat(parts, axis=1)  # each part's width static: converters (ONNX) infer the shapes

        def _encode(self, c: Any, x: Any) -> Any:
            if c.kind == "numeric":
                gaps = tf.not_equal(x, x)  # NaN: TensorFlow Lite has no IsNan of its own
                parts = [tf.where(gaps, tf.constant(c.mean, tf.float32), x)]  # float32 throughout (TF Lite): the
                # float64 transform's values rounded once, as the model takes them
                return tf.stack([*parts, tf.cast(gaps, tf.float32)] if c.indicator else parts, axis=1)
            n = len(c.values)
            if c.kind == "categorical":  # lookup: 0 for a value never seen, 1..n the values
                ids = tf.cast(self.lookups[c.name](x), tf.int32)
                missing = tf.equal(tf.cast(self.blank(x), tf.int32), 1)
                slots = tf.where(missing, n + 1, tf.where(tf.equal(ids, 0), n, ids - 1))
                if c.embed:
                    return tf.cast(slots, tf.float32)[:, None]
                return tf.cast(tf.equal(slots[:, None], tf.range(n + 2)[None, :]), tf.float32)  # one-hot, in ops
                # every converter takes (ONNX's mistranslated tf.one_hot)
            words = tf.strings.split(tf.strings.regex_replace(tf.strings.lower(x, encoding="utf-8"), TOKEN_SPLIT, " "))
            words = tf.ragged.boolean_mask(words, tf.strings.length(words, unit="UTF8_CHAR") >= 2)
            ids = tf.cast(self.lookups[c.name](words), tf.int32)
            counts = tf.math.bincount(ids, minlength=n + 1, maxlength=n + 1, axis=-1, dtype=tf.float32)
            counts = tf.reshape(counts, [-1, n + 1])[:, 1:]  # its rank, which bincount of ragged ids leaves unknown
            weighted = counts * tf.constant(c.idf, tf.float32)
            norms = tf.norm(weighted, axis=1, keepdims=True)
            return weighted / tf.where(norms > 0, norms, tf.ones_like(norms))

    return TableEncoder()


def input_signature(wrapper: Any) -> Any:
    """Each raw column's spec for a typed table (a number float32, else a string), else the model's input."""
    import tensorflow as tf

    if wrapper.table is not None:
        from trainer.data.columns import TableSchema

        columns = [c for c in TableSchema.from_dict(wrapper.table).columns if c.kind != "ignore"]
        return {c.name: tf.TensorSpec([None], tf.float32 if c.kind == "numeric" else tf.string, name=_safe(c.name))
                for c in columns}  # fmt: skip
    shape = wrapper.keras_model.inputs[0].shape
    return tf.TensorSpec([None, *shape[1:]], wrapper.keras_model.inputs[0].dtype, name="inputs")


def _blank_row(signature: dict[str, Any]) -> dict[str, Any]:
    """One row of missing cells (NaN, ""), as a typed table's export takes them."""
    import tensorflow as tf

    return {k: tf.constant([float("nan")] if s.dtype == tf.float32 else [""], s.dtype) for k, s in signature.items()}


def _safe(name: str) -> str:
    """A column name as a signature's input name (letters, digits, _ . - /)."""
    import re

    return re.sub(r"[^A-Za-z0-9_.\-/]", "_", name) or "column"


def serving_fn(wrapper: Any, encoder: Any) -> Any:
    """The exported function: raw inputs -> the served model's answer as named tensors."""
    import tensorflow as tf

    model, task = wrapper.keras_model, wrapper.task
    names = tf.constant(wrapper.names or [])

    def serve(inputs: Any) -> dict[str, Any]:
        x = encoder(inputs) if encoder is not None else inputs
        out = model(x, training=False)
        if task == "regression":
            return {"predictions": out}
        if task == "binary":
            p = tf.sigmoid(out) if wrapper.from_logits else out
            if p.shape[-1] != 1:
                return {"probabilities": p}
            p = tf.concat([1 - p, p], axis=1)
        else:
            p = tf.nn.softmax(out) if wrapper.from_logits else out
        classes = names if wrapper.names else tf.strings.as_string(tf.range(tf.shape(p)[1]))
        return {"probabilities": p, "label": tf.gather(classes, tf.argmax(p, axis=1)), "classes": classes}

    return serve


def export(predictor: Any, fmt: str, output: Path) -> Path:
    """Write the predictor's model as `fmt` to `output`; returns it."""
    import keras

    wrapper = predictor.wrapper
    text = [c["name"] for c in (wrapper.table or {}).get("columns", []) if c["kind"] == "text"]
    if fmt != "saved_model" and text:
        raise TrainerError(f"format={fmt}: text column {text[0]!r} needs TensorFlow's string ops (regex, split), "
                           f"which {'TensorFlow Lite' if fmt == 'tflite' else 'ONNX'}'s built-in ops lack; export "
                           "format=saved_model")  # fmt: skip
    encoder = table_encoder(wrapper.table) if wrapper.table is not None else None
    archive = keras.export.ExportArchive()
    archive.track(wrapper.keras_model)
    if encoder is not None:
        encoder(_blank_row(input_signature(wrapper)))  # built (its lookups made) before it is tracked
        archive.track(encoder)
    archive.add_endpoint("serve", serving_fn(wrapper, encoder), input_signature=[input_signature(wrapper)])
    if fmt == "saved_model":
        archive.write_out(str(output), verbose=False)
        return output
    with tempfile.TemporaryDirectory(prefix="trainer-export-") as tmp:
        archive.write_out(tmp, verbose=False)
        output.write_bytes(_tflite(tmp) if fmt == "tflite" else _onnx(tmp))
    return output


def _tflite(saved_model: str) -> bytes:
    """TensorFlow Lite's converter on the SavedModel: built-in ops only (the interpreter of the tensorflow-cpu
    wheel has no TensorFlow kernels linked in), which a typed table's lookups and NaN tests are written for."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    try:
        return converter.convert()
    except Exception as e:  # the converter's own error: one line
        reason = first_line(e)[:300]
        raise TrainerError(f"format=tflite: TensorFlow Lite cannot convert this model ({reason})") from None


def _onnx(saved_model: str) -> bytes:
    """tf2onnx's converter on the SavedModel, in its own process (it switches TensorFlow to graph mode and logs
    a page of INFO lines); its last error line when it fails."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("tf2onnx") is None:
        raise TrainerError('format=onnx needs tf2onnx: pip install -e ".[onnx]" (or pip install tf2onnx)')
    with tempfile.TemporaryDirectory(prefix="trainer-onnx-") as tmp:
        out = Path(tmp) / "model.onnx"
        cmd = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", saved_model, "--signature_def",
               "serving_default", "--opset", str(ONNX_OPSET), "--output", str(out)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.is_file():
            lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
            raise TrainerError(f"format=onnx: tf2onnx cannot convert this model ({(lines or ['no output'])[-1][:300]})")
        return out.read_bytes()


def output_path(opts: Options, name: str) -> Path:
    path = Path(opts.output or f"exported-{name}{SUFFIXES[opts.format]}")
    if path.exists() and not opts.overwrite:
        raise TrainerError(f"output={path} exists; name another, or add overwrite=true")
    if path.exists() and path.is_dir() != (opts.format == "saved_model"):
        raise TrainerError(f"output={path} is a {'folder' if path.is_dir() else 'file'}; format={opts.format} "
                           f"writes a {'folder' if opts.format == 'saved_model' else 'file'}")  # fmt: skip
    if not path.parent.is_dir():
        raise TrainerError(f"output={path}: no such folder {path.parent}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """`trainer export key=value ...`: the exit status (1 after one `error:` line)."""
    return cli.main_of("export", Options, __doc__.splitlines()[0], _export, argv)


def _export(opts: Options, _: list[str]) -> None:
    import shutil

    from trainer import predict

    cli.one_model("export", opts.run_id, opts.run_name, opts.model, directory=True)
    name = (opts.run_id or opts.run_name or Path(opts.model or "model").name.replace(":", "_")).replace("/", "_")
    output = output_path(opts, name)
    startup.quiet_libraries(opts.verbose)
    startup.import_tensorflow(opts.verbose)
    picks = {"run_id": opts.run_id, "run_name": opts.run_name, "model": opts.model, "uri": opts.uri}
    loaded = predict.load(predict.Options(**picks, experiment=opts.experiment, trusted_targets=opts.trusted_targets))
    if output.exists():  # overwrite=true
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    export(loaded, opts.format, output)
    print(f"exported {loaded.source} as {opts.format}: {output}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
