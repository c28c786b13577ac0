"""Training data: load logs, build the item catalogue, split, build the feature spec, encode.

    data = load_dataset(cfg)            # events sorted by (user, time, file order) + split
    spec = build_spec(cfg, data)        # tables and fields for this data
    enc = encode_training(cfg, spec, data)   # CSR bags per field for train examples and items

Everything here is NumPy (no torch), so evaluation, export and tests share it. Feature
tokens and hashing come from ``recserve.features.spec`` -- the same code the server runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.features.csr import group_pairs, take_bags
from recserve.features.history import HISTORY_SOURCE
from recserve.features.history import history_at_end, history_before_events, sort_events
from recserve.features.logs import DataError, location, read_interactions, read_table
from recserve.features.spec import FeatureSpec, Field, Table
from recserve.trainer.config import TrainConfig

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
    train: np.ndarray  # bool mask over sorted events
    test_users: np.ndarray  # user codes, ascending
    test_indptr: np.ndarray  # CSR of held-out item codes per test user (distinct)
    test_items: np.ndarray
    test_context_event: np.ndarray  # a held-out event per test user (its context columns)


@dataclass(frozen=True)
class Dataset:
    user_ids: np.ndarray  # str, sorted; user code = position
    catalog: Catalog
    user: np.ndarray  # int64 codes, events sorted by (user, time, file order)
    item: np.ndarray  # int64 catalogue rows
    basket: np.ndarray  # int64 basket key (invoice, else timestamp) per event
    context: dict  # column -> str per event ("" where missing)
    split: Split

    @property
    def train_item_counts(self) -> np.ndarray:
        return np.bincount(self.item[self.split.train], minlength=len(self.catalog))


PRICE_COLUMNS = ("price", "median_unit_price", "unit_price")


def _catalog(events, items_path: str | None) -> Catalog:
    ids = np.unique(events.item_id.astype(str))
    if items_path is None:
        return Catalog(ids=ids, description=None, price=None)
    table = read_table(items_path, required=("item_id",), id_columns=("item_id",), text_columns=("description",),
                       number_columns=PRICE_COLUMNS)
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
    price_col = next((c for c in PRICE_COLUMNS if c in table), None)
    if price_col is not None:
        price = np.full(len(ids), np.nan)
        price[rows] = table[price_col]
    return Catalog(ids=ids, description=description, price=price)


def basket_starts(user: np.ndarray, basket: np.ndarray) -> np.ndarray:
    """Per event, the position of the first event of its (user, basket key) group."""
    order = np.lexsort((np.arange(len(user)), basket, user))
    new_group = np.r_[True, (user[order][1:] != user[order][:-1]) | (basket[order][1:] != basket[order][:-1])]
    first_of_group = order[np.flatnonzero(new_group)]
    out = np.empty(len(user), dtype=np.int64)
    out[order] = np.repeat(first_of_group, np.diff(np.r_[np.flatnonzero(new_group), len(user)]))
    return out


def _split(cfg: TrainConfig, user: np.ndarray, item: np.ndarray, basket: np.ndarray) -> Split:
    user_end = np.flatnonzero(np.r_[user[1:] != user[:-1], True])
    sizes = np.diff(np.r_[-1, user_end])
    if cfg.split == "leave_last_out":
        held = user_end[sizes >= cfg.min_events]
    else:
        # The user's last basket is the key of their last event; all its events are held
        # out wherever they sit in the log (invoices may interleave at one timestamp).
        baskets_per_user = np.diff(group_pairs(user, basket)[1])  # distinct keys; users ascending
        eligible = np.repeat(baskets_per_user >= cfg.min_events, sizes)
        held = np.flatnonzero(eligible & (basket == np.repeat(basket[user_end], sizes)))
    train = np.ones(len(user), bool)
    train[held] = False
    test_users, indptr, items = group_pairs(user[held], item[held])
    # held is sorted, so the first held event of each test user is at its user's offset
    context_event = held[np.searchsorted(user[held], test_users)]
    return Split(train, test_users, indptr, items, context_event)


def load_dataset(cfg: TrainConfig) -> Dataset:
    events = read_interactions(cfg.interactions, string_columns=cfg.context_columns)
    catalog = _catalog(events, cfg.items)
    user_ids, user = np.unique(events.user_id.astype(str), return_inverse=True)
    item = np.searchsorted(catalog.ids, events.item_id.astype(str))
    basket_raw = events.columns.get(cfg.basket_column)
    basket = (np.unique(basket_raw.astype(str), return_inverse=True)[1] if basket_raw is not None
              else events.timestamp).astype(np.int64)
    order = sort_events(user, events.timestamp)
    user, item, basket = user[order].astype(np.int64), item[order].astype(np.int64), basket[order]
    context = {c: np.where(events.columns[c][order] == None, "", events.columns[c][order]).astype(str)  # noqa: E711
               for c in cfg.context_columns}
    split = _split(cfg, user, item, basket)
    if len(split.test_users) == 0:
        raise DataError(f"{events.path}: no user has {cfg.min_events} or more events to hold out (min_events)")
    return Dataset(user_ids, catalog, user, item, basket, context, split)


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
            fields.append(Field(HISTORY_SOURCE, "user", "sequence", "item_id", max_len=cfg.history_len))
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
            r[HISTORY_SOURCE] = ids[idx[off[pos[j]]:off[pos[j] + 1]]].tolist() if has else []
        if context_event is not None:
            for c, values in data.context.items():
                r[c] = str(values[context_event[j]])
        records.append(r)
    return records


def encode_training(cfg: TrainConfig, spec: FeatureSpec, data: Dataset) -> Encoded:
    train = np.flatnonzero(data.split.train)
    user, item = data.user[train], data.item[train]
    user_bags = {}
    for f in spec.side_fields("user"):
        if f.name == "user_id":
            per_user = spec.hash_values("user_id", data.user_ids.tolist())
            user_bags[f.name] = _single(per_user[user])
        elif f.name == HISTORY_SOURCE:
            # The basket task predicts a whole basket at its start, so its training examples
            # see the history as of their basket's start, not the basket's earlier items.
            at = basket_starts(user, data.basket[train]) if cfg.split == "last_basket" else None
            codes, offsets = history_before_events(user, item, f.max_len, at=at)
            item_bucket = spec.hash_values(HISTORY_SOURCE, data.catalog.ids.tolist())
            user_bags[f.name] = (item_bucket[codes], offsets)
        else:
            user_bags[f.name] = _categorical(spec, f.name, data.context[f.source][train])
    return Encoded(user, item, user_bags, item_bags(spec, data.catalog))

