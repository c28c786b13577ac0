"""The online feature store: one LMDB environment on local disk, read once per batch.

    store = FeatureStore.open("features.lmdb")                  # StoreError: one clear line
    store.check_compatible(spec)                                # at model load; SchemaMismatch
    records = store.user_records(["17850", "12583"])            # one read txn for the batch
    batch = store.user_batch(["17850", "12583"])                # the same, columnar (NumPy)
    store.push_events([("17850", "85123A", 1700000000, "click")])  # durable when it returns
    store.counters()                                            # {"users_hits": ..., ...}
    store.close()

Databases (named LMDB dbs in one environment, ``features.encoding`` has the value layout):
  meta        ``schema`` (JSON: views, fields, types, TTLs, encoding version), ``fingerprint``,
              ``ingest:<view>`` (bulk-ingest progress, written with each chunk)
  users       user id (UTF-8) -> one value: history (item codes), event_count, last_seen
  items       item id -> one value with the ingested item columns (a view made by ingest)
  item_codes  item id -> u32 code (big endian); item_ids: code -> item id. Histories store
              codes, so a batch of histories decodes as one uint32 array; every process
              keeps the code -> id table in memory (append-only, extended on demand
              inside the read transaction that meets a new code)

Serving reads (``user_records``, ``user_batch``, ``item_records``): one LMDB read transaction
per call, held only for the lookups (``get_values``: ``txn.get`` mapped over the keys; the
values are copies), then one whole-batch NumPy decode outside it (``decode_users``). Safe from
any number of threads: each call takes its own read transaction (py-lmdb opens environments
with MDB_NOTLS, so a transaction is not tied to a thread's slot, and ``begin()`` reuses a
spare one), and LMDB's MVCC means a writer never blocks readers. The exceptions are
growing the memory map (``set_mapsize`` invalidates this process's open transactions) and
aborting a write transaction (py-lmdb 3.0's abort starves behind busy reader threads):
readers pass a shared gate that the writer closes for those moments (``_abort``).
A user without a value, or whose value is older than the view's ``ttl_s``, takes the
cold-start path: an empty history, event_count 0, last_seen None; both are counted.

Writes (``push_events``, bulk ingest): one write transaction per call, committed with LMDB's
sync (the environment is never opened with sync=False), so an event is durable once
``push_events`` returns. MapFullError never reaches a caller: the transaction is aborted,
the map doubled and the transaction re-run. A map grown by another process (an ingest
while the server runs) is adopted the same way (MapResizedError).

Server wiring: open once at start-up (``FeatureStore.open(path)``; a StoreError is the one
line to exit with); ``check_compatible(spec)`` when a model version loads (SchemaMismatch:
refuse the version with its message); ``features.serving.StoreFeatures(store)`` as the
batch pipeline's FeatureSource; PushEvents: ``validate_events`` per RPC (EventError ->
INVALID_ARGUMENT naming the event), then one ``push_events`` for the RPCs gathered, in an
executor thread (it waits for fsync), answering them after it returns; ``counters()`` into
metrics; ``close()`` after the drain.
"""

from __future__ import annotations

import json
import operator
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from contextlib import contextmanager
from itertools import repeat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import lmdb
import numpy as np

from recserve.features.csr import take_bags
from recserve.features.encoding import (ENCODING_VERSION, EVENT_COUNT, HISTORY, ITEMS, LAST_SEEN, USERS,
                                        EncodingError, Schema, View)
from recserve.features.events import MAX_ID_BYTES, Event, EventError, validate_events  # noqa: F401 (API)
from recserve.features.history import push_history

if TYPE_CHECKING:
    from recserve.features.spec import FeatureSpec

DEFAULT_MAX_HISTORY = 50
DEFAULT_MAP_SIZE = 1 << 30  # virtual address space only: the file grows with the data
MAX_MAP_SIZE = 1 << 44
MAX_KEY_BYTES = MAX_ID_BYTES
DBS = ("meta", USERS, ITEMS, "item_codes", "item_ids")
SCHEMA_KEY, FINGERPRINT_KEY = b"schema", b"fingerprint"
READ_COUNTERS = ("reads", "hits", "missing", "expired")

_second = operator.itemgetter(1)
_VERSION_BYTE = bytes([ENCODING_VERSION])
_FOUND: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _strided_equals(buf: bytes, start: int, stride: int, n: int, want: bytes) -> bool:
    """Whether the len(want) bytes at start + i * stride equal want for every i < n (byte
    slices with a step: a C loop each, no NumPy call)."""
    return all(buf[start + j::stride] == want[j:j + 1] * n for j in range(len(want)))


@dataclass(frozen=True)
class _UsersLayout:
    """Where the users view's prefix keeps what a batch read needs."""

    prefix_size: int
    len_at: int  # the u32 history length
    col_at: tuple[int, int, int]  # updated_at, event_count, last_seen (int64)

    def columns(self, src: bytes, stride: int, n: int) -> np.ndarray:
        """The three int64 columns of n records of ``stride`` bytes as one (3, n) array."""
        if not n:
            return np.zeros((3, 0), np.int64)
        first, step = self.col_at[0], self.col_at[1] - self.col_at[0]
        if self.col_at == (first, first + step, first + 2 * step):  # one strided copy
            return np.ndarray((3, n), "<i8", src, first, (step, stride)).copy()  # C order: rows contiguous
        return np.stack([np.ndarray((n,), "<i8", src, at, (stride,)) for at in self.col_at]).astype(np.int64)


def _users_layout(view: View) -> _UsersLayout:
    fields = view.prefix_dtype.fields
    return _UsersLayout(view.prefix_size, fields[f"len_{HISTORY}"][1],
                        (fields["updated_at"][1], fields[EVENT_COUNT][1], fields[LAST_SEEN][1]))


def _all_found(b: int) -> tuple[np.ndarray, np.ndarray]:
    """(found, expired) of a batch of b fresh hits: shared read-only arrays."""
    pair = _FOUND.get(b)
    if pair is None:
        found, expired = np.ones(b, bool), np.zeros(b, bool)
        found.flags.writeable = expired.flags.writeable = False
        pair = _FOUND[b] = (found, expired)  # a benign race: equal arrays
    return pair

# A model field kind -> the stored types that can feed it.
COMPATIBLE = {"categorical": ("string", "int64"), "sequence": ("id_list", "string_list"), "text": ("string",),
              "bucketized": ("float64", "int64")}


class StoreError(RuntimeError):
    """The store cannot be opened or used; the message is one line naming the store."""


class SchemaMismatch(StoreError):
    """A model's feature spec needs what the store does not hold (message names each difference)."""


@dataclass(frozen=True)
class UserBatch:
    """Columnar users-view read of one batch, aligned with ``user_ids``.

    ``found`` is False for missing and for expired users (``expired`` tells them apart);
    their history bag is empty, event_count 0, last_seen and updated_at 0. History bags are
    CSR over uint32 item codes, newest first; ``vocab[code]`` is the item id (so a model
    can map codes to bucket ids with one gather instead of hashing strings). The arrays
    are results, not buffers: some are read-only (``found``/``expired`` of an all-hit
    batch are shared; codes may view the joined values).
    """

    user_ids: Sequence[str]
    found: np.ndarray  # bool [B]
    expired: np.ndarray  # bool [B]
    history_codes: np.ndarray  # uint32 [M]
    history_offsets: np.ndarray  # int64 [B+1]
    event_count: np.ndarray  # int64 [B]
    last_seen: np.ndarray  # int64 [B]
    updated_at: np.ndarray  # int64 [B]
    vocab: np.ndarray  # object [>= max code + 1]: code -> item id

    def records(self, history: bool = True) -> list[dict]:
        """Raw records keyed by field source (what ``FeatureSpec.encode`` reads).
        ``history=False``: found users' histories are None, not decoded (their bags come
        from the codes: ``features.serving.HistoryBuckets``), which saves turning codes
        into ids."""
        b, codes, off = len(self.user_ids), self.history_codes, self.history_offsets
        if not history:
            hists = [None] * b
        elif not len(codes):
            hists = [[] for _ in range(b)]
        else:
            lens = np.diff(off)
            k = int(lens[0])
            if (lens == k).all():  # bags of one length: a 2-D gather, one list of lists
                hists = self.vocab.take(codes.reshape(b, k)).tolist()
            else:
                flat, o = self.vocab.take(codes).tolist(), off.tolist()
                hists = [flat[a:z] for a, z in zip(o, o[1:])]
        rows = zip(self.user_ids, hists, self.event_count.tolist(), self.last_seen.tolist(),
                   self.updated_at.tolist(), self.found.tolist())
        return [{"user_id": u, HISTORY: h, EVENT_COUNT: n, LAST_SEEN: last, "updated_at": t} if ok
                else cold_start(u) for u, h, n, last, t, ok in rows]


def cold_start(user_id: str) -> dict:
    """The record of a user the store does not know (or whose value expired)."""
    return {"user_id": user_id, HISTORY: [], EVENT_COUNT: 0, LAST_SEEN: None, "updated_at": None}


class _Gate:
    """Many readers, or one remap of the memory map (which would invalidate their txns).

    A reader's way in and out is one plain lock each (no Condition machinery: the gate is
    on every read); only a closer waiting for readers to drain gets notified."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._readers = 0
        self._closed = False

    def enter(self):
        with self._lock:
            if not self._closed:
                self._readers += 1
                return
            while self._closed:
                self._cond.wait()
            self._readers += 1

    def exit(self):
        with self._lock:
            self._readers -= 1
            if self._closed and not self._readers:
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._lock:
            while self._closed:
                self._cond.wait()
            self._closed = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._lock:
                self._closed = False
                self._cond.notify_all()


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


class FeatureStore:
    """An open feature store. Create with ``FeatureStore.open``; thread-safe (see module doc)."""

    def __init__(self, path: str | os.PathLike, *, create: bool = False, max_history: int | None = None,
                 map_size: int = DEFAULT_MAP_SIZE, clock: Callable[[], float] = time.time, max_readers: int = 126):
        self.path = Path(path)
        self._clock = clock
        self._gate = _Gate()
        self._write_lock = threading.RLock()
        self._count_lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._read_counts: dict[str, list[int]] = {}  # view -> [reads, hits, missing, expired]
        self._vocab_lock = threading.Lock()
        self._layout: tuple[View | None, _UsersLayout | None] = (None, None)
        self._vocab = np.empty(0, dtype=object)
        self._vocab_n = 0
        self._env = self._open_env(create, map_size, max_readers)
        try:
            self._dbs = {}
            self.schema = self._load_schema(create, max_history)
            self._extend_vocab(None, 0)  # the whole code table now, not on the first request
        except BaseException:
            self._env.close()
            raise

    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = False, max_history: int | None = None,
             map_size: int = DEFAULT_MAP_SIZE, clock: Callable[[], float] = time.time,
             max_readers: int = 126) -> FeatureStore:
        """Open the store at ``path`` (a directory). ``create``: make a new store there if
        there is none, keeping ``max_history`` recent items per user (default 50). An
        existing store keeps its own ``max_history``; asking for another one is an error.
        ``clock`` (unix seconds) decides TTL expiry and ``updated_at``; tests pass a fake."""
        return cls(path, create=create, max_history=max_history, map_size=map_size, clock=clock,
                   max_readers=max_readers)

    # -- opening ------------------------------------------------------------------------
    def _open_env(self, create: bool, map_size: int, max_readers: int) -> lmdb.Environment:
        data = self.path / "data.mdb"
        if not data.is_file():
            if not create:
                raise StoreError(f"{self.path}: no feature store here (create one with `recserve features ingest`)")
            if self.path.exists() and not self.path.is_dir():
                raise StoreError(f"{self.path}: not a directory")
        else:
            # Start with room to grow instead of a first write that must remap.
            map_size = max(map_size, 2 * data.stat().st_size)
        page = 4096
        map_size = -(-map_size // page) * page
        try:
            env = lmdb.open(str(self.path), map_size=map_size, max_dbs=len(DBS) + 1, max_readers=max_readers,
                            subdir=True, create=create, sync=True, metasync=True, max_spare_txns=16)
        except lmdb.Error as e:
            raise StoreError(f"{self.path}: cannot open the feature store: {_first_line(e)}") from None
        try:
            env.reader_check()  # free reader slots of dead processes (e.g. a kill -9)
        except lmdb.Error:
            pass
        return env

    def _load_schema(self, create: bool, max_history: int | None) -> Schema:
        try:
            with self._env.begin() as txn:
                named = {k for k, _ in txn.cursor()}
        except lmdb.Error as e:
            raise StoreError(f"{self.path}: cannot read the feature store: {_first_line(e)}") from None
        if b"meta" not in named and not create:
            raise StoreError(f"{self.path}: not a recserve feature store (no metadata database)")
        try:
            with self._env.begin(write=True) as txn:
                for name in DBS:
                    self._dbs[name] = self._env.open_db(name.encode(), txn=txn, create=True)
                raw = txn.get(SCHEMA_KEY, db=self._dbs["meta"])
                if raw is None:
                    if not create:
                        raise StoreError(f"{self.path}: not a recserve feature store (no schema in its metadata)")
                    schema = Schema.default_users(max_history or DEFAULT_MAX_HISTORY)
                    self._put_schema(txn, schema)
                    return schema
        except lmdb.Error as e:
            raise StoreError(f"{self.path}: cannot open the feature store: {_first_line(e)}") from None
        try:
            schema = Schema.from_json(raw)
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{self.path}: unreadable feature store schema: {_first_line(e)}") from None
        if schema.encoding_version != ENCODING_VERSION:
            raise StoreError(f"{self.path}: feature store encoding version {schema.encoding_version} is not "
                             f"supported (this recserve reads version {ENCODING_VERSION})")
        with self._env.begin() as txn:
            stored = txn.get(FINGERPRINT_KEY, db=self._dbs["meta"])
        if stored is None or stored.decode() != schema.fingerprint():
            raise StoreError(f"{self.path}: feature store schema does not match its fingerprint (corrupt metadata)")
        if USERS not in schema.views:
            raise StoreError(f"{self.path}: feature store has no users view")
        kept = schema.views[USERS].field(HISTORY).max_len
        if max_history is not None and max_history != kept:
            raise StoreError(f"{self.path}: the store keeps {kept} recent items per user, not {max_history} "
                             f"(use a new store for another length)")
        return schema

    def _put_schema(self, txn, schema: Schema) -> None:
        txn.put(SCHEMA_KEY, schema.to_json(), db=self._dbs["meta"])
        txn.put(FINGERPRINT_KEY, schema.fingerprint().encode(), db=self._dbs["meta"])

    def close(self) -> None:
        with self._write_lock, self._gate.exclusive():
            self._env.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- properties ---------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.schema.fingerprint()

    @property
    def max_history(self) -> int:
        return self.schema.views[USERS].field(HISTORY).max_len

    def view(self, name: str) -> View:
        try:
            return self.schema.views[name]
        except KeyError:
            raise StoreError(f"{self.path}: the store has no {name!r} view "
                             f"(views: {', '.join(sorted(self.schema.views))})") from None

    def map_size(self) -> int:
        return self._env.info()["map_size"]

    def count(self, view: str) -> int:
        """Entities stored in a view (expired ones included)."""
        self.view(view)
        return self._read(lambda txn: txn.stat(self._dbs[view])["entries"])

    def counters(self) -> dict[str, int]:
        """Monotonic counters for metrics: ``<view>_reads|hits|missing|expired``,
        ``events_pushed``, ``push_calls``, ``map_resizes``, ``write_retries``."""
        with self._count_lock:
            out = dict(self._counts)
            for view, counts in self._read_counts.items():
                out.update(zip((f"{view}_{c}" for c in READ_COUNTERS), counts))
        return out

    def _count(self, **deltas: int) -> None:
        with self._count_lock:
            for name, n in deltas.items():
                self._counts[name] = self._counts.get(name, 0) + n

    def _count_reads(self, view: str, reads: int, hits: int, missing: int, expired: int) -> None:
        """The per-read counters: one lock and four list slots (this runs on every batch)."""
        with self._count_lock:
            c = self._read_counts.get(view)
            if c is None:
                c = self._read_counts[view] = [0, 0, 0, 0]
            c[0] += reads
            c[1] += hits
            c[2] += missing
            c[3] += expired

    # -- transactions -------------------------------------------------------------------
    def _read(self, fn):
        """fn(txn) in one read transaction; waits only while this process remaps."""
        while True:
            self._gate.enter()
            try:
                with self._env.begin() as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                pass  # another process grew the map: adopt it below, then retry
            finally:
                self._gate.exit()
            self._remap(0)

    def _write(self, fn):
        """fn(txn) in one write transaction, committed (synced); re-run after growing the map."""
        with self._write_lock:
            for _ in range(64):
                try:
                    txn = self._env.begin(write=True)
                except lmdb.MapResizedError:
                    self._remap(0)
                    continue
                try:
                    result = fn(txn)
                    txn.commit()
                    return result
                except lmdb.MapFullError:
                    self._count(write_retries=1)
                    self._abort(txn, grow=True)
                except lmdb.Error as e:
                    self._abort(txn)
                    raise StoreError(f"{self.path}: feature store write failed: {_first_line(e)}") from None
                except BaseException:
                    self._abort(txn)
                    raise
            raise StoreError(f"{self.path}: feature store write kept failing to fit the map")

    def _abort(self, txn, grow: bool = False) -> None:
        """Abort a write txn (and double the map) with no reader of this process inside.

        py-lmdb 3.0's write-txn abort() waits for an environment lock that busy reader
        threads keep re-taking: with three reader threads it never returned (measured, a
        plain py-lmdb loop reproduces it); behind the closed gate it returns at once.
        """
        with self._gate.exclusive():
            txn.abort()
            if grow:
                size = self._env.info()["map_size"]
                if size >= MAX_MAP_SIZE:
                    raise StoreError(f"{self.path}: feature store reached the {MAX_MAP_SIZE >> 40} TiB map limit")
                self._env.set_mapsize(min(2 * size, MAX_MAP_SIZE))
        if grow:
            self._count(map_resizes=1)

    def _remap(self, size: int) -> None:
        """Adopt a map size (0: the one another process grew it to); no txn may be open."""
        with self._write_lock, self._gate.exclusive():
            self._env.set_mapsize(size)
        self._count(map_resizes=1)

    # -- item vocabulary ----------------------------------------------------------------
    def _extend_vocab(self, txn, need: int) -> np.ndarray:
        """The code -> id table covering codes < need (reads new codes from txn's snapshot)."""
        if need and need <= self._vocab_n:
            return self._vocab
        if txn is None:
            return self._read(lambda t: self._extend_vocab(t, need))
        with self._vocab_lock:
            if need and need <= self._vocab_n:
                return self._vocab
            n, vocab = self._vocab_n, self._vocab
            cur = txn.cursor(db=self._dbs["item_ids"])
            new = []
            if cur.set_range(n.to_bytes(4, "big")):
                for k, v in cur:
                    if int.from_bytes(k, "big") != n + len(new):
                        raise StoreError(f"{self.path}: item vocabulary has a gap at code {n + len(new)} (corrupt)")
                    new.append(v.decode())
            if n + len(new) < need:
                raise StoreError(f"{self.path}: history refers to item code {need - 1}, unknown to the vocabulary")
            if new:
                if n + len(new) > len(vocab):
                    # Readers may hold the old array: copy into a new one, never shrink or move ids.
                    grown = np.empty(max(2 * len(vocab), n + len(new), 1024), dtype=object)
                    grown[:n] = vocab[:n]
                    vocab = grown
                vocab[n:n + len(new)] = new
                self._vocab, self._vocab_n = vocab, n + len(new)
            return self._vocab

    def _item_codes_in(self, txn, item_ids: Sequence[str]) -> dict[str, int]:
        """Codes of item ids, assigning the next free codes to new ids (inside a write txn).

        Few LMDB calls per transaction on purpose (one getmulti, two putmulti): py-lmdb
        releases the GIL around each call, and under busy reader threads every re-acquire
        can cost a GIL switch interval, so per-key calls made writes crawl (measured).
        """
        codes_db, ids_db = self._dbs["item_codes"], self._dbs["item_ids"]
        distinct = list(dict.fromkeys(item_ids))
        keys = [i.encode() for i in distinct]
        found = dict(txn.cursor(db=codes_db).getmulti(keys))
        new = [k for k in keys if k not in found]
        if new:
            nxt = txn.stat(ids_db)["entries"]  # codes are dense: 0 .. entries-1
            assigned = [(k, (nxt + j).to_bytes(4, "big")) for j, k in enumerate(new)]
            txn.cursor(db=codes_db).putmulti(assigned)
            txn.cursor(db=ids_db).putmulti([(c, k) for k, c in assigned])
            found.update(assigned)
        return {i: int.from_bytes(found[k], "big") for i, k in zip(distinct, keys)}

    def assign_item_codes(self, item_ids: Sequence[str], chunk: int = 50_000) -> np.ndarray:
        """Codes (uint32) of ``item_ids``, new ids assigned; idempotent, one txn per chunk."""
        out = np.empty(len(item_ids), dtype=np.uint32)
        for lo in range(0, len(item_ids), chunk):
            part = list(item_ids[lo:lo + chunk])
            codes = self._write(lambda txn: self._item_codes_in(txn, part))
            out[lo:lo + len(part)] = [codes[i] for i in part]
        return out

    # -- serving reads ------------------------------------------------------------------
    def _values(self, txn, db_name: str, keys: list[bytes]) -> list:
        """Values aligned with keys (None: absent, or not a possible LMDB key)."""
        cursor = txn.cursor(db=self._dbs[db_name])
        try:
            pairs = cursor.getmulti(keys)
        except lmdb.BadValsizeError:  # an empty or over-long key: such a key is never stored
            keys_ok = [k for k in keys if 0 < len(k) <= MAX_KEY_BYTES]
            pairs = cursor.getmulti(keys_ok)
        if len(pairs) == len(keys):
            return list(map(_second, pairs))
        found = dict(pairs)
        return [found.get(k) for k in keys]

    def get_values(self, db_name: str, keys: list[bytes]) -> list:
        """Values (bytes; None: absent) of ``keys`` in one read transaction.

        ``txn.get`` per key (mapped in C, no Python loop) rather than ``getmulti``:
        getmulti makes two cursor calls per key and copies each key into a (key, value)
        tuple, and measured ~20% slower for 64 random keys of 100k. The transaction lives
        only for the lookups: the values are copies (py-lmdb's default, not
        ``buffers=True``), so the decode runs after it ends, outside the reader gate.
        ``begin()`` takes one of py-lmdb's spare read transactions (``max_spare_txns``;
        an MDB_txn renewed, not a new reader slot)."""
        gate, env, db = self._gate, self._env, self._dbs[db_name]
        while True:
            gate.enter()
            try:
                txn = env.begin(db=db)
                try:
                    return list(map(txn.get, keys))
                except lmdb.BadValsizeError:  # an empty or over-long key: such a key is never stored
                    return [txn.get(k) if 0 < len(k) <= MAX_KEY_BYTES else None for k in keys]
                finally:
                    txn.abort()
            except lmdb.MapResizedError:
                pass  # another process grew the map: adopt it below, then retry
            finally:
                gate.exit()
            self._remap(0)

    def user_batch(self, user_ids: Sequence[str]) -> UserBatch:
        """Users-view features of a batch, columnar: one read transaction for the lookups
        (``get_values``), then the whole-batch decode (``decode_users``) after it."""
        return self.decode_users(user_ids, self.get_values(USERS, list(map(str.encode, user_ids))))

    def user_records(self, user_ids: Sequence[str]) -> list[dict]:
        """One raw record per user id, keyed by feature-spec source: ``user_id``,
        ``history`` (item ids, newest first), ``event_count``, ``last_seen``,
        ``updated_at``; unknown or expired users get ``cold_start(user_id)``."""
        return self.user_batch(user_ids).records()

    def decode_users(self, user_ids: Sequence[str], values: Sequence, txn=None) -> UserBatch:
        """Encoded users-view values (None: missing) -> a UserBatch. Whole-batch decode, no
        per-user Python work and few NumPy calls (each costs microseconds when the caches are
        cold, as they are between two batches): the values are joined once; when they all
        have one size (full histories, the common case) the checks are strided byte
        compares on the join, the codes one strided 2-D ``uint32`` view of it and the three int64
        columns one strided copy; mixed sizes join the prefixes and the codes separately.
        ``txn``: where to read item codes the in-memory vocabulary lacks (default: a new read
        transaction; codes are append-only, so any later snapshot has them). Public so that
        a benchmark can run the same decode over values from elsewhere."""
        view = self.schema.views[USERS]
        cached = self._layout
        if cached[0] is not view:  # the schema was replaced (define_view, set_ttl)
            cached = self._layout = (view, _users_layout(view))
        layout = cached[1]
        p, len_at = layout.prefix_size, layout.len_at
        b = len(values)
        all_present = all(values) or None not in values  # all(): no value is empty or None
        rows = values if all_present else [v for v in values if v is not None]
        n = len(rows)
        buf = b"".join(rows)
        size = len(rows[0]) if n else p
        k = (size - p) >> 2
        if (n and len(buf) == n * size and not size & 3 and size >= p
                and _strided_equals(buf, len_at, size, n, k.to_bytes(4, "little"))):
            # All one size: each value's length field says exactly that size, so record i
            # starts at i * size and every check and column is a strided read of the join.
            src, stride, versions = buf, size, buf[::size]
            codes = np.ndarray((n, k), "<u4", buf, p, (size, 4)).reshape(-1)  # a copy: the codes only
            offsets = np.arange(0, (n + 1) * k, k, dtype=np.int64) if k else np.zeros(n + 1, np.int64)
        else:
            src = heads = b"".join([v[:p] for v in rows])
            stride = p
            versions = heads[::p] if len(heads) == n * p else bytes([v[0] if v else 0 for v in rows])
            codes = None
        if versions != _VERSION_BYTE * n:  # the first byte of every value, checked before its layout is used
            raise StoreError(f"{self.path}: users value with encoding version {max(versions)} "
                             f"(this recserve reads version {ENCODING_VERSION})")
        if codes is None:
            codes = np.frombuffer(b"".join([v[p:] for v in rows]), dtype=np.uint8)
            if len(heads) != n * p or len(codes) & 3:
                raise StoreError(f"{self.path}: users value shorter than its prefix or with a bad length (corrupt)")
            codes = codes.view("<u4")
            offsets = np.zeros(n + 1, dtype=np.int64)
            if n:
                np.cumsum(np.ndarray((n,), "<u4", heads, len_at, (p,)), out=offsets[1:])
            if offsets[-1] != len(codes):
                raise StoreError(f"{self.path}: users value with a bad history length (corrupt)")
        # updated_at, event_count, last_seen: one (3, n) int64 array, each row contiguous
        cols = layout.columns(src, stride, n)
        fresh = None if not view.ttl_s else cols[0] >= self._clock() - view.ttl_s
        if all_present and (fresh is None or fresh.all()):  # the common case: nothing to mask
            found, expired = _all_found(b)
            updated, count, last = cols
            hits, missing, n_expired = b, 0, 0
        else:
            present = np.fromiter(map(operator.is_not, values, repeat(None)), dtype=bool, count=b)
            if fresh is None or fresh.all():
                # Only missing users: their bags are empty and the stored codes keep their
                # order, so the codes stay as they are and only the offsets repeat.
                found, expired, n_expired = present, np.zeros(b, bool), 0
                pos = np.zeros(b + 1, dtype=np.int64)
                np.cumsum(present, out=pos[1:])
                offsets = offsets[pos]
                fresh = slice(None)
            else:
                found = np.zeros(b, bool)
                found[present] = fresh
                expired = present & ~found
                n_expired = n - int(fresh.sum())
                # Row r of the output bag list is stored value slot[r], or an empty bag.
                slot = np.full(b, n, dtype=np.int64)
                slot[found] = np.flatnonzero(fresh)
                codes, offsets = take_bags((codes, np.append(offsets, offsets[-1])), slot)
            out = np.zeros((3, b), np.int64)
            out[:, found] = cols[:, fresh]
            updated, count, last = out
            hits, missing = n - n_expired, b - n
        self._count_reads(USERS, b, hits, missing, n_expired)
        if len(codes):
            need = int(codes.max()) + 1
            # _vocab_n before _vocab: the writer sets _vocab first, so this vocab covers need
            vocab = self._vocab if need <= self._vocab_n else self._extend_vocab(txn, need)
        else:
            vocab = self._vocab
        return UserBatch(user_ids, found, expired, codes, offsets, count, last, updated, vocab)

    def records(self, view_name: str, keys: Sequence[str]) -> list[dict | None]:
        """Any view: one record (every field; id_list as item ids) per key, None when
        missing or expired. One read transaction."""
        view = self.view(view_name)
        bkeys = [k.encode() for k in keys]

        def read(txn):
            values = self._values(txn, view_name, bkeys)
            now = self._clock()
            out, missing, expired = [], 0, 0
            for k, v in zip(keys, values):
                if v is None:
                    out.append(None)
                    missing += 1
                    continue
                try:
                    rec, updated_at = view.decode(v)
                except EncodingError as e:
                    raise StoreError(f"{self.path}: {e}") from None
                if view.ttl_s and updated_at < now - view.ttl_s:
                    out.append(None)
                    expired += 1
                    continue
                for f in view.fields:
                    if f.type == "id_list" and rec[f.name] is not None:
                        codes = rec[f.name]
                        vocab = self._extend_vocab(txn, max(codes) + 1) if codes else self._vocab
                        rec[f.name] = [vocab[c] for c in codes]
                rec[view.key] = k
                rec["updated_at"] = updated_at
                out.append(rec)
            self._count_reads(view_name, len(keys), len(keys) - missing - expired, missing, expired)
            return out

        return self._read(read)

    def item_records(self, item_ids: Sequence[str]) -> list[dict | None]:
        """Items-view records (the ingested item columns), None when missing or expired."""
        return self.records(ITEMS, item_ids)

    # -- schema checks ------------------------------------------------------------------
    def check_compatible(self, spec: FeatureSpec, request_sources: Collection[str] | None = None) -> None:
        """Raise SchemaMismatch naming every user-side field of ``spec`` the store cannot feed.

        A field whose source the users view holds must have a compatible type (sequence <-
        id_list/string_list, categorical <- string/int64, text <- string, bucketized <-
        float64/int64), and a sequence must not read more items than the store keeps. A
        field the store does not hold must come from the request: ``request_sources`` names
        those; by default ``user_id`` and every categorical field (request context).
        """
        users = self.schema.views[USERS]
        held = ", ".join(f.name for f in users.fields)
        problems = []
        for f in spec.side_fields("user"):
            stored = users.field(f.source)
            if stored is None:
                from_request = (f.source in request_sources if request_sources is not None
                                else f.source == users.key or f.kind == "categorical")
                if not from_request:
                    problems.append(f"model field {f.name!r} ({f.kind}) reads {f.source!r}, which the store's "
                                    f"users view does not hold (it holds {held})")
                continue
            if stored.type not in COMPATIBLE[f.kind]:
                problems.append(f"model field {f.name!r} is {f.kind} but the store's {f.source!r} is {stored.type} "
                                f"(needs {' or '.join(COMPATIBLE[f.kind])})")
            elif f.kind == "sequence" and stored.max_len and (not f.max_len or f.max_len > stored.max_len):
                wanted = f"up to {f.max_len}" if f.max_len else "all"
                problems.append(f"model field {f.name!r} reads {wanted} items of {f.source!r} but the store keeps "
                                f"{stored.max_len}")
        if problems:
            raise SchemaMismatch(f"feature store {self.path} does not fit the model: " + "; ".join(problems))

    # -- live updates -------------------------------------------------------------------
    def validate_events(self, events: Iterable) -> list[tuple[str, str, int, str]]:
        """``events.validate_events`` against this store's clock (EventError on a bad one)."""
        return validate_events(events, self._clock())

    def push_events(self, events: Iterable) -> int:
        """Apply events in one synced write transaction; returns how many were applied.

        All events are validated first (EventError: nothing is written). Each user's
        events apply in the order given: the item moves to the front of the history
        (``push_history``: distinct, newest first, at most ``max_history``), event_count
        grows by one, last_seen becomes the newest timestamp. An expired value starts
        over from the cold-start record. Durable when this returns.
        """
        checked = self.validate_events(events)
        if not checked:
            return 0
        per_user: dict[str, list[tuple[str, int]]] = {}
        for user_id, item_id, ts, _ in checked:
            per_user.setdefault(user_id, []).append((item_id, ts))
        items = [item for _, item, _, _ in checked]  # a list: apply() may run again after a remap
        view = self.schema.views[USERS]
        max_len = self.max_history

        def apply(txn):
            now = int(self._clock())
            codes = self._item_codes_in(txn, items)
            keys = [u.encode() for u in per_user]
            olds = self._values(txn, USERS, keys)
            puts = []
            for key, old, evs in zip(keys, olds, per_user.values()):
                rec = None
                if old is not None:
                    rec, updated_at = view.decode(old)
                    if view.ttl_s and updated_at < now - view.ttl_s:
                        rec = None
                history = rec[HISTORY] if rec else []
                history = push_history(history, [codes[item] for item, _ in evs], max_len)
                last = max(ts for _, ts in evs)
                if rec and rec[LAST_SEEN] is not None:
                    last = max(last, rec[LAST_SEEN])
                value = view.encode({HISTORY: history, EVENT_COUNT: ((rec[EVENT_COUNT] or 0) if rec else 0) + len(evs),
                                     LAST_SEEN: last}, now)
                puts.append((key, value))
            txn.cursor(db=self._dbs[USERS]).putmulti(puts)
            return len(checked)

        n = self._write(apply)
        self._count(events_pushed=n, push_calls=1)
        return n

    # -- bulk writes (ingest) -----------------------------------------------------------
    def define_view(self, view: View) -> None:
        """Add a view, or check that an existing one has the same key and fields (TTL may
        differ: it is updated). Raises StoreError naming the difference."""
        def apply(txn):
            schema = Schema.from_json(txn.get(SCHEMA_KEY, db=self._dbs["meta"]))
            old = schema.views.get(view.name)
            if old is not None and old.layout() != view.layout():
                raise StoreError(f"{self.path}: the store's {view.name} view has fields {_describe(old)}; the new "
                                 f"data has {_describe(view)} (ingest into a new store)")
            schema.views[view.name] = view
            self._put_schema(txn, schema)
            return schema

        self.schema = self._write(apply)

    def set_ttl(self, view_name: str, ttl_s: int) -> None:
        """Set a view's max age in seconds (0: never expires). Other processes that have
        the store open see the change when they reopen it."""
        old = self.view(view_name)
        self.define_view(View(old.name, old.key, old.fields, ttl_s))

    def bulk_put(self, view_name: str, pairs: Sequence[tuple[bytes, bytes]],
                 meta: dict[str, bytes] | None = None) -> None:
        """Encoded (key, value) pairs and metadata entries in one all-or-nothing txn."""
        self.view(view_name)

        pairs = [(bytes(k), bytes(v)) for k, v in pairs]  # putmulti takes exact 2-tuples
        meta_pairs = [(k.encode(), v) for k, v in (meta or {}).items()]

        def apply(txn):
            txn.cursor(db=self._dbs[view_name]).putmulti(pairs)
            if meta_pairs:
                txn.cursor(db=self._dbs["meta"]).putmulti(meta_pairs)

        self._write(apply)

    def get_meta(self, key: str) -> bytes | None:
        return self._read(lambda txn: txn.get(key.encode(), db=self._dbs["meta"]))

    def ingest_progress(self, view_name: str) -> dict | None:
        raw = self.get_meta(f"ingest:{view_name}")
        return json.loads(raw) if raw else None

    def now(self) -> int:
        return int(self._clock())

    # -- snapshot -----------------------------------------------------------------------
    def snapshot(self, out: str | os.PathLike) -> Path:
        """A compacted, consistent copy (one read txn) as a new store directory ``out``,
        which must not exist; written to a temp dir, fsynced, then renamed."""
        out = Path(out)
        if out.exists():
            raise StoreError(f"{out}: already exists (a snapshot goes to a new directory)")
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        try:
            self._gate.enter()
            try:
                self._env.copy(str(tmp), compact=True)
            finally:
                self._gate.exit()
            for name in os.listdir(tmp):
                fd = os.open(tmp / name, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.rename(tmp, out)
            fd = os.open(out.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            for name in os.listdir(tmp) if tmp.exists() else ():
                os.unlink(tmp / name)
            if tmp.exists():
                tmp.rmdir()
            raise
        return out


def _describe(view: View) -> str:
    return "(" + ", ".join(f"{f.name}: {f.type}" for f in view.fields) + ")"
