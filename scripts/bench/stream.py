"""The third program (`--stream`): ours on a file larger than it should hold, streamed from disk, against Keras
`fit` on the very same `tf.data` pipeline; steps/s and the peak memory of each, at two file sizes, in two formats
(`--stream-formats`): .npy files, and the same rows as one Parquet file (data=parquet: 33 float32 columns
f0..f31, y, in row groups of WRITE_ROWS), read with normalization and target scaling off so both sides train
the same numbers.

The file: the 32-feature regression of `trainer.data.regression` (y = x @ w + b + noise, x ~ N(0, 1)) in float32,
as x.npy and y.npy, written a block at a time through a fresh memory map per block, so the writer never holds it.
  ours       `python -m trainer data=numpy data.in_memory=false ...` (the mlp job's model, batch and optimizer),
             every step logged to a SQLite store; its rate is the run's own perf/steps_per_sec (past its
             first compiled call), checked against the store: one train/loss point per step
  keras-fit  a child of this module composes the same config, loads the same data option with
             `trainer.data.prepare.load` and takes each epoch's batches from `trainer.inputs.StreamInput.dataset`,
             the function ours' iterator comes from: same files, split, shuffle, batch, prefetch. The same MLP
             compiled with Keras' own Adam and the loss, `fit(epochs=E, steps_per_epoch=N/E)`, one child per
             steps_per_execution; its rate is from the end of epoch 0 (compile, first batches) to the last.
Every run is its own process; a poller reads its /proc status every POLL_S: the peak RSS is its VmHWM, the kernel's
high-water mark, and the largest RssAnon and RssFile tell the heap from pages of the memory-mapped file (page
cache, reclaimable). Not wait4's ru_maxrss: a child's counts the parent's RSS when it forked (exec keeps the
old high-water mark), so every child of this TensorFlow-holding process read 782 MB, whatever it did.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCRIPTS = Path(__file__).resolve().parents[1]
if str(SCRIPTS) not in sys.path:  # `python -m bench.stream` from anywhere: the package's parent
    sys.path.insert(0, str(SCRIPTS))

from bench.harness import OURS_OVERRIDES, BenchError, Job, compose, log, new_store  # noqa: E402

STREAM_GB = (1.0, 3.0)  # the two file sizes, x.npy + y.npy in GiB: 3 GiB is issue 13's "at least 3 GB"
# N for both, a multiple of KERAS_EPOCHS * every spe: with the input read in blocks both run 3,000-4,000 steps/s
# here, so ~6 s of training each, Keras timing its last 15,000; at the 800 of the per-row pipeline (~1,500 steps/s
# then) a run was over in 0.2-0.5 s and single repeats of the ratio spread 0.8-1.1x
STREAM_STEPS = 20_000
QUICK_STREAM_STEPS = 400
STREAM_SPES = (1, 10, 100)  # Keras steps_per_execution values tried; the best one is reported
QUICK_STREAM_SPES = (1, 50)
KERAS_EPOCHS = 4  # Keras' N steps as this many epochs; the first is its warm-up, off the clock
FEATURES, TARGETS, NOISE, SEED = 32, 1, 0.1, 0  # conf/data/regression.yaml's noise, the mlp job's 32 features
WRITE_ROWS = 1 << 18  # rows per block written: 34 MB of x
POLL_S = 0.05
STREAM = "model=mlp data.in_memory=false trainer.batch_size=256 optimizer=adam optimizer.lr=1e-3"
FORMATS = ("numpy", "parquet")
CHILD_TIMEOUT_S = 1800


@dataclass(frozen=True)
class DataFiles:
    x: Path  # parquet: the one file
    y: Path | None
    rows: int
    gb: float
    write_s: float
    format: str = "numpy"


@dataclass
class Usage:
    """One child's memory (MiB): its VmHWM, and the largest RssAnon / RssFile the poller saw."""

    peak_rss_mb: float = 0.0
    peak_anon_mb: float = 0.0
    peak_file_mb: float = 0.0


@dataclass
class StreamResult:
    """One file size: per repeat, ours' rate and memory, and each Keras spe's."""

    gb: float
    rows: int
    steps: int
    write_s: float
    format: str = "numpy"
    ours: list[dict[str, Any]] = field(default_factory=list)  # rate, steps, usage, wall_s
    keras: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # spe -> runs: rate, steps, usage

    def median(self, who: str | int) -> float:
        runs = self.ours if who == "ours" else self.keras[who]
        rates = [r["rate"] for r in runs if math.isfinite(r["rate"])]
        return statistics.median(rates) if rates else math.nan

    @property
    def best_spe(self) -> int:
        return max(self.keras, key=lambda spe: -math.inf if math.isnan(self.median(spe)) else self.median(spe))

    @property
    def ratio(self) -> float:
        return self.median("ours") / self.median(self.best_spe)

    def peak(self, who: str | int, key: str = "peak_rss_mb") -> float:
        runs = self.ours if who == "ours" else self.keras[who]
        return max(r["usage"][key] for r in runs)


# --- the file ------------------------------------------------------------------------------------
def write_regression(directory: Path, gb: float, seed: int = SEED) -> DataFiles:
    """x.npy [rows, 32] and y.npy [rows, 1], float32, `gb` GiB together; one block in memory at a time."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = int(gb * 2**30) // ((FEATURES + TARGETS) * 4)
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((FEATURES, TARGETS)) / np.sqrt(FEATURES)).astype(np.float32)
    b = (rng.standard_normal(TARGETS) * 0.5).astype(np.float32)
    t0 = time.perf_counter()
    paths = directory / "x.npy", directory / "y.npy"
    offsets = [_create(path, (rows, width)) for path, width in zip(paths, (FEATURES, TARGETS), strict=True)]
    for start in range(0, rows, WRITE_ROWS):
        n = min(WRITE_ROWS, rows - start)
        x = rng.standard_normal((n, FEATURES), dtype=np.float32)
        y = x @ w + b + NOISE * rng.standard_normal((n, TARGETS), dtype=np.float32)
        for path, offset, block in zip(paths, offsets, (x, y), strict=True):
            _write_block(path, offset, start, block)
    return DataFiles(*paths, rows, gb, time.perf_counter() - t0)


def write_parquet(files: DataFiles) -> DataFiles:
    """The .npy files' rows as one Parquet file beside them (x.parquet), a row group per WRITE_ROWS rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    x, y = np.load(files.x, mmap_mode="r"), np.load(files.y, mmap_mode="r")
    path = files.x.with_suffix(".parquet")
    schema = pa.schema([*(pa.field(f"f{i}", pa.float32()) for i in range(FEATURES)), pa.field("y", pa.float32())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, files.rows, WRITE_ROWS):
            block = slice(start, min(start + WRITE_ROWS, files.rows))
            columns = [*np.asarray(x[block]).T, np.asarray(y[block])[:, 0]]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    return DataFiles(path, None, files.rows, files.gb, time.perf_counter() - t0, "parquet")


def _create(path: Path, shape: tuple[int, int]) -> int:
    """An .npy file of `shape`, float32, its data still zeros (sparse); returns its data's offset."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    offset = array.offset
    del array  # unmapped: nothing of it is held
    return offset


def _write_block(path: Path, offset: int, start: int, block: np.ndarray) -> None:
    """Rows start.. of the file through a map of just those rows, flushed and unmapped."""
    row_bytes = block.shape[1] * 4
    view = np.memmap(path, np.float32, "r+", offset=offset + start * row_bytes, shape=block.shape)
    view[:] = block
    view.flush()
    del view


# --- children ------------------------------------------------------------------------------------
def job_for(files: DataFiles, steps: int) -> Job:
    if files.format == "parquet":
        data = f"data=parquet data.path={files.x} data.target=y data.normalize=none data.target_scale=none"
    else:
        data = f"data=numpy data.path={files.x} data.y={files.y}"
    return Job("stream", f"{STREAM} {data}", steps, 0, "the mlp job's MLP, streamed")


def run_child(command: list[str], cwd: Path) -> tuple[str, Usage, float]:
    """Runs `command` to its end: its stdout, its memory (polled), its wall seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    usage = Usage()
    with (cwd / "stdout").open("w") as out, (cwd / "stderr").open("w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=err, env=env)
        poller = threading.Thread(target=_poll, args=(proc.pid, usage), daemon=True)
        poller.start()
        try:
            proc.wait(CHILD_TIMEOUT_S)
        except BaseException:
            proc.kill()
            raise
        wall = time.perf_counter() - t0
    poller.join()
    if proc.returncode != 0:
        raise BenchError(f"{command[:4]} failed ({proc.returncode}):\n{(cwd / 'stderr').read_text()[-3000:]}")
    return (cwd / "stdout").read_text(), usage, wall


def _poll(pid: int, usage: Usage) -> None:
    """VmHWM, RssAnon and RssFile of `pid` every POLL_S until it is gone (a zombie has no such lines)."""
    status = Path(f"/proc/{pid}/status")
    while True:
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
        except (FileNotFoundError, ProcessLookupError):
            return
        if "RssAnon" not in fields:
            return
        usage.peak_rss_mb = max(usage.peak_rss_mb, _mib(fields["VmHWM"]))
        usage.peak_anon_mb = max(usage.peak_anon_mb, _mib(fields["RssAnon"]))
        usage.peak_file_mb = max(usage.peak_file_mb, _mib(fields["RssFile"]))
        time.sleep(POLL_S)


def _mib(field: str) -> float:
    return int(field.split()[0]) / 1024  # "123456 kB"


def run_ours(files: DataFiles, steps: int, workdir: Path) -> dict[str, Any]:
    """The CLI on a fresh store; the rate it measured itself, after checking every step was logged."""
    from bench.competitors import check_store

    store = new_store(workdir)
    overrides = [*job_for(files, steps).overrides.split(), *OURS_OVERRIDES, f"trainer.max_steps={steps}"]
    overrides += [f"tracking.uri={store.uri}", f"hydra.run.dir={store.dir / 'hydra'}"]
    _, usage, wall = run_child([sys.executable, "-m", "trainer", *overrides], store.dir)
    logged = check_store(store, steps, time.time())
    return {"rate": logged["steps_per_sec"], "steps": steps, "usage": usage.__dict__, "wall_s": wall,
            "first_loss": logged["first_loss"]}  # fmt: skip


def run_keras(files: DataFiles, steps: int, spe: int, workdir: Path) -> dict[str, Any]:
    where = Path(tempfile.mkdtemp(dir=workdir))
    spec = {"x": str(files.x), "y": str(files.y), "format": files.format, "steps": steps, "spe": spe}
    stdout, usage, wall = run_child([sys.executable, "-m", "bench.stream", json.dumps(spec)], where)
    out = json.loads(stdout.strip().splitlines()[-1])
    return {**out, "usage": usage.__dict__, "wall_s": wall}


# --- the Keras child -----------------------------------------------------------------------------
def keras_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Keras fit on ours' pipeline: epoch e's batches from StreamInput.dataset(e, batch), joined end to end."""
    import keras
    from omegaconf import OmegaConf

    import trainer.config
    from bench.harness import quiet_libraries
    from trainer.data.prepare import load
    from trainer.inputs import StreamInput
    from trainer.optim import build_optimizer
    from trainer.train import _from_data

    quiet_libraries()
    trainer.config.register()
    files = DataFiles(Path(spec["x"]), Path(spec["y"]), 0, 0.0, 0.0, spec["format"])
    steps, spe = int(spec["steps"]), int(spec["spe"])
    cfg = compose(job_for(files, steps), steps, "sqlite:///unused.db")
    t, d = cfg.trainer, cfg.data
    keras.utils.set_random_seed(t.seed)
    data = load(d)
    if not data.streamed or data.preprocess:
        raise BenchError(f"expected a stream without preprocessing, got streamed={data.streamed} {data.preprocess}")
    inputs = StreamInput(data.train, t.batch_size, t.seed, d.shuffle, d.shuffle_buffer, d.cache, data.preprocess)
    epochs = -(-steps // inputs.steps_per_epoch)  # ours' epochs over these N steps: their pipelines, in turn
    ds = inputs.dataset(0, t.batch_size)
    for epoch in range(1, epochs):
        ds = ds.concatenate(inputs.dataset(epoch, t.batch_size))
    model = trainer.config.build(cfg.model, **_from_data(cfg.model, data))  # as train() builds it (units)
    stock = {**OmegaConf.to_container(cfg.optimizer), "_target_": "keras.optimizers.Adam"}  # as the race's keras-fit
    stock.pop("fused", None)
    optimizer = build_optimizer(OmegaConf.create(stock), cfg.schedule, steps)
    model.compile(optimizer=optimizer, loss=trainer.config.build(cfg.loss), steps_per_execution=spe)
    ends: list[float] = []  # the wall time at each epoch's end, once its loss is on the host (the device caught up)
    clock = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: ends.append(_synced(logs)))
    model.fit(ds, epochs=KERAS_EPOCHS, steps_per_epoch=steps // KERAS_EPOCHS, verbose=0, callbacks=[clock])
    timed = steps - steps // KERAS_EPOCHS
    return {"rate": timed / (ends[-1] - ends[0]), "steps": int(optimizer.iterations.numpy()), "spe": spe}


# --- the measurement -----------------------------------------------------------------------------
def measure_stream(sizes: tuple[float, ...], steps: int, spes: tuple[int, ...], repeats: int, workdir: Path,
                   data_root: Path, keep: bool = False,
                   formats: tuple[str, ...] = FORMATS) -> list[StreamResult]:  # fmt: skip
    """Per size: write the files (under data_root/<size>gib, removed after unless `keep`), then per format each
    repeat runs ours and each spe's Keras child, in turn, one at a time."""
    results = []
    for gb in sizes:
        where = data_root / f"{gb:g}gib"
        log(f"stream: writing {gb:g} GiB into {where}")
        numpy_files = write_regression(where, gb)
        log(f"  {numpy_files.rows:,} rows in {numpy_files.write_s:.1f} s")
        try:
            for fmt in formats:
                files = write_parquet(numpy_files) if fmt == "parquet" else numpy_files
                results.append(_race_on(files, steps, spes, repeats, workdir))
        finally:
            if not keep:
                shutil.rmtree(where, ignore_errors=True)
    return results


def _race_on(files: DataFiles, steps: int, spes: tuple[int, ...], repeats: int, workdir: Path) -> StreamResult:
    result = StreamResult(files.gb, files.rows, steps, files.write_s, files.format, keras={spe: [] for spe in spes})
    for r in range(repeats):
        result.ours.append(run_ours(files, steps, workdir))
        log(f"  {files.format} repeat {r + 1}: ours {_said(result.ours[-1])}")
        for spe in spes:
            result.keras[spe].append(run_keras(files, steps, spe, workdir))
            log(f"  {files.format} repeat {r + 1}: keras-fit spe={spe} {_said(result.keras[spe][-1])}")
    return result


def _said(run: dict[str, Any]) -> str:
    return f"{run['rate']:,.1f} steps/s, {run['steps']} steps, {run['wall_s']:.0f} s in all, {_mb(run)}"


def _mb(run: dict[str, Any]) -> str:
    u = run["usage"]
    return f"peak RSS {u['peak_rss_mb']:,.0f} MB (anon {u['peak_anon_mb']:,.0f}, file {u['peak_file_mb']:,.0f})"


def _synced(logs: dict | None) -> float:
    float((logs or {}).get("loss", 0.0))
    return time.perf_counter()


if __name__ == "__main__":
    print(json.dumps(keras_child(json.loads(sys.argv[1]))), flush=True)
    # fit's iterator over a Python reader is still alive: at the interpreter's exit its destructor can wait on a
    # tf.data thread that waits for the interpreter (inputs.StreamInput.release); this child has said all it had
    os._exit(0)
