"""`trainer predict`: a trained model's predictions for a file of new examples, beside the file's own columns.

    trainer predict run_id=<id> input=new_rows.csv                    # -> new_rows.predictions.csv, here
    trainer predict model=models:/<name>/<version> input=rows.parquet output=scored.parquet
    trainer predict run_name=<name> input=photos/                     # an image folder: one row per image
    trainer predict model=./downloaded-model input=x.npy              # an MLflow model directory

What comes out is what the logged (served) model gives: a classifier's probabilities (`p_<class>`) and its
`predicted_label`, a regression's values in the targets' own units (`predicted_<target>`), after the same
preprocessing as in training (the model carries its scaling; a typed table's rows go through its fitted schema).
Input is read and written chunk by chunk (`batch_size` rows), so a file larger than memory streams through; the
output is written to a temporary file beside it and renamed when complete, so a stopped run leaves no half file.

Loading never runs code from the store: the model is its `.keras` file with Keras' safe_mode, and the wrapper's
settings come from the plain JSON logged beside it (`artifacts/predict.json`), never from the pickled wrapper.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer import cli, startup
from trainer.config import TrainerError, first_line

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png")  # what the image_folder reader trains on
TABLE_SUFFIXES = (".csv", ".parquet")  # tables in, tables out
PREDICTION_PREFIX, PROBABILITY_PREFIX, LABEL = "predicted_", "p_", "predicted_label"


@dataclass
class Options:
    """`trainer predict --help` lists these."""

    input: str | None = cli.key(None, "the examples: a .csv or .parquet table, a .npy array, or a folder of images")
    output: str | None = cli.key(None, "where the predictions go (.csv or .parquet); null: <input>.predictions.csv")
    run_id: str | None = cli.key(None, "the run whose logged model predicts (or run_name, or model)")
    run_name: str | None = cli.key(None, "the newest run of this name in experiment")
    model: str | None = cli.key(None, "models:/<name>/<version> (or @<alias>), or an MLflow model directory")
    uri: str | None = cli.key(None, "tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    experiment: str | None = cli.key(None, "where run_name is looked up; null: tracking.experiment's")
    batch_size: int = cli.key(1024, "rows read, predicted and written at a time: memory stays bounded by it")
    overwrite: bool = cli.key(False, "replace an existing output file")
    trusted_targets: tuple[str, ...] = cli.key((), "your own model classes, or their modules: [my_pkg.models.MyNet]")
    verbose: bool = cli.key(False, "TensorFlow's and MLflow's start-up lines as they print them")


# --- the model ---------------------------------------------------------------------------------
@dataclass
class Predictor:
    """The logged model's wrapper (tracking.models.KerasPyfunc, rebuilt from its JSON settings) and where it
    came from."""

    wrapper: Any
    source: str

    @property
    def model(self) -> Any:
        return self.wrapper.keras_model

    def predict(self, model_input: Any) -> Any:
        """The served model's answer (probabilities and labels, or values in the targets' units) for one chunk."""
        values = self.wrapper.cast(model_input)
        return self.wrapper.outputs(np.asarray(self._forward(values)))

    @functools.cached_property
    def _forward(self) -> Any:
        """The model's forward pass, traced once for any number of rows (Keras' predict retraced per chunk)."""
        import tensorflow as tf

        spec = self.model.inputs[0]
        return tf.function(lambda x: self.model(x, training=False),
                           input_signature=[tf.TensorSpec([None, *spec.shape[1:]], spec.dtype)])  # fmt: skip


def load(opts: Options) -> Predictor:
    """The model that `run_id`, `run_name` or `model` names: a run's or registered version's MLflow model, read
    from the store, or an MLflow model directory on disk."""
    if opts.model and not opts.model.startswith("models:/"):
        return _from_directory(Path(opts.model), opts.trusted_targets)
    import mlflow
    from mlflow.tracking import MlflowClient

    from trainer import evaluate as ev
    from trainer.tracking.connect import check_readable

    uri = opts.uri or mlflow.get_tracking_uri()
    check_readable(uri)
    client = MlflowClient(uri)
    run_id, found = opts.run_id, None
    if opts.model:
        run_id, found = ev.registered_version(client, opts.model)
    run = ev.find_run(client, run_id, opts.run_name, opts.experiment or cli.default_experiment())
    found = found or ev.mlflow_model(client, run)
    if found is None:
        raise TrainerError(f"run {run.info.run_id} has no logged model (was tracking.log_model=false?)")
    with tempfile.TemporaryDirectory(prefix="trainer-predict-") as tmp, ev.no_progress_bars():
        own = ev.trusted_classes(opts.trusted_targets)
        model, source = ev.load_run_model(client, run, uri, Path(tmp), None, found, own)
        settings = _logged_settings(found[1], uri, Path(tmp)) or _settings_of_run(client, run, uri, Path(tmp), model)
    return Predictor(_wrapper(settings, model), f"{source} of run {run.info.run_id}")


def _from_directory(path: Path, trusted: Sequence[str]) -> Predictor:
    """An MLflow model directory the trainer logged (`mlflow artifacts download`): its .keras file and settings."""
    from trainer import evaluate as ev
    from trainer.tracking.models import SETTINGS_FILE

    if not path.is_dir():
        raise TrainerError(f"model={path}: no such directory, and not models:/<name>/<version>")
    files = sorted((path / "artifacts").glob("*.keras"))
    settings = path / "artifacts" / SETTINGS_FILE
    if not files or not settings.is_file():
        raise TrainerError(f"model={path}: not a model the trainer logged (it has no artifacts/*.keras and "
                           f"artifacts/{SETTINGS_FILE}); download one with `mlflow artifacts download`")  # fmt: skip
    model = ev.load_keras(files[0], f"model={path}", ev.trusted_classes(trusted))
    return Predictor(_wrapper(_read_settings(settings, f"model={path}"), model), str(path))


def _read_settings(path: Path, source: str) -> dict[str, Any]:
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainerError(f"{source}: its {path.name} is not JSON ({first_line(e)})") from None
    if not isinstance(settings, dict) or settings.get("task") not in ("regression", "binary", "multiclass"):
        raise TrainerError(f"{source}: its {path.name} does not describe a model (no task)")
    return settings


def _logged_settings(location: str, uri: str, dst: Path) -> dict[str, Any] | None:
    """The settings JSON logged with the model (tracking.models.log_model), None for a model logged before it."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from trainer.tracking.models import SETTINGS_FILE

    try:
        path = download_artifacts(artifact_uri=f"{location}/artifacts/{SETTINGS_FILE}", dst_path=str(dst / "settings"),
                                  tracking_uri=uri)  # fmt: skip
    except (MlflowException, OSError):
        return None
    return _read_settings(Path(path), location)


def _settings_of_run(client: Any, run: Any, uri: str, dst: Path, model: Any) -> dict[str, Any]:
    """A model logged before its settings were: the same settings from the run's tags and artifacts."""
    from omegaconf import OmegaConf

    from trainer import evaluate as ev

    cfg = ev.run_config(run, uri, (), dst)
    target = OmegaConf.select(cfg, "data.target", default=None)
    shape = model.inputs[0].shape if getattr(model, "inputs", None) else ()
    table = None
    if any(a.path == "table_schema.json" for a in client.list_artifacts(run.info.run_id)):
        from mlflow.artifacts import download_artifacts

        path = download_artifacts(run_id=run.info.run_id, artifact_path="table_schema.json", dst_path=str(dst),
                                  tracking_uri=uri)  # fmt: skip
        table = json.loads(Path(path).read_text())
    return {
        "task": run.data.tags.get("data.task", "regression"),
        "names": ev.logged_labels(client, run, uri, dst),
        "from_logits": bool(OmegaConf.select(cfg, "loss.from_logits", default=True)),
        "dtype": str(model.inputs[0].dtype) if getattr(model, "inputs", None) else "float32",
        "columns": int(shape[1]) if len(shape) == 2 and table is None else None,
        "table": table,
        "targets": [target] if isinstance(target, str) else list(target or []),
    }


def _wrapper(settings: dict[str, Any], model: Any) -> Any:
    from trainer.tracking.models import KerasPyfunc

    return KerasPyfunc.from_settings(settings, model)


# --- reading the input, chunk by chunk ---------------------------------------------------------
@dataclass
class Chunk:
    """Rows of the input: their own columns (kept in the output) and what the model takes of them."""

    own: Any  # pandas DataFrame
    model_input: Any


class Reader:
    """The input file as chunks of at most `rows` rows; `total` is its size in `unit`s (None: unknown)."""

    def __init__(self, path: Path, predictor: Predictor, rows: int):
        self.path, self.predictor, self.rows = path, predictor, rows
        self.kind = _kind(path)
        self.unit, self.total, self.position = "rows", None, 0

    def __iter__(self) -> Iterator[Chunk]:
        return getattr(self, f"_{self.kind}")()

    def _csv(self) -> Iterator[Chunk]:
        import pandas as pd

        self.unit, self.total = "bytes", self.path.stat().st_size  # how far into the file: its read position
        with self.path.open("rb") as f:
            try:
                for frame in pd.read_csv(f, chunksize=self.rows):
                    self.position = f.tell()
                    yield Chunk(frame, self._table_input(frame))
            except (ValueError, pd.errors.ParserError) as e:
                raise TrainerError(f"input={self.path} is not a CSV table pandas reads ({first_line(e)})") from None

    def _parquet(self) -> Iterator[Chunk]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            file = pq.ParquetFile(self.path)
            self.total = file.metadata.num_rows
            for batch in file.iter_batches(batch_size=self.rows):
                frame = pa.Table.from_batches([batch]).to_pandas()
                yield Chunk(frame, self._table_input(frame))
        except (pa.ArrowException, OSError) as e:
            raise TrainerError(f"input={self.path} is not a Parquet file pyarrow reads ({first_line(e)})") from None

    def _table_input(self, frame: Any) -> Any:
        """What the model takes of a table chunk: the columns it was trained on, in training order; the others
        (an id, the target itself) stay in the output only. A plain table's model logged without its column
        names takes the rows as they are."""
        wrapper = self.predictor.wrapper
        if wrapper.table is not None:
            from trainer.data.columns import TableSchema

            names = [c.name for c in TableSchema.from_dict(wrapper.table).columns]
        else:
            names = wrapper.inputs
        if names is None:
            return frame
        if absent := [n for n in names if n not in frame.columns]:
            raise TrainerError(f"input={self.path} has no column {absent[0]!r}; the model takes {names}")
        return frame[names]

    def _npy(self) -> Iterator[Chunk]:
        import pandas as pd

        try:
            array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise TrainerError(f"input={self.path} is not a .npy array ({first_line(e)})") from None
        self.total = len(array)
        for start in range(0, len(array), self.rows):
            part = np.asarray(array[start : start + self.rows])
            yield Chunk(pd.DataFrame({"row": np.arange(start, start + len(part))}), part)

    def _images(self) -> Iterator[Chunk]:
        import pandas as pd

        files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise TrainerError(f"input={self.path} holds no images ({' '.join(IMAGE_SUFFIXES)})")
        self.total = len(files)
        shape = tuple(self.predictor.model.inputs[0].shape[1:])
        if len(shape) != 3:
            raise TrainerError(f"input={self.path} is a folder of images, but the model takes inputs of shape {shape}")
        for start in range(0, len(files), self.rows):
            part = files[start : start + self.rows]
            pixels = np.stack([_image(f, shape) for f in part])
            yield Chunk(pd.DataFrame({"path": [str(f.relative_to(self.path)) for f in part]}), pixels)

    def done(self, chunk: Chunk) -> int:
        """How far the progress bar moves for `chunk`."""
        return self.position if self.unit == "bytes" else len(chunk.own)


def _kind(path: Path) -> str:
    if not path.exists():
        raise TrainerError(f"input={path}: no such file or folder (working directory: {Path.cwd()})")
    if path.is_dir():
        return "images"
    kinds = {".csv": "csv", ".parquet": "parquet", ".npy": "npy"}
    if path.suffix.lower() not in kinds:
        raise TrainerError(f"input={path}: expected a .csv, .parquet or .npy file, or a folder of images")
    return kinds[path.suffix.lower()]


def _image(file: Path, shape: tuple[int, ...]) -> np.ndarray:
    """One image as training decoded it (trainer.data.files.image_folder): the model's channels, and resized
    (bilinear, rounded back to 0..255) when its size is not the model's."""
    import tensorflow as tf

    try:
        image = tf.io.decode_image(tf.io.read_file(str(file)), channels=shape[-1], expand_animations=False)
    except tf.errors.OpError as e:
        raise TrainerError(f"{file} cannot be decoded as an image ({first_line(e)[:200]})") from None
    if tuple(image.shape[:2]) != shape[:2]:
        image = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(image, shape[:2])), 0, 255), tf.uint8)
    return image.numpy()


# --- writing the output ------------------------------------------------------------------------
def prediction_columns(out: Any, targets: Sequence[str]) -> Any:
    """The served model's answer as named columns: `p_<class>` and `predicted_label` for a classifier,
    `predicted_<target>` for regression (`predicted` for one unnamed target)."""
    import pandas as pd

    from trainer.tracking.models import LABEL_COLUMN

    if isinstance(out, pd.DataFrame):  # a classifier: probabilities by class name, then the label
        names = {c: LABEL if c == LABEL_COLUMN else f"{PROBABILITY_PREFIX}{c}" for c in out.columns}
        return out.rename(columns=names)
    values = np.asarray(out).reshape(len(out), -1)
    k = values.shape[1]
    names = [f"{PREDICTION_PREFIX}{t}" for t in targets] if len(targets) == k else (
        ["predicted"] if k == 1 else [f"{PREDICTION_PREFIX}{i}" for i in range(k)])  # fmt: skip
    return pd.DataFrame(values, columns=names)


class Writer:
    """Appends chunks to a temporary file beside `path`, renamed to `path` by `commit`."""

    def __init__(self, path: Path):
        self.path, self.parquet = path, None
        self.partial = path.with_name(f".{path.name}.partial")
        self.first = True

    def write(self, frame: Any) -> None:
        if self.path.suffix.lower() == ".csv":
            frame.to_csv(self.partial, mode="w" if self.first else "a", header=self.first, index=False)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self.parquet is None:
                self.parquet = pq.ParquetWriter(self.partial, table.schema)
            try:
                self.parquet.write_table(table.cast(self.parquet.schema))
            except (pa.ArrowException, ValueError) as e:
                raise TrainerError(f"output={self.path}: a later chunk's columns have other types than the first's "
                                   f"({first_line(e)}); write a .csv instead") from None  # fmt: skip
        self.first = False

    def commit(self) -> None:
        if self.parquet is not None:
            self.parquet.close()
        os.replace(self.partial, self.path)

    def discard(self) -> None:
        if self.parquet is not None:
            with contextlib.suppress(Exception):
                self.parquet.close()
        self.partial.unlink(missing_ok=True)


def output_path(opts: Options, input_path: Path) -> Path:
    """`output`, else `<input>.predictions.csv` in the working directory; never the input, never an existing
    file unless overwrite=true."""
    path = Path(opts.output) if opts.output else Path(f"{input_path.name.rpartition('.')[0] or input_path.name}"
                                                        ".predictions.csv")  # fmt: skip
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise TrainerError(f"output={path}: expected a .csv or .parquet file name")
    if path.exists() and path.resolve() == input_path.resolve():
        raise TrainerError(f"output={path} is the input; name another file")
    if path.exists() and not opts.overwrite:
        raise TrainerError(f"output={path} exists; name another file, or add overwrite=true")
    if not path.parent.is_dir():
        raise TrainerError(f"output={path}: no such folder {path.parent}")
    return path


def predict_file(opts: Options, predictor: Predictor) -> tuple[Path, int, float]:
    """Stream `opts.input` through the model into the output file: (output, rows, seconds)."""
    import pandas as pd

    input_path = Path(opts.input)
    reader = Reader(input_path, predictor, opts.batch_size)
    out = output_path(opts, input_path)
    writer, rows, start = Writer(out), 0, time.perf_counter()
    targets = predictor.wrapper.targets
    try:
        with _progress(reader) as advance:
            for chunk in reader:
                predicted = prediction_columns(predictor.predict(chunk.model_input), targets)
                if clash := sorted(set(predicted.columns) & set(chunk.own.columns)):
                    raise TrainerError(f"input={input_path} has a column {clash[0]!r}, which the predictions are "
                                       "named too; rename it")  # fmt: skip
                own = chunk.own.reset_index(drop=True)
                writer.write(pd.concat([own, predicted], axis=1))
                rows += len(own)
                advance(reader.done(chunk))
        if rows == 0:
            raise TrainerError(f"input={input_path} has no rows")
        writer.commit()
    except BaseException as e:
        writer.discard()
        if isinstance(e, TrainerError):
            raise
        from mlflow.exceptions import MlflowException

        if isinstance(e, MlflowException):  # the wrapper's refusals: a bad cell, a wrong column count
            raise TrainerError(f"input={input_path}: {first_line(e).removeprefix('input: ')}") from None
        raise
    return out, rows, time.perf_counter() - start


@contextlib.contextmanager
def _progress(reader: Reader) -> Iterator[Any]:
    """A progress bar on a terminal's stderr (rows, or bytes of a CSV file); nothing when piped."""
    console = cli.notice_console()
    if not console.is_terminal:
        yield lambda done: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("predict"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeRemainingColumn(),
                  console=console, transient=True) as bar:  # fmt: skip
        task = bar.add_task("predict", total=None)
        moved = {"rows": 0}

        def advance(done: int) -> None:
            bar.update(task, total=reader.total)
            if reader.unit == "bytes":
                bar.update(task, completed=done)
            else:
                moved["rows"] += done
                bar.update(task, completed=moved["rows"])

        yield advance


def main(argv: Sequence[str] | None = None) -> int:
    """`trainer predict key=value ...`: the exit status (1 after one `error:` line)."""
    return cli.main_of("predict", Options, __doc__.splitlines()[0], _predict, argv)


def _predict(opts: Options, _: list[str]) -> None:
    cli.one_model("predict", opts.run_id, opts.run_name, opts.model, directory=True)
    if not opts.input:
        raise TrainerError("say what to predict: input=<file.csv | file.parquet | file.npy | image folder>")
    if opts.batch_size < 1:
        raise TrainerError(f"batch_size={opts.batch_size} is invalid: expected a whole number of rows, 1 or more")
    _kind(Path(opts.input))  # a missing or unknown input is named before TensorFlow starts
    output_path(opts, Path(opts.input))
    startup.quiet_libraries(opts.verbose)
    startup.import_tensorflow(opts.verbose)
    predictor = load(opts)
    out, rows, seconds = predict_file(opts, predictor)
    print(f"predicted {rows:,} rows with {predictor.source}: {out} ({rows / max(seconds, 1e-9):,.0f} rows/s)",
          file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
