"""Typed table columns: numeric, categorical, text or ignored, fitted on the training split, kept with the model.

A table whose features are not all numbers (or that names types in `data.columns`, or fills missing cells with
`data.missing=mean`) is read whole and turned into numbers here, by a `TableSchema` fitted on the training rows
only (the split's own seeded permutation, core.val_mask):
- numeric: the value; a missing cell takes the training mean, and a `<name>=missing` indicator column is added
  when the training split has any missing cell in that column (the data's `normalize` then scales these);
- categorical (strings, booleans, or a column declared so): up to MAX_ONE_HOT values in the training split, one
  column per value, one for a value it never saw, one for a missing cell; above that, one column of ids (the
  MAX_EMBEDDED most frequent values, then <other> and <missing>) that the model embeds (models.CategoryEmbeddings);
- text (a string column of long values: MIN_TEXT_TOKENS tokens on average): TF-IDF over the training split's
  MAX_TOKENS most frequent tokens (appearing in >= 2 rows), scikit-learn's smooth idf and L2 rows, so it compares
  with `TfidfVectorizer` + a linear model;
- ignore: left out.
The schema is plain data (`to_dict`, logged as `table_schema.json`): the logged model's pyfunc applies the same
transform to raw rows (strings, missing cells, pandas' dtypes), and `trainer evaluate` reads a file through the
run's schema, never a new one fitted on that file.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from trainer.config import TrainerError

KINDS = ("numeric", "categorical", "text", "ignore")
MAX_ONE_HOT = 64  # a categorical column with more values in the training split is embedded, not one-hot
MAX_EMBEDDED = 10_000  # an embedded column's values kept (most frequent first); the rest share <other>
MAX_TOKENS = 5000  # a text column's vocabulary (most frequent tokens of the training split)
MIN_TEXT_TOKENS = 5  # a string column averaging this many tokens a cell is text, not categories
ID_SHARE = 0.5  # a short-string column with more distinct values than this share of rows: an ID, not categories
NUMERIC_SHARE = 0.5  # of a string column's distinct values parse as numbers: a numeric column with text cells
MAX_DISTINCT = 1_000_000  # values (categorical) or words (text) a column may have in the training rows: the counters
# a stream's one pass keeps are bounded by it (a counter of a million short strings is ~100 MB)
TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern, lower-cased first


@dataclass
class Column:
    """One feature column's type and what the training split taught it."""

    name: str
    kind: str
    mean: float = 0.0  # numeric: the fill for a missing cell
    indicator: bool = False  # numeric: a <name>=missing column follows
    values: list[str] = field(default_factory=list)  # categorical: one column each; text: the tokens
    idf: list[float] = field(default_factory=list)  # text
    embed: bool = False  # categorical: one column of ids (values, then <other>, <missing>), embedded by the model

    def outputs(self) -> list[str]:
        if self.kind == "numeric":
            return [self.name, *([f"{self.name}=missing"] if self.indicator else [])]
        if self.kind == "categorical" and self.embed:
            return [f"{self.name}=id"]
        if self.kind == "categorical":
            return [*(f"{self.name}={v}" for v in self.values), f"{self.name}=<other>", f"{self.name}=<missing>"]
        if self.kind == "text":
            return [f"{self.name}:{t}" for t in self.values]
        return []


@dataclass
class TableSchema:
    columns: list[Column]

    @property
    def features(self) -> list[str]:
        """The names of the numbers the model takes, in order."""
        return [name for c in self.columns for name in c.outputs()]

    @property
    def scaled(self) -> np.ndarray:
        """Per output: True for a numeric value (data.normalize scales it), False for indicators and encodings."""
        return np.array([c.kind == "numeric" and i == 0 for c in self.columns for i in range(len(c.outputs()))])

    @property
    def embedded(self) -> list[tuple[int, int]]:
        """(position among the outputs, ids it takes) of each embedded categorical column."""
        out, at = [], 0
        for c in self.columns:
            if c.embed:
                out.append((at, len(c.values) + 2))
            at += len(c.outputs())
        return out

    @property
    def inputs(self) -> list[str]:
        """The raw columns a row must have."""
        return [c.name for c in self.columns if c.kind != "ignore"]

    def counts(self) -> dict[str, int]:
        return {kind: sum(c.kind == kind for c in self.columns) for kind in KINDS}

    def to_dict(self) -> dict[str, Any]:
        return {"columns": [vars(c) for c in self.columns]}

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> TableSchema:
        try:
            columns = [Column(**dict(c)) for c in spec["columns"]]
        except (KeyError, TypeError) as e:
            raise TrainerError(f"a table schema that does not read as one: {e}") from None
        if bad := [c.kind for c in columns if c.kind not in KINDS]:
            raise TrainerError(f"a table schema with an unknown column type {bad[0]!r}")
        return cls(columns)

    def transform(self, frame: pd.DataFrame, source: str = "input") -> np.ndarray:
        """Raw rows (strings, missing cells, any numeric dtype) -> float32 [rows, len(features)]."""
        if absent := [name for name in self.inputs if name not in frame.columns]:
            raise TrainerError(f"{source}: no column {absent[0]!r}; the model takes {self.inputs}")
        parts = [_encode(c, frame[c.name], source) for c in self.columns if c.kind != "ignore"]
        return np.concatenate(parts, axis=1).astype(np.float32) if parts else np.zeros((len(frame), 0), np.float32)


def fit_schema(frame: pd.DataFrame, train: np.ndarray, declared: Mapping[str, str] | None, missing: str,
               source: str) -> TableSchema:  # fmt: skip
    """The schema of `frame`'s feature columns: each typed by `declared` or inferred from every row (so errors
    name the file's rows), fitted on the training rows (`train`, a boolean mask) only."""
    fit = SchemaFit(declared, missing, source)
    fit.infer(frame)
    fit.add(frame[train])
    return fit.schema()


class SchemaFit:
    """A schema fitted a chunk of training rows at a time: a held table in one chunk (fit_schema), a stream's
    batches in one pass, keeping only sums, counts and counters (categories, words' document frequencies), so
    both give the same schema for the same rows. Types are inferred from the rows `infer` sees: a held table's
    all, a stream's first batch (as pyarrow types a CSV's columns from its first block)."""

    def __init__(self, declared: Mapping[str, str] | None, missing: str, source: str) -> None:
        self.declared, self.missing, self.source = dict(declared or {}), missing, source
        if bad := {n: k for n, k in self.declared.items() if k not in KINDS}:
            name, kind = next(iter(bad.items()))
            raise TrainerError(f"data.columns.{name}={kind!r} is no column type: use {' | '.join(KINDS)}")
        self.kinds: dict[str, str] = {}
        self.numbers: dict[str, list[float]] = {}  # numeric: [sum, count of values, count of missing cells]
        self.counts: dict[str, Counter] = {}  # categorical: values; text: rows each word is in
        self.docs: dict[str, int] = {}  # text: rows seen

    def infer(self, frame: pd.DataFrame) -> None:
        if unknown := [name for name in self.declared if name not in frame.columns]:
            raise TrainerError(f"data.columns names {unknown[0]!r}, which is no feature column of {self.source}; its "
                               f"columns are {list(frame.columns)}")  # fmt: skip
        for name in frame.columns:
            kind = self.kinds[name] = self.declared.get(name) or infer_kind(frame[name], name, self.source)
            if kind == "numeric":
                self.numbers[name] = [0.0, 0, 0]
            elif kind in ("categorical", "text"):
                self.counts[name], self.docs[name] = Counter(), 0

    def add(self, frame: pd.DataFrame) -> None:
        """Training rows (their index: the file's row numbers, for errors)."""
        for name, kind in self.kinds.items():
            values = frame[name]
            if kind == "numeric":
                numbers = _numbers(values, name, self.source)
                finite = np.isfinite(numbers)
                if self.missing == "error" and not finite.all():
                    row = _row(values, int(np.flatnonzero(~finite)[0]))
                    raise TrainerError(f"{self.source}: column {name!r} is missing a value (row {row}); "
                                       "data.missing=error refuses it: fill it, or data.missing=mean")  # fmt: skip
                stats = self.numbers[name]
                stats[0] += float(numbers[finite].sum())
                stats[1] += int(finite.sum())
                stats[2] += int((~finite).sum())
                continue
            if kind == "ignore":
                continue
            if self.missing == "error" and values.isna().any():
                row = _row(values, int(np.flatnonzero(values.isna().to_numpy())[0]))
                raise TrainerError(f"{self.source}: column {name!r} is missing a value (row {row}); data.missing=error "
                                   "refuses it: fill it, or data.missing=auto (a category of its own)")  # fmt: skip
            if kind == "categorical":
                self.counts[name].update(_labels(values).dropna())
            else:
                self.counts[name].update(t for v in values for t in set(_tokens(v)))
                self.docs[name] += len(values)
            if len(self.counts[name]) > MAX_DISTINCT:
                what = "values" if kind == "categorical" else "distinct words"
                raise TrainerError(f"{self.source}: {kind} column {name!r} has more than {MAX_DISTINCT:,} {what} "
                                   "in the training rows, too many to count in memory; leave it out with "
                                   f"data.columns={{{name}: ignore}}, or shorten it into a column of fewer "
                                   "values")  # fmt: skip

    def schema(self) -> TableSchema:
        columns = [self._column(name, kind) for name, kind in self.kinds.items()]
        if not any(c.kind != "ignore" for c in columns):
            raise TrainerError(f"{self.source}: every feature column is ignored; keep at least one")
        return TableSchema(columns)

    def _column(self, name: str, kind: str) -> Column:
        if kind == "numeric":
            total, count, gaps = self.numbers[name]
            if not count:
                raise TrainerError(f"{self.source}: column {name!r} has no value in the training split to take a mean "
                                   f"of; leave it out with data.columns={{{name}: ignore}}")  # fmt: skip
            return Column(name, kind, mean=total / count, indicator=bool(gaps))
        if kind == "categorical":
            counts = self.counts[name]
            embed = len(counts) > MAX_ONE_HOT
            kept = sorted(counts, key=lambda v: (-counts[v], v))[: MAX_EMBEDDED if embed else MAX_ONE_HOT]
            return Column(name, kind, values=sorted(kept), embed=embed)
        if kind == "text":
            df, n = self.counts[name], self.docs[name]
            often = sorted(((t, k) for t, k in df.items() if k >= 2), key=lambda p: (-p[1], p[0]))[:MAX_TOKENS]
            vocab = sorted(t for t, _ in often)
            if not vocab:
                raise TrainerError(f"{self.source}: text column {name!r} has no word in two rows of the training "
                                   f"split; declare it data.columns={{{name}: categorical}} or ignore it")  # fmt: skip
            return Column(name, kind, values=vocab, idf=[math.log((1 + n) / (1 + df[t])) + 1 for t in vocab])
        return Column(name, "ignore")


def infer_kind(values: pd.Series, name: str, source: str) -> str:
    """numeric for numbers, categorical for booleans, pandas categories and short strings, text for long strings.
    A column that is all missing, or an ID (a distinct short string per row), is one line naming the fix."""
    present = values.dropna()
    if present.empty:
        raise TrainerError(f"{source}: column {name!r} is empty (every cell missing): leave "
                           f"it out with data.columns={{{name}: ignore}} or data.features=[...]")  # fmt: skip
    if pd.api.types.is_bool_dtype(present) or isinstance(values.dtype, pd.CategoricalDtype):
        return "categorical"
    if pd.api.types.is_numeric_dtype(present):
        return "numeric"
    text = present.astype(str)
    distinct = text.unique()
    numbers = sum(_is_number(v) for v in distinct[:1000])
    if numbers and numbers >= NUMERIC_SHARE * min(len(distinct), 1000):
        first = next(i for i, v in enumerate(values) if isinstance(v, str) and not _is_number(v))
        raise TrainerError(f"{source}: column {name!r} is not numeric: row {_row(values, first)} holds "
                           f"{values.iloc[first]!r}; fix the cell, or declare the column's type: "
                           f"data.columns={{{name}: categorical}} (or ignore)")  # fmt: skip
    if text.map(lambda v: len(TOKEN.findall(v.lower()))).mean() >= MIN_TEXT_TOKENS:
        return "text"
    if len(distinct) > ID_SHARE * len(present) and len(present) > 20:
        raise TrainerError(f"{source}: column {name!r} has a distinct value in nearly every row ({len(distinct)} of "
                           f"{len(present)}): an ID, not categories; leave it out with data.columns={{{name}: "
                           "ignore}")  # fmt: skip
    return "categorical"


def _encode(c: Column, values: pd.Series, source: str) -> np.ndarray:
    n = len(values)
    if c.kind == "numeric":
        numbers = _numbers(values, c.name, source)
        if np.isinf(numbers).any():
            at = int(np.flatnonzero(np.isinf(numbers))[0])
            raise TrainerError(f"{source}: column {c.name!r}, row {_row(values, at)} is {numbers[at]}: the model takes "
                               "finite numbers (a missing cell is filled)")  # fmt: skip
        gaps = np.isnan(numbers)
        filled = np.where(gaps, c.mean, numbers)[:, None]
        return np.concatenate([filled, gaps[:, None].astype(np.float64)], axis=1) if c.indicator else filled
    if c.kind == "categorical":
        labels = _labels(values)
        index = {v: i for i, v in enumerate(c.values)}
        slots = np.array([len(c.values) + 1 if pd.isna(v) else index.get(v, len(c.values)) for v in labels])
        if c.embed:
            return slots[:, None].astype(np.float64)
        out = np.zeros((n, len(c.values) + 2))
        out[np.arange(n), slots] = 1.0
        return out
    index = {t: i for i, t in enumerate(c.values)}
    idf = np.asarray(c.idf)
    out = np.zeros((n, len(c.values)))
    for row, value in enumerate(values):
        for token, count in Counter(_tokens(value)).items():
            if token in index:
                out[row, index[token]] = count
    out *= idf
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1.0)


def _numbers(values: pd.Series, name: str, source: str) -> np.ndarray:
    """A numeric column as float64, missing cells NaN; a text cell is one line naming its row."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.to_numpy(dtype=np.float64, na_value=np.nan)
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isnan(numbers) & values.notna().to_numpy()
    if bad.any():
        at = int(np.flatnonzero(bad)[0])
        row = _row(values, at)
        raise TrainerError(f"{source}: column {name!r} takes numbers, but row {row} holds {values.iloc[at]!r}")
    return numbers


def _row(values: pd.Series, at: int) -> int:
    """The 1-based row of position `at`: the file's row where the index keeps it (rows dropped before)."""
    label = values.index[at]
    return int(label) + 1 if isinstance(label, int | np.integer) else at + 1


def _labels(values: pd.Series) -> pd.Series:
    """Categories as text (True and 'True' alike), missing cells kept missing."""
    return values.map(lambda v: v if pd.isna(v) else str(v))


def _tokens(value: Any) -> list[str]:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return [] if missing else TOKEN.findall(str(value).lower())


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def columns_setting(columns: Any) -> dict[str, str] | None:
    """data.columns as a plain {name: kind}; None when unset."""
    if columns is None:
        return None
    if not isinstance(columns, Mapping):
        raise TrainerError(f"data.columns={columns!r}: expected a mapping {{column: {' | '.join(KINDS)}}}")
    return {str(k): str(v) for k, v in columns.items()}
