"""Reading interaction logs and item tables (CSV, CSV.gz, Parquet, JSON lines).

    events = read_interactions("interactions.csv.gz")     # user_id,item_id,timestamp[,...]
    items = read_table("items.csv.gz", required=("item_id",), id_columns=("item_id",))

Ids are read as strings (a stock code like ``85123A`` and a numeric customer id are both
just keys). Timestamps may be integer/float unix seconds or ISO-8601 strings; they are
returned as int64 unix seconds. Every problem is a ``DataError`` whose one-line message
names the file, the row and the column, e.g.
``interactions.csv line 42, column 'timestamp': cannot parse '2011-13-45' as a timestamp``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recserve.features.csr import find_sorted

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")


class DataError(ValueError):
    """Bad input data; the message is one line naming file, row and column."""


def location(path: Path, row: int | None, column: str | None) -> str:
    text = str(path)
    if row is not None:
        # CSV users think in line numbers (header = line 1); Parquet/JSONL rows are 0-based.
        text += f" line {row + 2}" if _format(path) == "csv" else f" row {row}"
    if column is not None:
        text += f", column {column!r}"
    return text


def _format(path: Path) -> str:
    name = path.name.lower()
    for suffix, fmt in ((".csv", "csv"), (".csv.gz", "csv"), (".parquet", "parquet"), (".pq", "parquet"),
                        (".jsonl", "jsonl"), (".jsonl.gz", "jsonl"), (".ndjson", "jsonl")):
        if name.endswith(suffix):
            return fmt
    raise DataError(f"{path}: unknown file type (expected .csv, .csv.gz, .parquet or .jsonl)")


def read_arrow(path: str | Path, string_columns: Sequence[str] = ()) -> pa.Table:
    """Any supported file -> an Arrow table, ``string_columns`` read as strings."""
    path = Path(path)
    fmt = _format(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    try:
        if fmt == "csv":
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(
                path, convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in string_columns},
                                                          strings_can_be_null=True)
            )
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.json as pjson

            table = pjson.read_json(path)
    except (pa.ArrowInvalid, OSError) as e:  # OSError: e.g. a truncated gzip stream
        raise DataError(f"{path}: cannot read {fmt}: {str(e).splitlines()[0]}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows")
    return table


def require_columns(path: Path, table: pa.Table, required: Sequence[str]) -> None:
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataError(
            f"{location(path, None, missing[0])}: missing (columns present: {', '.join(table.column_names)})"
        )


def optional_string_column(table: pa.Table, name: str) -> np.ndarray:
    """A column as Python str values, None where missing (an empty bag downstream)."""
    col = pc.cast(table[name], pa.string())
    return np.array(col.to_pylist(), dtype=object)


def float_column(path: Path, table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64, NaN where missing; text that is not a number is an error."""
    col = table[name]
    try:
        return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        for row, v in enumerate(col.to_pylist()):
            try:
                float(v) if v is not None else None
            except (TypeError, ValueError):
                raise DataError(f"{location(path, row, name)}: {v!r} is not a number") from None
        raise DataError(f"{location(path, None, name)}: not a numeric column ({col.type})") from None


def string_column(path: Path, table: pa.Table, name: str) -> np.ndarray:
    """A non-null id column as a NumPy array of Python str."""
    col = table[name]
    if col.null_count:
        row = int(pc.index(pc.is_null(col), True).as_py())
        raise DataError(f"{location(path, row, name)}: missing value")
    col = pc.cast(col, pa.string())
    empty = pc.equal(pc.utf8_length(col), 0)
    if pc.any(empty).as_py():
        row = int(pc.index(empty, True).as_py())
        raise DataError(f"{location(path, row, name)}: missing value")
    return col.to_numpy(zero_copy_only=False).astype(object)


def timestamp_column(path: Path, table: pa.Table, name: str = "timestamp") -> np.ndarray:
    """Unix seconds (int64) from integer, float, timestamp or ISO-8601 string values."""
    col = table[name]
    if col.null_count:
        row = int(pc.index(pc.is_null(col), True).as_py())
        raise DataError(f"{location(path, row, name)}: missing timestamp")
    t = col.type
    if pa.types.is_integer(t):
        return pc.cast(col, pa.int64()).to_numpy()
    if pa.types.is_floating(t):
        values = col.to_numpy()
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"{location(path, row, name)}: cannot parse {values[row]!r} as a timestamp")
        return np.floor(values).astype(np.int64)
    if pa.types.is_timestamp(t):
        # Floor to seconds: casting to timestamp("s") would refuse sub-second values.
        per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[t.unit]
        return pc.cast(col, pa.int64()).to_numpy() // per_second
    if pa.types.is_date(t):
        return pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64()).to_numpy()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            return pc.cast(col, pa.int64()).to_numpy()
        except pa.ArrowInvalid:
            pass
        values = col.to_numpy(zero_copy_only=False)
        try:
            parsed = np.array(values, dtype="datetime64[s]")
            return parsed.astype(np.int64)
        except ValueError:
            pass
        for row, v in enumerate(values):  # error path only: find the first bad value
            try:
                int(v)
            except ValueError:
                try:
                    np.datetime64(v, "s")
                except ValueError:
                    raise DataError(f"{location(path, row, name)}: cannot parse {v!r} as a timestamp") from None
        # Values parse one by one but not as one column (mixed int and ISO forms).
        raise DataError(f"{location(path, None, name)}: mixes unix seconds and date strings")
    raise DataError(f"{location(path, None, name)}: type {t} is not a timestamp")


@dataclass(frozen=True)
class Interactions:
    """Events in file order. ``columns`` holds the optional extra columns as NumPy arrays."""

    path: Path
    user_id: np.ndarray  # object (str) [n]
    item_id: np.ndarray  # object (str) [n]
    timestamp: np.ndarray  # int64 [n]
    columns: dict

    def __len__(self) -> int:
        return len(self.user_id)


def read_interactions(path: str | Path, string_columns: Sequence[str] = ()) -> Interactions:
    """``string_columns``: extra columns to read as text (None where missing), e.g. context
    fields, so "007" stays "007" and a missing value stays missing."""
    path = Path(path)
    table = read_arrow(path, string_columns=("user_id", "item_id", *string_columns))
    require_columns(path, table, (*INTERACTION_COLUMNS, *string_columns))
    extra = {}
    for name in table.column_names:
        if name in string_columns:
            extra[name] = optional_string_column(table, name)
        elif name not in INTERACTION_COLUMNS:
            extra[name] = table[name].to_numpy(zero_copy_only=False)
    return Interactions(
        path=path,
        user_id=string_column(path, table, "user_id"),
        item_id=string_column(path, table, "item_id"),
        timestamp=timestamp_column(path, table),
        columns=extra,
    )


def read_table(path: str | Path, required: Sequence[str], id_columns: Sequence[str] = (),
               text_columns: Sequence[str] = (), number_columns: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """A metadata table (e.g. items) -> {column: NumPy array}: id columns as non-null str,
    text columns as str or None, number columns as float64 with NaN (those present)."""
    path = Path(path)
    table = read_arrow(path, string_columns=(*id_columns, *text_columns))
    require_columns(path, table, required)
    typed = {*id_columns, *text_columns, *number_columns}
    out = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names if name not in typed}
    for name in id_columns:
        out[name] = string_column(path, table, name)
    for name in (c for c in text_columns if c in table.column_names):
        out[name] = optional_string_column(table, name)
    for name in (c for c in number_columns if c in table.column_names):
        out[name] = float_column(path, table, name)
    return out


def lookup_ids(path: Path, column: str, values: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
    """Positions of ``values`` in the sorted ``vocabulary``; an unknown id is a DataError."""
    pos, known = find_sorted(vocabulary, values)
    if not known.all():
        row = int(np.flatnonzero(~known)[0])
        raise DataError(f"{location(path, row, column)}: unknown id {str(values[row])!r} (not in the model's catalogue)")
    return pos


def data_attribution(path: str | Path) -> str | None:
    """The source/license/attribution paragraphs of the README.md next to a data file.

    Real datasets carry terms (e.g. CC BY 4.0) that every derived file must keep; the
    trainer copies this text into its run directory and every exported version.
    """
    readme = Path(path).parent / "README.md"
    if not readme.is_file():
        return None
    keep, paragraphs = ("source:", "license:", "attribution:"), readme.read_text().split("\n\n")
    picked = [p.strip() for p in paragraphs if p.strip().lower().startswith(keep)]
    return "\n\n".join(picked) or None
