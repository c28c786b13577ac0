"""Training data: load logs, build the item catalogue, split, build the feature spec, encode.

    data = load_dataset(cfg)            # events sorted by (user, time, file order) + split
    spec = build_spec(cfg, data)        # tables and fields for this data
    enc = encode_training(spec, data)   # CSR bags per field for train examples and items

Everything here is NumPy (no torch), so evaluation, export and tests share it. Feature
tokens and hashing come from ``recserve.features.spec`` -- the same code the server runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.features.history import history_at_end, history_before_events, sort_events
from recserve.features.logs import DataError, location, read_interactions, read_table
from recserve.features.spec import FeatureSpec, Field, Table
from recserve.trainer.config import TrainConfig

HISTORY_FIELD = "history"
TEXT_MAX_LEN = 16
CONTEXT_BUCKETS = 1024


@dataclass(frozen=True)
class Catalog:
    """Items sorted by id; row i of every model item matrix is ``ids[i]``."""

    ids: np.ndarray  # str, sorted
    description: np.ndarray | None  # object (str or None) per item
    price: np.ndarray | None  # float64 per item, NaN when unknown

    def __len__(self) -> int:
        return len(self.ids)

    def records(self) -> list[dict]:
        """Raw item records as the feature spec reads them."""
        out = []
        for i, item_id in enumerate(self.ids.tolist()):
            r = {"item_id": item_id}
            if self.description is not None:
                r["description"] = self.description[i]
            if self.price is not None:
                r["price"] = None if np.isnan(self.price[i]) else float(self.price[i])
            out.append(r)
        return out


@dataclass(frozen=True)
class Split:
    kind: str
    train: np.ndarray  # bool mask over sorted events
    test_users: np.ndarray  # user codes, ascending
    test_indptr: np.ndarray  # CSR of held-out item codes per test user (unique)
    test_items: np.ndarray
    test_context_event: np.ndarray  # a held-out event per test user (its context columns)


@dataclass(frozen=True)
class Dataset:
    path: Path
    user_ids: np.ndarray  # str, sorted; user code = position
    catalog: Catalog
    user: np.ndarray  # int64 codes, events sorted by (user, time, file order)
    item: np.ndarray  # int64 catalogue rows
    timestamp: np.ndarray
    basket: np.ndarray  # int64 basket key (invoice, else timestamp)
    context: dict  # column -> str array, sorted order
    split: Split

    @property
    def train_item_counts(self) -> np.ndarray:
        return np.bincount(self.item[self.split.train], minlength=len(self.catalog))


def _catalog(events, items_path: str | None) -> Catalog:
    ids = np.unique(events.item_id.astype(str))
    if items_path is None:
        return Catalog(ids=ids, description=None, price=None)
    table = read_table(items_path, required=("item_id",), id_columns=("item_id",))
    meta_ids = table["item_id"].astype(str)
    _, first = np.unique(meta_ids, return_index=True)
    if len(first) != len(meta_ids):
        dup = np.setdiff1d(np.arange(len(meta_ids)), first)[0]
        raise DataError(f"{location(Path(items_path), dup, 'item_id')}: duplicate id {str(meta_ids[dup])!r}")
    ids = np.union1d(ids, meta_ids)
    rows = np.searchsorted(ids, meta_ids)
    description = price = None
    if "description" in table:
        description = np.full(len(ids), None, dtype=object)
        description[rows] = table["description"]
    price_col = next((c for c in ("price", "median_unit_price", "unit_price") if c in table), None)
    if price_col is not None:
        price = np.full(len(ids), np.nan)
        price[rows] = np.asarray(table[price_col], dtype=np.float64)
    return Catalog(ids=ids, description=description, price=price)


def _split(cfg: TrainConfig, user: np.ndarray, item: np.ndarray, basket: np.ndarray) -> Split:
    n = len(user)
    last_of_user = np.r_[user[1:] != user[:-1], True]
    user_end = np.flatnonzero(last_of_user)
    user_start = np.r_[0, user_end[:-1] + 1]
    if cfg.split == "leave_last_out":
        size = user_end - user_start + 1
        eligible = size >= cfg.min_events
        held = user_end[eligible]
    else:
        new_basket = np.r_[True, (user[1:] != user[:-1]) | (basket[1:] != basket[:-1])]
        baskets_per_user = np.add.reduceat(new_basket.astype(np.int64), user_start)
        eligible = baskets_per_user >= cfg.min_events
        # Held out: every event of the user's last basket (its key may recur earlier only if
        # the log reuses keys, so compare keys within the user's trailing run).
        basket_run = np.cumsum(new_basket)
        last_run = basket_run[user_end]
        per_event_last = np.repeat(last_run, user_end - user_start + 1)
        held_mask = (basket_run == per_event_last) & np.repeat(eligible, user_end - user_start + 1)
        held = np.flatnonzero(held_mask)
    train = np.ones(n, bool)
    train[held] = False
    held_user, held_item = user[held], item[held]
    pairs = np.unique(np.stack([held_user, held_item], 1), axis=0) if len(held) else np.zeros((0, 2), np.int64)
    test_users, first = np.unique(pairs[:, 0], return_index=True)
    indptr = np.r_[first, len(pairs)].astype(np.int64)
    context_event = held[np.r_[np.flatnonzero(np.r_[True, held_user[1:] != held_user[:-1]])]] if len(held) else held
    return Split(cfg.split, train, test_users.astype(np.int64), indptr, pairs[:, 1].astype(np.int64), context_event)


def load_dataset(cfg: TrainConfig) -> Dataset:
    events = read_interactions(cfg.interactions)
    for name in cfg.context_columns:
        if name not in events.columns:
            raise DataError(f"{events.path}, column {name!r}: missing (named in context_columns)")
    catalog = _catalog(events, cfg.items)
    user_ids, user = np.unique(events.user_id.astype(str), return_inverse=True)
    item = np.searchsorted(catalog.ids, events.item_id.astype(str))
    basket_raw = events.columns.get(cfg.basket_column)
    basket = (np.unique(basket_raw.astype(str), return_inverse=True)[1] if basket_raw is not None
              else events.timestamp).astype(np.int64)
    order = sort_events(user, events.timestamp)
    user, item, ts, basket = user[order], item[order], events.timestamp[order], basket[order]
    context = {c: events.columns[c][order].astype(str) for c in cfg.context_columns}
    split = _split(cfg, user.astype(np.int64), item.astype(np.int64), basket)
    if len(split.test_users) == 0:
        raise DataError(f"{events.path}: no user has {cfg.min_events} or more events to hold out (min_events)")
    return Dataset(events.path, user_ids, catalog, user.astype(np.int64), item.astype(np.int64), ts, basket,
                   context, split)


def _quantile_boundaries(values: np.ndarray, bins: int) -> tuple[float, ...]:
    finite = values[np.isfinite(values)]
    if len(finite) < 2:
        return ()
    qs = np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1]))
    return tuple(float(q) for q in qs)


def build_spec(cfg: TrainConfig, data: Dataset) -> FeatureSpec:
    tables = [Table("user_id", cfg.user_id_buckets, cfg.id_dim), Table("item_id", cfg.item_id_buckets, cfg.id_dim)]
    fields = [Field("user_id", "user", "categorical", "user_id"), Field("item_id", "item", "categorical", "item_id")]
    if cfg.model == "two_tower":
        if cfg.history_len > 0:
            fields.append(Field(HISTORY_FIELD, "user", "sequence", "item_id", max_len=cfg.history_len))
        for name in cfg.context_columns:
            tables.append(Table(name, CONTEXT_BUCKETS, cfg.small_dim))
            fields.append(Field(name, "user", "categorical", name))
        if data.catalog.description is not None:
            tables.append(Table("description", cfg.text_buckets, cfg.text_dim))
            fields.append(Field("description", "item", "text", "description", max_len=TEXT_MAX_LEN))
        if data.catalog.price is not None:
            bounds = _quantile_boundaries(data.catalog.price, cfg.price_bins)
            if bounds:
                tables.append(Table("price", len(bounds) + 1, cfg.small_dim))
                fields.append(Field("price", "item", "bucketized", "price", boundaries=bounds))
    return FeatureSpec(seed=cfg.seed, tables=tuple(tables), fields=tuple(fields))


# -- encoded arrays -------------------------------------------------------------------------

Bags = tuple[np.ndarray, np.ndarray]  # (bucket ids int64[M], offsets int64[B+1])


def take_bags(bags: Bags, rows: np.ndarray) -> Bags:
    """The bags of ``rows`` (any order, repeats allowed) as a new CSR pair."""
    indices, offsets = bags
    starts, lens = offsets[rows], offsets[rows + 1] - offsets[rows]
    out_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=out_offsets[1:])
    gather = np.repeat(starts - out_offsets[:-1], lens) + np.arange(out_offsets[-1])
    return indices[gather], out_offsets


def _single(buckets: np.ndarray) -> Bags:
    return buckets.astype(np.int64), np.arange(len(buckets) + 1, dtype=np.int64)


def _categorical(spec: FeatureSpec, name: str, values: np.ndarray) -> Bags:
    """One bag per value, each distinct value hashed once (empty strings: empty bags)."""
    uniq, inverse = np.unique(values, return_inverse=True)
    per_value = spec.encode_field(name, list(uniq))
    return take_bags(per_value, inverse)


@dataclass(frozen=True)
class Encoded:
    """Bags per field: user fields per training example, item fields per catalogue item."""

    example_user: np.ndarray  # user code per training example
    example_item: np.ndarray  # catalogue row per training example
    user_bags: dict  # field -> Bags over training examples
    item_bags: dict  # field -> Bags over catalogue items


def item_bags(spec: FeatureSpec, catalog: Catalog) -> dict:
    return spec.encode("item", catalog.records())


def user_records(data: Dataset, users: np.ndarray, history_len: int, context_event: np.ndarray | None = None):
    """Raw user records after each user's last *training* event (what the server sees)."""
    train = data.split.train
    idx, off, bag_users = history_at_end(data.user[train], data.item[train], history_len)
    pos = np.searchsorted(bag_users, users)
    ids = data.catalog.ids
    records = []
    for j, u in enumerate(users.tolist()):
        r = {"user_id": str(data.user_ids[u])}
        if history_len > 0:
            has = pos[j] < len(bag_users) and bag_users[pos[j]] == u
            r[HISTORY_FIELD] = ids[idx[off[pos[j]]:off[pos[j] + 1]]].tolist() if has else []
        if context_event is not None:
            for c, values in data.context.items():
                r[c] = str(values[context_event[j]])
        records.append(r)
    return records


def encode_training(spec: FeatureSpec, data: Dataset) -> Encoded:
    train = np.flatnonzero(data.split.train)
    user, item = data.user[train], data.item[train]
    user_bags = {}
    for f in spec.side_fields("user"):
        if f.name == "user_id":
            per_user = spec.hash_values("user_id", data.user_ids.tolist())
            user_bags[f.name] = _single(per_user[user])
        elif f.name == HISTORY_FIELD:
            codes, offsets = history_before_events(user, item, f.max_len)
            item_bucket = spec.hash_values(HISTORY_FIELD, data.catalog.ids.tolist())
            user_bags[f.name] = (item_bucket[codes], offsets)
        else:
            user_bags[f.name] = _categorical(spec, f.name, data.context[f.source][train])
    return Encoded(user, item, user_bags, item_bags(spec, data.catalog))

