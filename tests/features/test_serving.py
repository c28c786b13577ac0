"""The store on the serving path: request merge, the FeatureSource adapter, history bags."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from recserve.features.serving import HistoryBuckets, StoreFeatures, merge_request
from recserve.features.spec import FeatureSpec, Field, Table
from recserve.features.store import FeatureStore
from tests.features.conftest import T0

SPEC = FeatureSpec(seed=7, tables=(Table("user_id", 97, 4), Table("item_id", 1009, 4), Table("device", 13, 2)),
                   fields=(Field("user_id", "user", "categorical", "user_id"),
                           Field("history", "user", "sequence", "item_id", max_len=3),
                           Field("device", "user", "categorical", "device"),
                           Field("item_id", "item", "categorical", "item_id")))


@dataclass(frozen=True)
class Query:  # the shape of recserve.server.recommend.Query that StoreFeatures reads
    user_id: str
    context: dict = field(default_factory=dict)
    recent_items: tuple = ()


def test_merge_request_puts_request_items_first_and_keeps_stored_fields():
    record = {"user_id": "u1", "history": ["c", "b", "a"], "event_count": 3}
    merged = merge_request(record, {"device": "ios", "event_count": "999"}, ("b", "x", "b"), max_len=4)
    assert merged == {"user_id": "u1", "history": ["b", "x", "c", "a"], "event_count": 3, "device": "ios"}
    assert merge_request(record, {}, ())["history"] is record["history"]  # nothing to merge: no copy


def test_store_features_is_a_feature_source_with_one_read_per_batch(tmp_path):
    with FeatureStore.open(tmp_path / "s", create=True, max_history=3) as store:
        store.push_events([("u1", "a", T0, "view"), ("u1", "b", T0 + 1, "view")])
        source = StoreFeatures(store)
        recs = source.user_records([Query("u1", {"device": "web"}, ("z",)), Query("new", {"device": "ios"})])
        assert store.counters()["users_reads"] == 2
    assert recs[0]["history"] == ["z", "b", "a"] and recs[0]["device"] == "web"
    assert recs[1]["history"] == [] and recs[1]["user_id"] == "new" and recs[1]["event_count"] == 0
    bags = SPEC.encode("user", recs)  # the records are what the spec encodes
    assert bags["history"][1].tolist() == [0, 3, 3]


def test_history_buckets_equal_the_spec_encoding(tmp_path):
    rng = np.random.default_rng(3)
    users = [f"u{i}" for i in range(30)]
    with FeatureStore.open(tmp_path / "s", create=True, max_history=5) as store:
        store.push_events([(users[u], f"I{i}", T0, "view")
                           for u, i in zip(rng.integers(0, 30, 400), rng.integers(0, 40, 400))])
        buckets = HistoryBuckets(SPEC, "history")
        for batch_users in (users[:7], users[5:] + ["nobody"], users):
            batch = store.user_batch(batch_users)
            ids, offsets = buckets.bags(batch)
            want_ids, want_offsets = SPEC.encode_field("history", [r["history"] for r in batch.records()])
            assert ids.tolist() == want_ids.tolist() and offsets.tolist() == want_offsets.tolist()
        assert (np.diff(store.user_batch(users).history_offsets) > 3).any()  # bags were cut to max_len 3
        store.push_events([("u0", "brand-new", T0, "view")])  # a code the bucket table has not seen
        batch = store.user_batch(["u0"])
        assert buckets.bags(batch)[0][0] == SPEC.hash_values("history", ["brand-new"])[0]


def test_store_features_without_context_or_recent_items_is_the_stored_record(tmp_path):
    with FeatureStore.open(tmp_path / "s", create=True, max_history=3) as store:
        store.push_events([("u1", "a", T0, "view")])
        recs = StoreFeatures(store).user_records([Query("u1"), Query("new"), Query("u1", {"device": "web"})])
        assert recs[:2] == store.user_records(["u1", "new"])
        assert recs[2] == {**store.user_records(["u1"])[0], "device": "web"}
        assert recs[0] is not recs[2]


def test_user_features_bags_equal_the_record_path(tmp_path, clock):
    """The columnar path (history bags by code gather, records without histories) encodes to
    exactly what the record path encodes: hits, missing and expired users, cut histories,
    context values; a batch with request-side recent items takes the record path."""
    rng = np.random.default_rng(5)
    users = [f"u{i}" for i in range(20)]
    with FeatureStore.open(tmp_path / "s", create=True, max_history=5, clock=clock) as store:
        store.push_events([(users[u], f"I{i}", T0, "view")
                           for u, i in zip(rng.integers(0, 12, 300), rng.integers(0, 40, 300))])
        clock.now = T0 + 100
        store.push_events([("u15", "fresh", T0 + 100, "view")])
        store.set_ttl("users", 50)  # everyone but u15 has expired
        expired_batch = [Query("u15"), Query("u3", {"device": "web"}), Query("nobody")]
        store.set_ttl("users", 0)
        batches = [[Query(u, {"device": "ios"} if i % 3 else {}) for i, u in enumerate(users)] + [Query("nobody")],
                   [Query("u1")]]
        source = StoreFeatures(store)
        for queries in batches:
            records, bags = source.user_features(queries, SPEC)
            assert set(bags) == {"history"}
            want = SPEC.encode("user", source.user_records(queries))
            got = SPEC.encode("user", records, given=bags)
            assert {f: (i.tolist(), o.tolist()) for f, (i, o) in got.items()} == \
                   {f: (i.tolist(), o.tolist()) for f, (i, o) in want.items()}
        store.set_ttl("users", 50)
        records, bags = source.user_features(expired_batch, SPEC)
        assert np.diff(bags["history"][1]).tolist() == [1, 0, 0] and records[1]["device"] == "web"
        assert store.counters()["users_expired"] >= 1
        # Request-side recent items: the record path (merge_request), no bags.
        records, bags = source.user_features([Query("u15", recent_items=("x",))], SPEC)
        assert bags == {} and records[0]["history"] == ["x", "fresh"]


def test_user_features_falls_back_to_records_for_specs_it_cannot_serve_by_code(tmp_path):
    other = FeatureSpec(seed=7, tables=(Table("item_id", 1009, 4),),
                        fields=(Field("last_item", "user", "categorical", "item_id", source="history"),
                                Field("item_id", "item", "categorical", "item_id")))
    with FeatureStore.open(tmp_path / "s", create=True) as store:
        store.push_events([("u1", "a", T0, "view")])
        source = StoreFeatures(store)
        records, bags = source.user_features([Query("u1")], other)
        assert bags == {} and records[0]["history"] == ["a"]
        assert source.user_features([Query("u1")])[1] == {}  # no spec: records only
