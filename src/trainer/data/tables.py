"""Tables: CSV and Parquet files of numeric feature columns and one or more target columns, read with pyarrow.

Both readers hand over the same `Examples`: x float32 [n, features], y float32 [n, targets], or int64 class ids
[n] when one target column holds text labels (class names sorted, as `labels`), or one-hot float32 [n, classes]
with `one_hot`. `arrays()` reads the whole table (pyarrow's multi-threaded reader); `read()` streams it in
record batches (pyarrow.csv.open_csv, a Parquet file's row groups), so a file larger than memory trains too.

Before anything trains, one streamed pass over a CSV file counts its rows (a CSV says nowhere how many it has)
and, on the way, checks every cell, finds the class names and the column means `missing=mean` fills in. A
Parquet file's count is in its metadata: it is read ahead only for class names (the target column alone) or
for `missing=drop|mean` (the feature columns too); with `missing=error`, a bad cell there is named when
`arrays()` reads it, or when the stream reaches it.
"""

from __future__ import annotations

import csv as _csv
import glob
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import tensorflow as tf

from trainer.config import MISSING_CELLS, TrainerError
from trainer.data.columns import SchemaFit, TableSchema, columns_setting, fit_schema
from trainer.data.core import Examples, check_values, place, regular_files, val_mask

PARQUET_BATCH_ROWS = 65_536  # rows per streamed Parquet batch (a row group may hold millions)
# pyarrow's default pre_buffer=True coalesces the reads of every row group a reader will visit and holds them:
# streaming an 8M-row, 1.15 GB file (33 float32 columns, 8 row groups) through iter_batches alone grew to 1,393 MB
# RSS; unbuffered page reads through a 1 MB buffer peak at 237 MB (tests/test_stream_memory.py)
PARQUET_READ_BUFFER = 1 << 20
INDEX_NAMES = ("", "Unnamed: 0")  # a leading column with no name: the index pandas' to_csv() writes


def csv(path: str, target: Any, features: Sequence[str] | None, missing: str, one_hot: bool,
        columns: Any, schema: str | None, sample_weight: str | None, val_fraction: float, seed: int, in_memory: str,
        memory_limit_mb: float, folds: int | None, fold: int) -> Examples:  # fmt: skip
    """A CSV file with a header row; `target` one column name or a list; `features` null: every other column.

    An unnamed leading column (pandas' index) is never a feature. Errors name the file, the row, its line and
    the column. Features that are not all numbers, `columns` (types by name), `schema` (a run's fitted one) or
    `missing=mean` read the table whole and type its columns (data/columns.py); the split's settings say which
    rows are the training split the types are fitted on.
    """
    file = _csv_file(path)
    source = f"data.path={path!r}"
    header = _csv_header(file, source)  # as pyarrow names the columns: cells unstripped
    names = [h.strip() for h in header]
    usable = names[1:] if names[0] in INDEX_NAMES else names
    if "" in usable:
        raise TrainerError(f"{path}: column {names.index('', 1) + 1} has no name in the header; name it")
    feats, targets = _choose(usable, target, features, str(path), sample_weight)
    raw = dict(zip(names, header, strict=True))
    typed = _Typed(source, feats, targets, missing, one_hot, columns, schema, (val_fraction, seed, folds, fold),
                   sample_weight)  # fmt: skip
    kinds = _csv_kinds(file, [raw[c] for c in feats])
    gaps = lambda: _csv_gaps(file, [raw[c] for c in feats], [raw[c] for c in targets])  # noqa: E731
    how = typed.wanted(kinds, file.stat().st_size, in_memory, memory_limit_mb, gaps)
    if how == "streamed":
        return typed.streamed(lambda columns: _csv_frames(file, columns, raw, names))
    if how == "held":
        try:
            frame = pa_csv.read_csv(file, convert_options=pa_csv.ConvertOptions(
                include_columns=[raw[c] for c in typed.read], strings_can_be_null=True))  # fmt: skip
        except pa.ArrowInvalid as e:
            raise _csv_error(e, file, names) from None
        return typed.examples(frame.rename_columns(typed.read).to_pandas())

    def options(columns: Sequence[str]) -> pa_csv.ConvertOptions:
        """Features as float64, targets as text (tried as numbers later): a bad cell is named by column."""
        types = {raw[c]: pa.string() if c in targets else pa.float64() for c in columns}
        return pa_csv.ConvertOptions(
            include_columns=[raw[c] for c in columns], column_types=types, strings_can_be_null=True
        )

    def batches(columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        try:
            yield from pa_csv.open_csv(file, convert_options=options(columns))
        except pa.ArrowInvalid as e:
            raise _csv_error(e, file, names) from None

    def arrays() -> tuple[np.ndarray, np.ndarray]:
        """The whole file at once (pyarrow's threaded reader), converted as one batch."""
        try:
            data = pa_csv.read_csv(file, convert_options=options([*feats, *targets]))
        except pa.ArrowInvalid as e:
            raise _csv_error(e, file, names) from None
        return table.convert(data.combine_chunks(), 0)

    table = _Table(source, feats, targets, _numbers_only(missing), one_hot, batches, _CsvLines(file))
    table.scan(count=None)
    return table.examples(arrays)


def parquet(path: str, target: Any, features: Sequence[str] | None, missing: str, one_hot: bool,
            columns: Any, schema: str | None, sample_weight: str | None, val_fraction: float, seed: int, in_memory: str,
            memory_limit_mb: float, folds: int | None, fold: int) -> Examples:  # fmt: skip
    """One Parquet file, a directory of them (every *.parquet below it) or a glob; files in sorted path order.

    The row count comes from the files' metadata. Columns that are not numbers are typed as for CSV (csv).
    """
    source = f"data.path={path!r}"
    files = _parquet_files(path, source)
    file_schema = _parquet_schema(files, source)
    feats, targets = _choose(list(file_schema.names), target, features, str(path), sample_weight)
    typed = _Typed(source, feats, targets, missing, one_hot, columns, schema, (val_fraction, seed, folds, fold),
                   sample_weight)  # fmt: skip
    kinds = [file_schema.field(name).type for name in feats]
    size = sum(Path(f).stat().st_size for f in files)
    gaps = lambda: any(_gaps(pq.read_table(f, columns=[*feats, *targets])) for f in files)  # noqa: E731
    how = typed.wanted(kinds, size, in_memory, memory_limit_mb, gaps)
    if how == "streamed":
        return typed.streamed(lambda columns: _parquet_frames(files, columns))
    if how == "held":
        parts = [pq.read_table(f, columns=typed.read).to_pandas() for f in files]
        return typed.examples(pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0])
    text = any(_text(file_schema.field(t).type) for t in targets)

    def batches(columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        return _parquet_batches(files, columns)

    def arrays() -> tuple[np.ndarray, np.ndarray]:
        """File by file: files may store a column as different numeric types (int64 in one, double in the next),
        which pa.concat_tables refuses."""
        xs, ys, rows = [], [], 0
        for f in files:
            part = pq.read_table(f, columns=[*feats, *targets]).combine_chunks()
            x, y = table.convert(part, rows)
            xs, ys, rows = [*xs, x], [*ys, y], rows + part.num_rows
        return np.concatenate(xs), np.concatenate(ys)

    counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
    shards = _ShardRows(files, counts) if len(files) > 1 else None
    table = _Table(source, feats, targets, _numbers_only(missing), one_hot, batches, shards, text=text)
    table.scan(count=sum(counts))
    return table.examples(arrays)


# --- what both formats share ---------------------------------------------------------------------------------
MANY_CLASSES = 100  # above this many class names, a target is checked for being numbers or unique per row
NUMERIC_SHARE = 0.9  # of the distinct values parse as numbers: a numeric column with text cells in it
IMPLAUSIBLE_SHARE = 0.5  # more classes than this share of the rows: not classes


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


@dataclass
class _Table:
    """A table's chosen columns, what one pass over them learned, and the conversion of a batch to (x, y)."""

    source: str
    features: list[str]
    targets: list[str]
    missing: str
    one_hot: bool
    batches: Callable[[Sequence[str]], Iterator[pa.RecordBatch]]  # these columns, in order, streamed
    lines: _CsvLines | _ShardRows | None  # where rows are in the files, for errors (CSV lines, Parquet shards)
    text: bool | None = None  # targets hold class names; None: found out by the scan (CSV)
    count: int = 0
    labels: list[str] | None = None
    means: np.ndarray | None = None
    n_classes: int = 0  # one_hot: the number of classes

    def scan(self, count: int | None) -> None:
        """One pass over what must be known before training: count (CSV), class names, means, each cell.

        A CSV's target is read as text and tried as numbers batch by batch; if a later batch holds text,
        the scan starts again (it rarely does: text labels show in the first batch).
        """
        if self.missing not in MISSING_CELLS:
            raise TrainerError(f"data.missing={self.missing!r} is invalid: expected {' | '.join(MISSING_CELLS)}")
        needed = count is None or self.text or self.one_hot or self.missing != "error"
        if needed:
            try:
                self._scan(count)
            except _TextTarget:
                self.text = True
                self._scan(count)
        self.text = bool(self.text)
        if count is not None and self.missing != "drop":
            self.count = count
        if self.text:
            self._check_class_names()
        if self.text and len(self.targets) > 1:
            raise TrainerError(f"{self.source}: class names need one target column, not {self.targets}")
        if self.count == 0:
            dropped = " once the rows with missing cells are dropped" if self.missing == "drop" else ""
            raise TrainerError(f"{self.source}: no rows to train on{dropped}")

    def _check_class_names(self) -> None:
        """Class names read from a target column must look like classes: a numeric column with a few text cells
        (one at row 900,000 made a 610,368-class task, and its advice to change the loss wrote 958 MB of
        checkpoints) is the first such cell named; a class count near the row count is refused as implausible."""
        labels, rows = self.labels or [], max(self.count, 1)
        numbers = sum(1 for label in labels if _is_number(label))
        if len(labels) > MANY_CLASSES and numbers >= NUMERIC_SHARE * len(labels):
            row, value = self._first_text_target()
            raise TrainerError(
                f"{self.source}: target column {self.targets[0]!r} holds numbers but row {row} holds {value!r}: fix "
                "or remove that cell (read as text, the column would be a task of "
                f"{len(labels):,} classes)"
            )
        if len(labels) > MANY_CLASSES and len(labels) > IMPLAUSIBLE_SHARE * rows:
            raise TrainerError(
                f"{self.source}: target column {self.targets[0]!r} has {len(labels):,} distinct values in {rows:,} "
                f"rows: implausible as classes (more than {IMPLAUSIBLE_SHARE:.0%} of the rows would be a class of "
                "their own); pick the target column you meant"
            )

    def _first_text_target(self) -> tuple[int, str]:
        rows = 0
        for batch in self.batches(self.targets):
            values = self._target(batch).to_pylist()
            for i, value in enumerate(values):
                if value is not None and not _is_number(value):
                    return rows + i + 1, value
            rows += len(values)
        return -1, ""

    def _scan(self, count: int | None) -> None:
        columns = [*(self.features if count is None or self.missing != "error" else []), *self.targets]
        n_features = len(columns) - len(self.targets)
        kept, rows, found = 0, 0, set()
        sums, finite_counts, largest = np.zeros(n_features), np.zeros(n_features), -1.0
        for batch in self.batches(columns):
            x, y, bad = self._values(batch, rows, n_features)
            if self.text:
                found.update(v for v in pc.unique(self._target(batch)).to_pylist() if v is not None)
            elif self.one_hot and (~bad).any():
                largest = max(largest, self._class_ids(y[~bad], rows))
            finite = np.isfinite(x)
            sums += np.where(finite, x, 0.0).sum(axis=0)
            finite_counts += finite.sum(axis=0)
            kept += int((finite.all(axis=1) & ~bad).sum())
            rows += len(x)
        self.count = kept if self.missing == "drop" else rows
        self.labels = sorted(found) if self.text else None
        self.n_classes = (len(self.labels) if self.text else int(largest) + 1) if self.one_hot else 0
        if self.missing == "mean" and n_features:
            empty = np.flatnonzero(finite_counts == 0)
            if rows and len(empty):
                raise TrainerError(f"{self.source}: column {self.features[empty[0]]!r} has no value to take a mean of")
            self.means = sums / np.maximum(finite_counts, 1)

    def _target(self, batch: pa.RecordBatch | pa.Table) -> pa.Array:
        """The one target column as text (a Parquet column may be dictionary-encoded)."""
        return pc.cast(batch.column(len(batch.schema) - 1), pa.string())

    def _values(self, batch: pa.RecordBatch, first_row: int, n_features: int) -> tuple[np.ndarray, Any, np.ndarray]:
        """Features as float64 (missing cells NaN), targets (floats, or class names), rows whose target is missing.

        Raises naming the row and column for a missing cell (missing=error) or a value float32 cannot train on.
        """
        x = _matrix([batch.column(i) for i in range(n_features)], batch.num_rows)
        if self.text:
            y = self._target(batch)
            y_missing = np.asarray(y.is_null())
            y_values = np.where(y_missing, np.nan, 0.0)[:, None]
        else:
            try:
                y = y_values = _matrix([batch.column(n_features + j) for j in range(len(self.targets))], batch.num_rows)
            except pa.ArrowInvalid:
                raise _TextTarget() from None
            y_missing = ~np.isfinite(y).all(axis=1)
        lines = self.lines.at(first_row) if self.lines else None
        for values, columns in ((x, self.features[:n_features]), (y_values, self.targets)):  # no joined copy
            if self.missing != "error":
                values = np.where(np.isfinite(values), values, 0.0)
            check_values(values, self.source, columns, lines, first_row)
        if self.missing == "mean" and y_missing.any():
            row = int(np.flatnonzero(y_missing)[0])
            where = f"row {first_row + row + 1}{place(lines, row)}"
            raise TrainerError(
                f"{self.source}: {where}, target column {self.targets[0]!r} is missing; data.missing=mean fills "
                "features only: set data.missing=drop, or fill the cell"
            )
        return x, y, y_missing

    def _class_ids(self, y: np.ndarray, first_row: int) -> float:
        if len(self.targets) != 1 or not np.all(y == np.round(y)) or y.min() < 0:
            raise TrainerError(
                f"{self.source}: data.one_hot=true needs one target column of class ids 0..k-1 or class names"
            )
        return float(y.max())

    def convert(self, batch: pa.RecordBatch | pa.Table, first_row: int) -> tuple[np.ndarray, np.ndarray]:
        """A batch as (x, y) for the model: missing cells dropped or filled, class names as ids."""
        n_features = len(self.features)
        x, y, y_missing = self._values(batch, first_row, n_features)
        finite = np.isfinite(x)
        if self.missing == "mean":
            x = np.where(finite, x, self.means)
        keep = finite.all(axis=1) & ~y_missing if self.missing == "drop" else slice(None)
        if self.text:
            y = pc.index_in(y, value_set=pa.array(self.labels, pa.string())).to_numpy(zero_copy_only=False)
            y = np.nan_to_num(y, nan=-1).astype(np.int64)
        if self.one_hot:
            y = np.eye(self.n_classes, dtype=np.float32)[np.asarray(y, dtype=np.int64).reshape(-1)]
        elif not self.text:
            y = y.astype(np.float32)
        return np.ascontiguousarray(x[keep], dtype=np.float32), y[keep]

    def stream(self) -> Iterator[pa.RecordBatch]:
        return self.batches([*self.features, *self.targets])

    def converted(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rows = 0
        for batch in self.stream():
            yield self.convert(batch, rows)
            rows += batch.num_rows

    def examples(self, arrays: Callable[[], tuple[np.ndarray, np.ndarray]]) -> Examples:
        y_shape = (self.n_classes,) if self.one_hot else () if self.text else (len(self.targets),)
        y_dtype = "int64" if self.text and not self.one_hot else "float32"
        signature = (
            tf.TensorSpec((None, len(self.features)), tf.float32),
            tf.TensorSpec((None, *y_shape), y_dtype),
        )

        def blocks() -> tf.data.Dataset:
            return tf.data.Dataset.from_generator(self.converted, output_signature=signature)

        targets = [f"{self.targets[0]}={k}" for k in self.labels or range(self.n_classes)] if self.one_hot else None
        return Examples(
            count=self.count,
            x_shape=(len(self.features),),
            y_shape=y_shape,
            x_dtype="float32",
            y_dtype=y_dtype,
            arrays=arrays,
            blocks=blocks,
            source=self.source,
            columns=[*self.features, *(targets or self.targets)],
            labels=self.labels,
            task="multiclass" if self.one_hot else None,
            numeric=True,
            table=True,
        )


class _Typed:
    """A table read whole, its feature columns typed (data/columns.py): when, and the Examples it makes."""

    def __init__(self, source: str, features: list[str], targets: list[str], missing: str, one_hot: bool,
                 columns: Any, schema: str | None, holdout: tuple, weight: str | None) -> None:  # fmt: skip
        """`holdout`: val_mask's (val_fraction, seed, folds, fold): which rows the types are fitted on;
        `weight`: data.sample_weight's column."""
        self.source, self.features, self.targets, self.weight = source, features, targets, weight
        self.read = [*features, *targets, *([weight] if weight else [])]  # the columns read, in this order
        self.missing, self.one_hot, self.holdout = missing, one_hot, holdout
        if missing not in MISSING_CELLS:
            raise TrainerError(f"data.missing={missing!r} is invalid: expected {' | '.join(MISSING_CELLS)}")
        self.declared = columns_setting(columns)
        self.fitted = _read_schema(schema) if schema else None

    def wanted(self, kinds: Sequence[pa.DataType], size: int, in_memory: str, memory_limit_mb: float,
               gaps: Callable[[], bool]) -> str | None:  # fmt: skip
        """ "held" (read whole, then typed) when a feature is not a number, types are declared or given, missing
        cells are filled (the fill is the training split's, inside the model) or rows are weighted, and the table
        is held in memory; "streamed" (typed batch by batch, `streamed`) when such a table is streamed; None: an
        all-number table, read as before. `gaps()`: whether a cell is missing (asked only for data.missing=auto
        on a held table)."""
        held = str(in_memory).lower()
        held = held == "true" or (held == "auto" and size <= memory_limit_mb * 2**20)
        words = [k for k in kinds if not _numeric(k) or pa.types.is_boolean(k)]
        filled = self.missing == "mean" or (self.missing == "auto" and held and not words and gaps())
        if not (words or self.declared or self.fitted or filled or self.weight):
            return None
        if held:
            return "held"
        if self.weight:
            raise TrainerError(f"{self.source}: data.sample_weight needs the table held in memory, and this one is "
                               f"{size / 2**20:.0f} MB (data.in_memory={in_memory}, data.memory_limit_mb="
                               f"{memory_limit_mb:g}): raise data.memory_limit_mb or set "
                               "data.in_memory=true")  # fmt: skip
        return "streamed" if words or self.declared or self.fitted else None  # mean: the whole file's, as before

    def examples(self, frame: pd.DataFrame) -> Examples:
        y, labels, keep = self._targets(frame[self.targets])
        if not keep.all() and self.missing == "error":
            row = int(np.flatnonzero(~keep)[0]) + 1
            raise TrainerError(f"{self.source}: row {row} has no target value; data.missing=error refuses it: fill "
                               "it, or data.missing=auto (rows without a target are left out, counted)")  # fmt: skip
        if not keep.all():
            from trainer.cli import notice_console

            notice_console().print(f"data: {int((~keep).sum())} rows without a target value left out "
                                   f"({self.source})", markup=False)  # fmt: skip
        x_raw = frame.loc[keep, self.features]
        weights = _weights(frame.loc[keep, self.weight], self.source) if self.weight else None
        if self.missing == "drop":  # rows with a missing feature cell go, before anything is fitted
            whole = x_raw.notna().all(axis=1).to_numpy()
            x_raw, y = x_raw[whole], y[whole]
            weights = weights[whole] if weights is not None else None
        train = ~val_mask(len(x_raw), *self.holdout)
        schema = self.fitted or fit_schema(x_raw, train, self.declared, self.missing, self.source)
        x = schema.transform(x_raw, self.source)
        return Examples(
            count=len(x), x_shape=(x.shape[1],), y_shape=tuple(y.shape[1:]), x_dtype="float32",
            y_dtype=str(y.dtype), arrays=(x, y), source=self.source, columns=[*schema.features, *self.targets],
            labels=labels, task="multiclass" if self.one_hot else None, numeric=True, table=True,
            scaled=schema.scaled, schema=schema, raw_example=x_raw.head(2).reset_index(drop=True), weights=weights,
        )  # fmt: skip

    def _targets(self, frame: pd.DataFrame, labels: list[str] | None = None,
                 n_classes: int | None = None) -> tuple[np.ndarray, list[str] | None, np.ndarray]:  # fmt: skip
        """(y, class names or None, rows that have a target): numbers as float32; a text column's values as class
        ids (names sorted); one-hot rows with `one_hot`. A stream's batch gets the whole file's `labels` (text
        targets) or `n_classes` (one-hot ids)."""
        keep = frame.notna().all(axis=1).to_numpy()
        present = frame[keep]
        if labels is None and all(pd.api.types.is_numeric_dtype(present[c]) for c in self.targets):
            y = present.to_numpy(dtype=np.float32)
            if self.one_hot:
                ids = y.reshape(-1).astype(np.int64)
                return np.eye(n_classes or int(ids.max()) + 1, dtype=np.float32)[ids], None, keep
            return y, None, keep
        if len(self.targets) > 1:
            raise TrainerError(f"{self.source}: class names need one target column, not {self.targets}")
        names = present[self.targets[0]].astype(str)
        if labels is None:
            labels = sorted(names.unique())
            self._check_classes(labels, names)
        ids = names.map({v: i for i, v in enumerate(labels)}).to_numpy(dtype=np.int64)
        return (np.eye(len(labels), dtype=np.float32)[ids] if self.one_hot else ids), labels, keep

    def streamed(self, chunks: Callable[[Sequence[str]], Iterator[pd.DataFrame]]) -> Examples:
        """A typed table too large to hold, batch by batch (`chunks(columns)`: the file's batches of those
        columns, indexed by file row). Two passes before training: the rows that have a target (their count and
        class names), then the schema, fitted on the training rows in one pass (columns.SchemaFit: sums, counts
        and counters only); training then types each batch as it streams."""
        drop = self.missing == "drop"
        kept, dropped, labels, largest, text = 0, 0, set(), -1, False
        for frame in chunks([*self.targets, *(self.features if drop else [])]):
            keep = self._rows(frame)
            without = int((~frame[self.targets].notna().all(axis=1)).sum())
            if without and self.missing == "error":
                raise TrainerError(f"{self.source}: a row has no target value; data.missing=error refuses it: fill "
                                   "it, or data.missing=auto (rows without a target are left out, "
                                   "counted)")  # fmt: skip
            present = frame.loc[keep, self.targets]
            if text or not all(pd.api.types.is_numeric_dtype(present[c]) for c in self.targets):
                text = True
                labels.update(present[self.targets[0]].astype(str).unique())
            elif self.one_hot and len(present):
                largest = max(largest, int(present.to_numpy().max()))
            kept, dropped = kept + int(keep.sum()), dropped + without
        if dropped:
            from trainer.cli import notice_console

            notice_console().print(f"data: {dropped} rows without a target value left out ({self.source})",
                                   markup=False)  # fmt: skip
        names = sorted(labels) if text else None
        if names and len(names) > MANY_CLASSES and len(names) > IMPLAUSIBLE_SHARE * max(kept, 1):
            raise TrainerError(f"{self.source}: target column {self.targets[0]!r} has {len(names):,} distinct values "
                               f"in {kept:,} rows: implausible as classes; pick the target column you "
                               "meant")  # fmt: skip
        n_classes = (len(names) if names else largest + 1) if self.one_hot else None
        schema, example = self._fit_streamed(chunks, kept)

        def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for frame in chunks(self.read):
                keep = self._rows(frame)
                y, _, _ = self._targets(frame.loc[keep, self.targets], names, n_classes)
                yield schema.transform(frame.loc[keep, self.features], self.source), y

        y_shape = (n_classes,) if self.one_hot else () if text else (len(self.targets),)
        y_dtype = "int64" if text and not self.one_hot else "float32"
        signature = (tf.TensorSpec((None, len(schema.features)), tf.float32), tf.TensorSpec((None, *y_shape), y_dtype))
        return Examples(
            count=kept, x_shape=(len(schema.features),), y_shape=y_shape, x_dtype="float32", y_dtype=y_dtype,
            blocks=lambda: tf.data.Dataset.from_generator(batches, output_signature=signature),
            source=self.source, columns=[*schema.features, *self.targets], labels=names,
            task="multiclass" if self.one_hot else None, numeric=True, table=True, scaled=schema.scaled,
            schema=schema, raw_example=example,
        )  # fmt: skip

    def _fit_streamed(self, chunks: Callable[[Sequence[str]], Iterator[pd.DataFrame]],
                      kept: int) -> tuple[TableSchema, pd.DataFrame]:  # fmt: skip
        """The schema (fitted on the training rows of `kept`, one pass; or the given one) and two raw rows."""
        train = ~val_mask(kept, *self.holdout)
        fit, example, at = SchemaFit(self.declared, self.missing, self.source), None, 0
        for frame in chunks([*self.features, *self.targets]):
            x_raw = frame.loc[self._rows(frame), self.features]
            if example is None:
                example = x_raw.head(2).reset_index(drop=True)
                if self.fitted:
                    return self.fitted, example
                fit.infer(x_raw)  # types from the first batch, as pyarrow types a CSV's columns
            fit.add(x_raw[train[at : at + len(x_raw)]])
            at += len(x_raw)
        if example is None:
            raise TrainerError(f"{self.source}: no rows to train on")
        return fit.schema(), example

    def _rows(self, frame: pd.DataFrame) -> np.ndarray:
        """A batch's rows that are examples: a target in every target column (and data.missing=drop: no missing
        feature cell)."""
        keep = frame[self.targets].notna().all(axis=1).to_numpy()
        if self.missing == "drop":
            keep &= frame[self.features].notna().all(axis=1).to_numpy()
        return keep

    def _check_classes(self, labels: list[str], names: pd.Series) -> None:
        """Class names that look like classes (as _Table._check_class_names): not numbers with a stray word, not
        one per row."""
        numbers = sum(1 for label in labels if _is_number(label))
        if len(labels) > MANY_CLASSES and numbers >= NUMERIC_SHARE * len(labels):
            at = next(i for i, v in enumerate(names) if not _is_number(v))
            raise TrainerError(f"{self.source}: target column {self.targets[0]!r} holds numbers but row "
                               f"{names.index[at] + 1} holds {names.iloc[at]!r}: fix or remove that cell")  # fmt: skip
        if len(labels) > MANY_CLASSES and len(labels) > IMPLAUSIBLE_SHARE * len(names):
            raise TrainerError(
                f"{self.source}: target column {self.targets[0]!r} has {len(labels):,} distinct values "
                f"in {len(names):,} rows: implausible as classes; pick the target column you meant"
            )


def _weights(values: pd.Series, source: str) -> np.ndarray:
    """data.sample_weight's column as float32: every row's weight a finite number >= 0."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(numbers) | (numbers < 0)
    if bad.any():
        at = int(np.flatnonzero(bad)[0])
        value = values.iloc[at]
        what = "is empty" if pd.isna(value) else f"holds {value!r}" if isinstance(value, str) else f"holds {value:g}"
        raise TrainerError(f"{source}: data.sample_weight column {values.name!r}, row {int(values.index[at]) + 1} "
                           f"{what}; a weight must be a finite number >= 0: fix the cell")  # fmt: skip
    return numbers.astype(np.float32)


def _numbers_only(missing: str) -> str:
    """data.missing for an all-number table read as before: auto refuses missing cells."""
    return "error" if missing == "auto" else missing


def _read_schema(path: str) -> TableSchema:
    """A run's `table_schema.json` (data only: JSON, never code)."""
    import json

    try:
        return TableSchema.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as e:
        raise TrainerError(f"data.schema={path!r}: cannot be read as a table schema ({e})") from None


def _csv_gaps(file: Path, features: Sequence[str], targets: Sequence[str]) -> bool:
    """Whether a feature or target cell of the CSV is empty or NaN; a feature that does not read as numbers is
    left to the numeric reader, whose error names the cell."""
    try:
        table = pa_csv.read_csv(file, convert_options=pa_csv.ConvertOptions(
            include_columns=[*features, *targets], column_types=dict.fromkeys(features, pa.float64()),
            strings_can_be_null=True))  # fmt: skip
    except pa.ArrowInvalid:
        return False
    return _gaps(table)


def _gaps(table: pa.Table) -> bool:
    """Whether a column of `table` holds a null, or a floating one a NaN."""
    return any(
        col.null_count or (pa.types.is_floating(col.type) and pc.any(pc.is_nan(col)).as_py()) for col in table.columns
    )


def _csv_frames(file: Path, columns: Sequence[str], raw: dict[str, str], names: list[str]) -> Iterator[pd.DataFrame]:
    """A CSV's `columns` as pandas frames, a block at a time, indexed by row; each column's type is the one
    pyarrow infers from the first block (numbers as float64, booleans, the rest text), held to for every block."""
    wanted = [raw[c] for c in columns]
    kinds = dict(zip(wanted, _csv_kinds(file, wanted), strict=False))
    types = {c: pa.float64() if _numeric(k) and not pa.types.is_boolean(k) else k if pa.types.is_boolean(k)
             else pa.string() for c, k in kinds.items()}  # fmt: skip
    options = pa_csv.ConvertOptions(include_columns=wanted, column_types=types, strings_can_be_null=True)
    rows = 0
    try:
        for batch in pa_csv.open_csv(file, convert_options=options):
            frame = batch.to_pandas()
            frame.columns, frame.index = list(columns), pd.RangeIndex(rows, rows + len(frame))
            rows += len(frame)
            yield frame
    except pa.ArrowInvalid as e:
        raise _csv_error(e, file, names) from None


def _parquet_batches(files: Sequence[str], columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """The files' `columns`, PARQUET_BATCH_ROWS rows at a time, read unbuffered (PARQUET_READ_BUFFER)."""
    for f in files:
        reader = pq.ParquetFile(f, pre_buffer=False, buffer_size=PARQUET_READ_BUFFER)
        yield from reader.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(columns))


def _parquet_frames(files: Sequence[str], columns: Sequence[str]) -> Iterator[pd.DataFrame]:
    """The files' `columns` as pandas frames, batch by batch (_parquet_batches), indexed by row."""
    rows = 0
    for batch in _parquet_batches(files, columns):
        frame = batch.to_pandas()
        frame.index = pd.RangeIndex(rows, rows + len(frame))
        rows += len(frame)
        yield frame


def _csv_kinds(file: Path, columns: Sequence[str]) -> list[pa.DataType]:
    """The feature columns' types as pyarrow infers them from the file's first block."""
    try:
        first = next(iter(pa_csv.open_csv(file, convert_options=pa_csv.ConvertOptions(
            include_columns=list(columns), strings_can_be_null=True))), None)  # fmt: skip
    except (pa.ArrowInvalid, StopIteration):
        return []
    if first is None:
        return []
    return [t if not pa.types.is_null(t) else pa.float64() for t in first.schema.types]


class _TextTarget(Exception):
    """A CSV target cell is not a number: the target holds class names."""


def _matrix(columns: Sequence[pa.Array], rows: int) -> np.ndarray:
    """Columns as one float64 [rows, columns] array (column-major: each column written whole); null cells NaN.
    Raises ArrowInvalid for text."""
    out = np.empty((rows, len(columns)), order="F")
    for i, column in enumerate(columns):
        if not pa.types.is_floating(column.type):  # floats convert as they are, nulls as NaN
            column = pc.cast(column, pa.float64())
        out[:, i] = column.to_numpy(zero_copy_only=False)
    return out


def _choose(names: Sequence[str], target: Any, features: Sequence[str] | None, where: str,
            weight: str | None = None) -> tuple[list, list]:  # fmt: skip
    """(features, targets): `target` a name or a list of names; `features` null: every column not a target nor
    the `weight` column (data.sample_weight)."""
    targets = [target] if isinstance(target, str) else list(target) if target is not None else []
    if not targets or not all(isinstance(t, str) for t in targets):
        raise TrainerError(f"data.target={target!r} is invalid: expected a column name or a list of them")
    if weight is not None and not isinstance(weight, str):
        raise TrainerError(f"data.sample_weight={weight!r} is invalid: expected a column name, or null")
    unknown = [c for c in [*targets, *(features or []), *([weight] if weight else [])] if c not in names]
    if unknown:
        raise TrainerError(f"{where}: no column {unknown[0]!r}; columns are {', '.join(names)}")
    feats = list(features) if features else [c for c in names if c not in targets and c != weight]
    both = [c for c in feats if c in targets]
    if both:
        raise TrainerError(f"{where}: column {both[0]!r} is both a feature and a target; drop it from data.features")
    if weight and (weight in feats or weight in targets):
        raise TrainerError(f"{where}: column {weight!r} is data.sample_weight and a feature or target; drop it from "
                           "data.features or data.target")  # fmt: skip
    if not feats:
        raise TrainerError(f"{where}: no feature columns left once the target {targets} is taken out")
    return feats, targets


def _numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def _text(kind: pa.DataType) -> bool:
    kind = kind.value_type if pa.types.is_dictionary(kind) else kind
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


# --- CSV -----------------------------------------------------------------------------------------------------
def _csv_file(path: str) -> Path:
    file = Path(path)
    if file.is_dir():
        found = ", ".join(sorted(p.name for p in file.glob("*.csv"))[:5]) or "none"
        raise TrainerError(f"data.path={path!r} is a directory; expected a CSV file (CSV files in it: {found})")
    regular_files([path], f"data.path={path!r}")
    if not file.is_file():
        raise TrainerError(f"data.path={path!r}: no such file (working directory: {Path.cwd()})")
    return file


def _csv_header(file: Path, source: str) -> list[str]:
    """The header's cells as pyarrow reads them (it infers types from the first block: no conversion error)."""
    try:
        return pa_csv.open_csv(file).schema.names
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):
            raise TrainerError(f"{source}: the file is empty; expected a header row and data rows") from None
        raise _csv_error(e, file, None) from None


def _csv_error(error: pa.ArrowInvalid, file: Path, names: Sequence[str] | None) -> TrainerError:
    """pyarrow's parse errors as the one line the user needs: the line at fault, or the column and its cell."""
    text = str(error)
    if "Expected" in text and "columns" in text:
        return _ragged(file) or TrainerError(f"{file}: {text.splitlines()[0]}")
    if "conversion error" in text and names:
        column = int(text.split("#", 1)[1].split(":", 1)[0])
        cell = text.rsplit("invalid value ", 1)[-1]
        at = _first_row_holding(file, column, cell.strip().strip("'\""))
        where = f": row {at[0]} (line {at[1]}) holds {cell}" if at else f" (found {cell})"
        return TrainerError(
            f"{file}: column {names[column]!r} is not numeric{where}; a feature must be numeric: fix the cell, encode "
            "the column as numbers or leave it out with data.features=[...]"
        )
    return TrainerError(f"{file}: not a CSV file pyarrow can read: {text.splitlines()[0]}")


def _first_row_holding(file: Path, column: int, cell: str) -> tuple[int, int] | None:
    """(data row, file line) of the first row whose `column` holds `cell`: pyarrow names the value, not where."""
    with file.open(newline="") as f:
        reader = _csv.reader(f)
        next(reader, None)  # the header
        row = 0
        for fields in reader:
            if not fields:
                continue
            row += 1
            if column < len(fields) and fields[column].strip() == cell:
                return row, reader.line_num
    return None


def _ragged(file: Path) -> TrainerError | None:
    """The first line whose field count differs from the header's (blank lines skipped, as pyarrow does)."""
    with file.open(newline="") as f:
        reader = _csv.reader(f)
        width = None
        for row in reader:
            if row and width is None:
                width = len(row)
            elif row and len(row) != width:
                return TrainerError(f"{file}: line {reader.line_num} has {len(row)} fields, the header has {width}")
    return None


class _CsvLines:
    """The file line of each data row, found only when an error names one (a pass with Python's csv reader)."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def at(self, first_row: int) -> _RowLines:
        return _RowLines(self, first_row)

    def line(self, row: int) -> int:
        with self.file.open(newline="") as f:
            reader = _csv.reader(f)
            rows = (reader.line_num for r in reader if r)
            next(rows, None)  # the header
            for i, line in enumerate(rows):
                if i == row:
                    return line
        return -1


class _ShardRows:
    """Rows of a glob of Parquet shards: `.at(first_row)[i]` names the shard of row first_row + i and its own row
    there (an error said `row 54153` of eight files; which one holds it was anyone's guess)."""

    def __init__(self, files: Sequence[str], counts: Sequence[int]) -> None:
        self.files, self.starts = list(files), np.cumsum([0, *counts])

    def at(self, first_row: int) -> _RowsFrom:
        return _RowsFrom(self, first_row)

    def describe(self, row: int) -> str:
        i = int(np.searchsorted(self.starts, row, side="right")) - 1
        return f"{self.files[i]}, its row {row - int(self.starts[i]) + 1}"


@dataclass
class _RowsFrom:
    shards: _ShardRows
    first_row: int

    def __getitem__(self, i: int) -> str:
        return self.shards.describe(self.first_row + i)

    def __bool__(self) -> bool:
        return True


@dataclass
class _RowLines:
    """lines[i]: the file line of row first_row + i, all core.check_values asks of its `lines`."""

    lines: _CsvLines
    first_row: int

    def __getitem__(self, i: int) -> int:
        return self.lines.line(self.first_row + i)

    def __bool__(self) -> bool:
        return True


# --- Parquet -------------------------------------------------------------------------------------------------
def _parquet_files(path: str, source: str) -> list[str]:
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(path, recursive=True))
        if not files:
            raise TrainerError(f"{source}: no file matches the pattern (working directory: {Path.cwd()})")
        return regular_files(files, source)
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*.parquet"))
        if not files:
            raise TrainerError(f"{source} is a directory without .parquet files; name a file, a folder or a glob")
        return regular_files(files, source)
    regular_files([path], source)
    if not p.is_file():
        raise TrainerError(f"{source}: no such file (working directory: {Path.cwd()})")
    return [path]


def _parquet_schema(files: Sequence[str], source: str) -> pa.Schema:
    """The first file's schema; every other file must hold the same columns."""
    schema = None
    for f in files:
        try:
            this = pq.ParquetFile(f).schema_arrow
        except (pa.ArrowInvalid, OSError) as e:
            raise TrainerError(f"{source}: {f} is not a Parquet file ({str(e).splitlines()[0]})") from None
        if schema is None:
            schema = this
        elif this.names != schema.names:
            raise TrainerError(
                f"{source}: {f} has columns {', '.join(this.names)}, unlike {files[0]} ({', '.join(schema.names)})"
            )
        for name in this.names:  # numeric types may differ (int64, double); numbers and text may not
            kind, first = this.field(name).type, schema.field(name).type
            if _numeric(kind) != _numeric(first) or _text(kind) != _text(first):
                raise TrainerError(
                    f"{source}: column {name!r} holds {kind} values in {f} but {first} in {files[0]}; "
                    "write it with one type in every file"
                )
    return schema
