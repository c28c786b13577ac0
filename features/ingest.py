"""Bulk ingest into the feature store: item tables and the users view derived from a log.

    store = FeatureStore.open("features.lmdb", create=True, max_history=50)
    ingest_interactions(store, "interactions.csv.gz")     # users: history, event_count, last_seen
    ingest_items(store, "items.parquet")                  # items: every column of the table

The users view is derived the trainer's way, with the same functions: events sorted by
(user, time, file order) (``sort_events``), each user's history after their last event
(``history_at_end``: the last ``max_history`` distinct items, newest first), the number of
events and the newest timestamp. A user's record is replaced by the derived one.

Items: one record per row of the table (``item_id`` plus any columns). Column types come
from the file: integers and booleans -> int64, floats -> float64, text -> string, lists of
text (Parquet/JSONL) -> string_list, timestamps/dates -> int64 unix seconds;
``string_columns`` forces text (e.g. codes like "007" in a CSV). A second ingest into the
same store must have the same columns and types.

Crash safety: records are written in chunks of ``chunk_rows`` entities, one LMDB write
transaction each, and the same transaction records the progress (``ingest:<view>`` in the
metadata db: the input's sha256 and options, entities done, total). A killed ingest leaves
every chunk either fully written or absent, and running the same command again resumes after
the last committed chunk (``restart=True`` starts over). Entities are written in a fixed
order (users sorted by id, items in file order), so a resumed ingest ends equal to a clean one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recserve.features.encoding import (EVENT_COUNT, HISTORY, ITEMS, LAST_SEEN, USERS, EncodingError, FieldDef,
                                        View)
from recserve.features.events import MAX_ID_BYTES
from recserve.features.history import history_at_end, sort_events
from recserve.features.logs import (DataError, location, optional_string_column, read_arrow, read_interactions,
                                    require_columns, string_column, timestamp_column)
from recserve.features.store import FeatureStore

DEFAULT_CHUNK_ROWS = 10_000


@dataclass(frozen=True)
class IngestReport:
    view: str
    input: Path
    total: int  # entities in the input
    written: int  # entities written by this run
    resumed_at: int  # entities already done by an earlier, interrupted run (or all: nothing to do)
    rows: int  # input rows read
    seconds: float

    def summary(self) -> str:
        if self.written == 0 and self.total:
            return f"{self.view}: already ingested from {self.input} ({self.total} entities); nothing to do"
        resumed = f", resumed after {self.resumed_at}" if self.resumed_at else ""
        return (f"{self.view}: wrote {self.written} of {self.total} entities{resumed} from {self.input} "
                f"({self.rows} rows, {self.seconds:.1f} s)")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _check_ids(path: Path, column: str, ids: np.ndarray) -> None:
    for row, value in enumerate(ids.tolist()):
        if len(value.encode()) > MAX_ID_BYTES:
            raise DataError(f"{location(path, row, column)}: id is longer than {MAX_ID_BYTES} bytes")


def _write_chunks(store: FeatureStore, view: str, source: dict, total: int,
                  encode: Callable[[int, int, int], list], chunk_rows: int, restart: bool, progress: bool) -> int:
    """Encode and write entities [done, total) chunk by chunk; returns where it started."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    key = f"ingest:{view}"
    previous = None if restart else store.ingest_progress(view)
    start = previous["done"] if previous and previous.get("source") == source else 0
    from tqdm import tqdm

    with tqdm(total=total, initial=start, unit=" " + view, disable=not progress, mininterval=0.5,
              desc=f"ingest {view}") as bar:
        for lo in range(start, total, chunk_rows):
            hi = min(lo + chunk_rows, total)
            pairs = encode(lo, hi, store.now())
            mark = json.dumps({"source": source, "done": hi, "total": total}).encode()
            store.bulk_put(view, pairs, meta={key: mark})  # records + progress: one transaction
            bar.update(hi - lo)
    return start


# -- users: derived from an interaction log ------------------------------------------------
@dataclass(frozen=True)
class DerivedUsers:
    """Per user (sorted by id): history bags over ``item_ids`` positions, count, last time."""

    user_ids: np.ndarray  # str, sorted
    item_ids: np.ndarray  # str, sorted
    history: np.ndarray  # int64 positions into item_ids, newest first per user
    offsets: np.ndarray  # int64 [users + 1]
    event_count: np.ndarray  # int64
    last_seen: np.ndarray  # int64 unix seconds


def derive_users(user_id: np.ndarray, item_id: np.ndarray, timestamp: np.ndarray, max_len: int) -> DerivedUsers:
    """The users view of a log (events in file order), via ``history_at_end``."""
    user_ids, user = np.unique(np.asarray(user_id).astype(str), return_inverse=True)
    item_ids, item = np.unique(np.asarray(item_id).astype(str), return_inverse=True)
    user, item = user.reshape(-1), item.reshape(-1)
    order = sort_events(user, timestamp)
    user, item, ts = user[order], item[order], np.asarray(timestamp)[order]
    history, offsets, bag_users = history_at_end(user, item, max_len)
    assert len(bag_users) == len(user_ids)  # every user has an event, bags in user order
    last = np.flatnonzero(np.r_[user[1:] != user[:-1], True])
    return DerivedUsers(user_ids, item_ids, history, offsets, np.bincount(user, minlength=len(user_ids)), ts[last])


def ingest_interactions(store: FeatureStore, path: str | Path, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                        ttl_s: int | None = None, restart: bool = False, progress: bool = True) -> IngestReport:
    """Derive the users view from a user_id,item_id,timestamp log and write it."""
    t0 = time.perf_counter()
    path = Path(path)
    events = read_interactions(path)
    view = store.view(USERS)
    max_len = store.max_history
    derived = derive_users(events.user_id, events.item_id, events.timestamp, max_len)
    _check_ids(path, "user_id", derived.user_ids)
    _check_ids(path, "item_id", derived.item_ids)
    if ttl_s is not None:
        store.set_ttl(USERS, ttl_s)
    codes = store.assign_item_codes(derived.item_ids)  # idempotent: a re-run gets the same codes
    history = codes[derived.history]
    keys = [u.encode() for u in derived.user_ids.tolist()]
    off, count, last = derived.offsets, derived.event_count, derived.last_seen

    def encode(lo: int, hi: int, now: int) -> list:
        return [(keys[j], view.encode({HISTORY: history[off[j]:off[j + 1]], EVENT_COUNT: int(count[j]),
                                       LAST_SEEN: int(last[j])}, now)) for j in range(lo, hi)]

    source = {"input": str(path.resolve()), "digest": file_digest(path), "max_history": max_len}
    total = len(keys)
    start = _write_chunks(store, USERS, source, total, encode, chunk_rows, restart, progress)
    return IngestReport(USERS, path, total, total - start, start, len(events), time.perf_counter() - t0)


# -- items: a table ------------------------------------------------------------------------
def _item_columns(path: Path, table: pa.Table, string_columns: Sequence[str]) -> list[tuple[FieldDef, list]]:
    out = []
    for name in table.column_names:
        if name == "item_id":
            continue
        col, t = table[name], table[name].type
        if pa.types.is_dictionary(t):
            col = pc.cast(col, t.value_type)
            t = t.value_type
        if name in string_columns or pa.types.is_string(t) or pa.types.is_large_string(t):
            out.append((FieldDef(name, "string"), optional_string_column(table, name).tolist()))
        elif pa.types.is_integer(t) or pa.types.is_boolean(t):
            out.append((FieldDef(name, "int64"), pc.cast(col, pa.int64()).to_pylist()))
        elif pa.types.is_floating(t) or pa.types.is_decimal(t):
            out.append((FieldDef(name, "float64"), pc.cast(col, pa.float64()).to_pylist()))
        elif pa.types.is_timestamp(t) or pa.types.is_date(t):
            out.append((FieldDef(name, "int64"), timestamp_column(path, table, name).tolist()))
        elif (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
                pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)):
            out.append((FieldDef(name, "string_list"), col.to_pylist()))
        else:
            raise DataError(f"{location(path, None, name)}: type {t} is not supported "
                            f"(integer, float, string, list of strings, timestamp)")
    if not out:
        raise DataError(f"{path}: no item columns besides 'item_id'")
    return out


def ingest_items(store: FeatureStore, path: str | Path, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 string_columns: Sequence[str] = (), ttl_s: int | None = None, restart: bool = False,
                 progress: bool = True) -> IngestReport:
    """Write one items-view record per row of an item table (item_id + columns)."""
    t0 = time.perf_counter()
    path = Path(path)
    string_columns = tuple(string_columns)
    table = read_arrow(path, string_columns=("item_id", *string_columns))
    require_columns(path, table, ("item_id", *string_columns))
    ids = string_column(path, table, "item_id")
    _, first = np.unique(ids.astype(str), return_index=True)
    if len(first) != len(ids):
        dup = int(np.setdiff1d(np.arange(len(ids)), first)[0])
        raise DataError(f"{location(path, dup, 'item_id')}: duplicate id {str(ids[dup])!r}")
    _check_ids(path, "item_id", ids)
    columns = _item_columns(path, table, string_columns)
    old = store.schema.views.get(ITEMS)
    ttl = ttl_s if ttl_s is not None else (old.ttl_s if old else 0)
    view = View(ITEMS, "item_id", [f for f, _ in columns], ttl)
    # Encode every row before writing anything: a bad value fails the ingest up front.
    names, now = [f.name for f, _ in columns], store.now()
    pairs = []
    for row, (key, *cells) in enumerate(zip(ids.tolist(), *(v for _, v in columns))):
        try:
            pairs.append((key.encode(), view.encode(dict(zip(names, cells)), now)))
        except EncodingError as e:
            raise DataError(f"{location(path, row, None)}: {e}") from None
    store.define_view(view)  # StoreError if an earlier ingest had other columns

    def encode(lo: int, hi: int, now: int) -> list:
        return pairs[lo:hi]

    source = {"input": str(path.resolve()), "digest": file_digest(path), "string_columns": list(string_columns)}
    start = _write_chunks(store, ITEMS, source, len(pairs), encode, chunk_rows, restart, progress)
    return IngestReport(ITEMS, path, len(pairs), len(pairs) - start, start, len(pairs), time.perf_counter() - t0)
