"""The feature store on the serving path: request merge, a FeatureSource, fast history bags.

    store = FeatureStore.open(path)
    store.check_compatible(model.spec)                    # when a model version loads
    source = StoreFeatures(store)                          # server.recommend.FeatureSource
    records = source.user_records(queries)                 # one read txn for the batch
    records, bags = source.user_features(queries, spec)    # the same, histories as bags

    buckets = HistoryBuckets(spec, "history")              # per model version
    ids, offsets = buckets.bags(store.user_batch(user_ids))  # == spec.encode_field("history", ...)

``merge_request`` defines how a request combines with stored features: the request context
is the base, stored fields override it (a client cannot replace stored features by sending
a context key of the same name), ``user_id`` is the request's, and the request's own
``recent_items`` (newest first) count as newer than the stored history: they go to its
front through ``push_history``, so the result stays distinct, newest first and bounded.

``HistoryBuckets`` is the columnar fast path: a store history is a bag of item codes, and a
model's bucket id of an item never changes, so each code is hashed once per model version
and a batch's history bags become one NumPy gather (no per-item Python work). Its output
equals ``spec.encode_field`` on the same histories (tested). Requests that carry their own
recent items need the record path (``merge_request``). ``StoreFeatures.user_features`` takes
the fast path for a batch whenever it can (no request in it carries recent items, and the
model reads the stored history only through sequence fields) and the record path otherwise;
both give the same bags.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from recserve.features.encoding import HISTORY
from recserve.features.history import push_history
from recserve.features.store import FeatureStore, UserBatch


def merge_request(record: Mapping, context: Mapping[str, str], recent_items: Sequence[str] = (),
                  max_len: int = 0) -> dict:
    """A stored record (``FeatureStore.user_records``) + one request -> the raw record the
    feature spec encodes. ``max_len`` bounds the merged history (0: stored + request)."""
    out = {**context, **record}
    if recent_items:
        stored = list(record.get(HISTORY) or [])
        bound = max_len or len(stored) + len(recent_items)
        out[HISTORY] = push_history(stored, list(reversed(recent_items)), bound)
    return out


class StoreFeatures:
    """``FeatureSource`` backed by the store: the batch's queries (anything with
    ``user_id``, ``context`` and ``recent_items``) -> raw records, one read txn."""

    # HistoryBuckets of the specs seen last (a few model versions at a time: the serving
    # ones and those loading); keyed by id(spec), each entry holds its spec, so ids stay unique.
    MAX_SPECS = 8

    def __init__(self, store: FeatureStore):
        self.store = store
        self._lock = threading.Lock()
        self._by_spec: OrderedDict = OrderedDict()  # id(spec) -> (spec, [(field, HistoryBuckets)] or None)

    def user_features(self, queries: Sequence, spec=None) -> tuple[list[dict], dict]:
        """(records, bags) for ``spec.encode("user", records, given=bags)``: with a spec whose
        stored history is read only by sequence fields and a batch without request-side
        recent items, those fields' bags by code gather and records without histories;
        otherwise ``(user_records(queries), {})``. One read txn either way."""
        fields = self._history_fields(spec) if spec is not None else None
        if not fields or any(q.recent_items for q in queries):
            return self.user_records(queries), {}
        batch = self.store.user_batch([q.user_id for q in queries])
        records = [{**q.context, **r} if q.context else r for r, q in zip(batch.records(history=False), queries)]
        return records, {name: buckets.bags(batch) for name, buckets in fields}

    def _history_fields(self, spec) -> list | None:
        with self._lock:
            entry = self._by_spec.get(id(spec))
            if entry is None:
                readers = [f for f in spec.side_fields("user") if f.source == HISTORY]
                fields = ([(f.name, HistoryBuckets(spec, f.name)) for f in readers]
                          if readers and all(f.kind == "sequence" for f in readers) else None)
                entry = self._by_spec[id(spec)] = (spec, fields)
                while len(self._by_spec) > self.MAX_SPECS:
                    self._by_spec.popitem(last=False)
            else:
                self._by_spec.move_to_end(id(spec))
            return entry[1]

    def user_records(self, queries: Sequence) -> list[dict]:
        stored = self.store.user_records([q.user_id for q in queries])
        bound = self.store.max_history
        # A query with no context and no recent items takes its stored record as it is
        # (a fresh dict from this read: nobody else holds it), not a copy.
        return [merge_request(r, q.context, q.recent_items, bound) if q.context or q.recent_items else r
                for r, q in zip(stored, queries)]


class HistoryBuckets:
    """Bucket ids of stored histories for one model's sequence field, by code gather."""

    def __init__(self, spec, field_name: str = HISTORY):
        self.spec, self.field = spec, spec.field(field_name)
        if self.field.kind != "sequence":
            raise ValueError(f"HistoryBuckets: field {field_name!r} is {self.field.kind}, not sequence")
        self._lock = threading.Lock()
        self._buckets = np.zeros(0, dtype=np.int64)  # code -> bucket id, for codes < len

    def _table(self, vocab: np.ndarray, need: int) -> np.ndarray:
        table = self._buckets
        if need <= len(table):
            return table
        with self._lock:
            table = self._buckets
            if need > len(table):
                new = self.spec.hash_values(self.field.name, vocab[len(table):need].tolist())
                table = np.concatenate([table, new])
                self._buckets = table  # readers holding the old table only index below its length
            return table

    def bags(self, batch: UserBatch) -> tuple[np.ndarray, np.ndarray]:
        """(bucket ids int64[M], offsets int64[B+1]) of the batch's histories, cut to the
        field's ``max_len`` (store histories are already distinct and newest first)."""
        codes, offsets = batch.history_codes, batch.history_offsets
        if self.field.max_len:
            lens = np.diff(offsets)
            cut = np.minimum(lens, self.field.max_len)
            if (cut < lens).any():
                new_offsets = np.zeros(len(cut) + 1, dtype=np.int64)
                np.cumsum(cut, out=new_offsets[1:])
                codes = codes[np.repeat(offsets[:-1] - new_offsets[:-1], cut) + np.arange(new_offsets[-1])]
                offsets = new_offsets
        if not len(codes):
            return np.zeros(0, np.int64), offsets.astype(np.int64)
        table = self._table(batch.vocab, int(codes.max()) + 1)
        return table[codes], offsets.astype(np.int64)
