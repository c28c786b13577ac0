"""The LMDB feature store: encoding round-trips, TTL, schema checks, open errors, live events,
map growth, and readers running beside writers (threads and processes)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time

import lmdb
import numpy as np
import pytest

from recserve.features.encoding import ENCODING_VERSION, FieldDef, View
from recserve.features.history import push_history
from recserve.features.spec import FeatureSpec, Field, Table
from recserve.features.store import Event, EventError, FeatureStore, SchemaMismatch, StoreError, cold_start
from tests.features.conftest import T0


def open_store(path, clock=time.time, **kw) -> FeatureStore:
    return FeatureStore.open(path, create=True, clock=clock, **kw)


# -- values ------------------------------------------------------------------------------
ALL_TYPES = View("items", "item_id", (FieldDef("n", "int64"), FieldDef("x", "float64"), FieldDef("s", "string"),
                                      FieldDef("tags", "string_list"), FieldDef("seen", "id_list", 4)))
RECORDS = {
    "a": {"n": -(2**63), "x": -0.0, "s": "héllo ✓", "tags": ["red", "mug"], "seen": ["I2", "I1"]},
    "b": {"n": 2**63 - 1, "x": math.inf, "s": "", "tags": [], "seen": []},
    "c": {"n": None, "x": None, "s": None, "tags": None, "seen": None},
    "d": {"n": 0, "x": 1e-300, "s": "x" * 5000, "tags": ["only"], "seen": ["I9", "I1", "I2", "I0"]},
}


def test_every_field_type_round_trips_through_the_store(tmp_path):
    with open_store(tmp_path / "s") as store:
        store.define_view(ALL_TYPES)
        ids = sorted({i for r in RECORDS.values() for i in r["seen"] or []})
        code = dict(zip(ids, store.assign_item_codes(ids).tolist()))
        now = store.now()
        pairs = [(k.encode(), ALL_TYPES.encode({**r, "seen": [code[i] for i in r["seen"]] if r["seen"] is not None
                                                else None}, now)) for k, r in RECORDS.items()]
        store.bulk_put("items", pairs)
        got = store.item_records(list(RECORDS) + ["missing"])
    assert got[-1] is None
    for (key, want), rec in zip(RECORDS.items(), got):
        assert rec == {**want, "item_id": key, "updated_at": now}
    assert math.copysign(1, got[0]["x"]) == -1  # -0.0 keeps its sign


def test_nan_round_trips_and_bad_values_are_refused():
    value = ALL_TYPES.encode({"x": math.nan}, updated_at=5)
    rec, updated = ALL_TYPES.decode(value)
    assert math.isnan(rec["x"]) and updated == 5 and rec["n"] is None
    for bad, words in (({"n": 1.5}, "integer"), ({"n": 2**63}, "outside int64"), ({"tags": ["a\x1fb"]}, r"U\+001F"),
                       ({"tags": "abc"}, "list"), ({"seen": [1, 2, 3, 4, 5]}, "at most 4"), ({"s": 3}, "string")):
        with pytest.raises(ValueError, match=words):
            ALL_TYPES.encode(bad, updated_at=0)


# -- opening -----------------------------------------------------------------------------
def one_line_error(fn, match: str) -> str:
    with pytest.raises(StoreError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_opening_fails_with_one_clear_line(tmp_path):
    one_line_error(lambda: FeatureStore.open(tmp_path / "nothing"), "no feature store here")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "data.mdb").write_bytes(b"\x00garbage" * 2000)
    one_line_error(lambda: FeatureStore.open(tmp_path / "junk"), "cannot open the feature store")
    env = lmdb.open(str(tmp_path / "other"), max_dbs=2)  # an LMDB environment that is not a feature store
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v")
    env.close()
    one_line_error(lambda: FeatureStore.open(tmp_path / "other"), "not a recserve feature store")


def test_unknown_encoding_version_is_refused(tmp_path):
    open_store(tmp_path / "s").close()
    env = lmdb.open(str(tmp_path / "s"), max_dbs=8)
    meta = env.open_db(b"meta")
    with env.begin(write=True, db=meta) as txn:
        schema = json.loads(txn.get(b"schema"))
        txn.put(b"schema", json.dumps({**schema, "encoding_version": 99}).encode())
    env.close()
    msg = one_line_error(lambda: FeatureStore.open(tmp_path / "s"), "encoding version 99 is not supported")
    assert f"reads version {ENCODING_VERSION}" in msg


def test_a_value_with_an_unknown_version_byte_fails_the_read(tmp_path):
    with open_store(tmp_path / "s") as store:
        store.push_events([("u1", "a", T0, "view")])
        raw = store.view("users").encode({"history": [0], "event_count": 1, "last_seen": T0}, T0)
        store.bulk_put("users", [(b"u2", bytes([ENCODING_VERSION + 1]) + raw[1:])])
        assert store.user_records(["u1"])[0]["history"] == ["a"]
        one_line_error(lambda: store.user_records(["u1", "u2"]), "encoding version")


def test_max_history_is_fixed_when_the_store_is_created(tmp_path):
    open_store(tmp_path / "s", max_history=7).close()
    with FeatureStore.open(tmp_path / "s") as store:
        assert store.max_history == 7
    one_line_error(lambda: FeatureStore.open(tmp_path / "s", max_history=8), "keeps 7 recent items")


# -- schema check at model load ----------------------------------------------------------
def spec_with(*user_fields: Field) -> FeatureSpec:
    tables = (Table("user_id", 64, 4), Table("item_id", 64, 4), Table("words", 64, 4), Table("bins", 3, 4))
    return FeatureSpec(seed=1, tables=tables, fields=(Field("user_id", "user", "categorical", "user_id"), *user_fields,
                                                      Field("item_id", "item", "categorical", "item_id")))


def test_check_compatible_accepts_what_the_store_can_feed(tmp_path):
    with open_store(tmp_path / "s", max_history=20) as store:
        store.check_compatible(spec_with(Field("history", "user", "sequence", "item_id", max_len=20),
                                         Field("country", "user", "categorical", "words"),  # request context
                                         Field("activity", "user", "bucketized", "bins", source="event_count",
                                               boundaries=(1.0, 10.0))))


def test_check_compatible_names_every_difference(tmp_path):
    with open_store(tmp_path / "s", max_history=20) as store:
        spec = spec_with(Field("history", "user", "sequence", "item_id", max_len=50),
                         Field("bio", "user", "text", "words"),
                         Field("binned", "user", "bucketized", "bins", source="history", boundaries=(1.0, 2.0)))
        with pytest.raises(SchemaMismatch) as info:
            store.check_compatible(spec)
    msg = str(info.value)
    assert "\n" not in msg
    assert "'history' reads up to 50 items of 'history' but the store keeps 20" in msg
    assert "'bio' (text) reads 'bio', which the store's users view does not hold" in msg
    assert "'binned' is bucketized but the store's 'history' is id_list" in msg
    with open_store(tmp_path / "t") as store, pytest.raises(SchemaMismatch, match="'country'"):
        # With explicit request sources, a categorical field is no longer assumed to be context.
        store.check_compatible(spec_with(Field("country", "user", "categorical", "words")),
                               request_sources={"user_id"})


# -- live events -------------------------------------------------------------------------
def test_push_events_applies_push_history_counts_and_last_seen(tmp_path, clock):
    events = [("u1", "a", T0 - 50, "view"), ("u1", "b", T0 - 40, "click"), ("u2", "a", T0 - 30, "purchase"),
              Event("u1", "a", T0 - 60.7, "add_to_cart"), ("u1", "c", T0 - 20, "interaction"),
              ("u1", "d", T0 - 10, "view")]
    with open_store(tmp_path / "s", clock=clock, max_history=3) as store:
        assert store.push_events(events[:3]) == 3
        assert store.push_events(events[3:]) == 3
        recs = store.user_records(["u1", "u2", "u3"])
    expected = []
    for _, item, _, _ in (e for e in events if e[0] == "u1"):
        expected = push_history(expected, [item], 3)
    assert recs[0] == {"user_id": "u1", "history": expected, "event_count": 5, "last_seen": T0 - 10,
                       "updated_at": T0}
    assert expected == ["d", "c", "a"]
    assert recs[1]["history"] == ["a"] and recs[1]["event_count"] == 1
    assert recs[2] == cold_start("u3")


@pytest.mark.parametrize("event, field, words", [
    (("", "a", T0, "view"), "user_id", "is empty"),
    (("u", "", T0, "view"), "item_id", "is empty"),
    (("u", 7, T0, "view"), "item_id", "must be a string"),
    (("u" * 600, "a", T0, "view"), "user_id", "longer than 511 bytes"),
    (("u", "a", -1, "view"), "timestamp", "not a valid unix time"),
    (("u", "a", math.nan, "view"), "timestamp", "not a valid unix time"),
    (("u", "a", "yesterday", "view"), "timestamp", "must be unix seconds"),
    (("u", "a", True, "view"), "timestamp", "must be unix seconds"),
    (("u", "a", T0 + 3 * 86_400, "view"), "timestamp", "in the future"),
    (("u", "a", T0, "like"), "event_type", "'like' is not one of"),
    (("u", "a", T0), "event", r"must be \(user_id, item_id, timestamp, event_type\)"),
])
def test_bad_events_are_refused_by_index_and_field_and_nothing_is_written(tmp_path, clock, event, field, words):
    with open_store(tmp_path / "s", clock=clock) as store:
        with pytest.raises(EventError, match=words) as info:
            store.push_events([("ok", "a", T0, "view"), event])
        assert info.value.index == 1 and info.value.field == field
        assert str(info.value).startswith(f"event 1: {field} ")
        assert store.user_records(["ok"])[0] == cold_start("ok")  # the good event was not applied either


def test_ttl_expired_values_read_as_missing_and_restart_from_cold(tmp_path, clock):
    with open_store(tmp_path / "s", clock=clock) as store:
        store.set_ttl("users", 60)
        store.push_events([("u1", "a", T0, "view"), ("u2", "b", T0, "view")])
        clock.now = T0 + 30
        store.push_events([("u2", "c", T0 + 30, "view")])  # u2 refreshed at T0+30
        clock.now = T0 + 60
        assert [r["history"] for r in store.user_records(["u1", "u2"])] == [["a"], ["c", "b"]]  # 60 s old: still fresh
        clock.now = T0 + 61
        assert store.user_records(["u1", "u2"]) == [cold_start("u1"), store.user_records(["u2"])[0]]
        batch = store.user_batch(["u1", "u2", "u3"])
        assert batch.found.tolist() == [False, True, False] and batch.expired.tolist() == [True, False, False]
        counts = store.counters()
        assert counts["users_expired"] == 2 and counts["users_missing"] == 1
        # An expired value is not the base of a new event: the user starts over.
        store.push_events([("u1", "z", T0 + 61, "view")])
        assert store.user_records(["u1"])[0]["history"] == ["z"]
        assert store.user_records(["u1"])[0]["event_count"] == 1
    with FeatureStore.open(tmp_path / "s", clock=clock) as store:  # the TTL is part of the stored schema
        assert store.view("users").ttl_s == 60


def test_counters_count_hits_and_cold_starts(tmp_path):
    with open_store(tmp_path / "s") as store:
        store.push_events([("u1", "a", T0, "view"), ("u2", "a", T0, "view")])
        store.user_records(["u1", "nobody", "u2", ""])
        c = store.counters()
    assert (c["users_reads"], c["users_hits"], c["users_missing"], c["users_expired"]) == (4, 2, 2, 0)
    assert c["events_pushed"] == 2 and c["push_calls"] == 1


def test_acknowledged_events_survive_a_killed_process(tmp_path):
    path = tmp_path / "s"
    code = f"""
import sys, time
from recserve.features.store import FeatureStore
store = FeatureStore.open({str(path)!r}, create=True)
assert store._env.flags()["sync"]  # commits are synced: acknowledged means on disk
for k in range(20):
    store.push_events([("u%d" % (k % 3), "i%d" % k, {T0} + k, "click")])
print("acked", flush=True)
time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "acked"
    finally:
        proc.kill()  # SIGKILL: no close, no atexit
        proc.wait()
    with FeatureStore.open(path) as store:
        recs = store.user_records(["u0", "u1", "u2"])
    assert [r["event_count"] for r in recs] == [7, 7, 6]
    assert recs[0]["history"][:3] == ["i18", "i15", "i12"] and recs[2]["last_seen"] == T0 + 17


# -- growth and concurrency ----------------------------------------------------------------
def test_the_map_grows_from_a_tiny_initial_size(tmp_path):
    with open_store(tmp_path / "s", map_size=64 << 10) as store:
        assert store.map_size() == 64 << 10
        for k in range(30):  # ~1 MB of histories: many doublings, never a MapFullError
            store.push_events([(f"u{u}", f"item-{k}-{u}", T0, "view") for u in range(100)])
        assert store.map_size() >= 256 << 10
        assert store.counters()["map_resizes"] >= 2
        recs = store.user_records([f"u{u}" for u in range(100)])
    assert all(r["event_count"] == 30 and r["history"][0] == f"item-29-{i}" for i, r in enumerate(recs))


def test_a_map_grown_by_another_process_is_adopted(tmp_path):
    path = tmp_path / "s"
    with open_store(path, map_size=64 << 10) as store:
        store.push_events([("u0", "a", T0, "view")])
        assert store.user_records(["u0"])[0]["history"] == ["a"]
        code = f"""
from recserve.features.store import FeatureStore
with FeatureStore.open({str(path)!r}, map_size=1 << 26) as s:
    for k in range(20):
        s.push_events([("u%d" % u, "x-%d-%d" % (k, u), {T0}, "view") for u in range(200)])
"""
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        assert (path / "data.mdb").stat().st_size > 64 << 10  # the data now lies beyond this process's map
        recs = store.user_records([f"u{u}" for u in range(200)])
        assert recs[0]["event_count"] == 21 and recs[199]["history"][0] == "x-19-199"
        store.push_events([("u0", "b", T0, "view")])  # and this process can write again
        assert store.user_records(["u0"])[0]["history"][0] == "b"


def test_readers_see_whole_batches_while_a_writer_pushes_and_the_map_grows(tmp_path):
    users = [f"u{i}" for i in range(16)]
    rounds, max_len = 120, 6
    store = open_store(tmp_path / "s", map_size=64 << 10, max_history=max_len)
    stop, failures, reads = threading.Event(), [], [0]

    def reader():
        previous = 0
        try:
            while not stop.is_set():
                recs = store.user_records(users)
                counts = {r["event_count"] for r in recs}
                # One read txn per batch: every user is at the same round.
                assert len(counts) == 1, counts
                n = counts.pop()
                assert n >= previous, (n, previous)  # never goes back in time
                previous = n
                for r in recs:
                    want = [f"{r['user_id']}-{k}" for k in range(n - 1, max(n - 1 - max_len, -1), -1)]
                    assert r["history"] == want, (r, want)
                reads[0] += 1
        except BaseException as e:  # reported by the main thread
            failures.append(e)

    def writer():
        for k in range(rounds):
            store.push_events([(u, f"{u}-{k}", T0 + k, "view") for u in users])

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    write = threading.Thread(target=writer)
    write.start()
    write.join(60)  # ~1 s normally; a writer starved by the readers would never finish
    starved = write.is_alive()
    stop.set()
    for t in threads + [write]:
        t.join(30)
    assert not starved, "the writer did not finish while readers were running"
    assert not failures, failures[0]
    assert reads[0] > 10
    assert store.counters()["map_resizes"] >= 1  # remaps happened under the readers
    assert {r["event_count"] for r in store.user_records(users)} == {rounds}
    store.close()


def test_a_reader_is_not_blocked_by_a_writer_holding_a_transaction(tmp_path):
    path = tmp_path / "s"
    with open_store(path) as store:
        store.push_events([("u1", "a", T0, "view")])
        holder = f"""
import lmdb, sys, time
env = lmdb.open({str(path)!r}, max_dbs=8)
users = env.open_db(b"users")
txn = env.begin(write=True)
txn.put(b"u1", b"uncommitted", db=users)
print("holding", flush=True)
time.sleep(60)
"""
        proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "holding"
            t0 = time.monotonic()
            rec = store.user_records(["u1"])[0]
            assert time.monotonic() - t0 < 1.0
            assert rec["history"] == ["a"]  # the committed value, never the uncommitted one
        finally:
            proc.kill()
            proc.wait()
        store.push_events([("u1", "b", T0, "view")])  # the dead writer's lock is recovered
        assert store.user_records(["u1"])[0]["history"] == ["b", "a"]


def test_user_batch_is_the_columnar_form_of_user_records(tmp_path):
    with open_store(tmp_path / "s") as store:
        store.push_events([("u1", "a", T0, "view"), ("u1", "b", T0 + 1, "view"), ("u3", "c", T0 + 2, "view")])
        batch = store.user_batch(["u1", "u2", "u3"])
        assert batch.found.tolist() == [True, False, True]
        assert batch.history_offsets.tolist() == [0, 2, 2, 3]
        assert batch.vocab[batch.history_codes].tolist() == ["b", "a", "c"]
        assert batch.event_count.tolist() == [2, 0, 1] and batch.last_seen.tolist() == [T0 + 1, 0, T0 + 2]
        assert batch.records() == store.user_records(["u1", "u2", "u3"])
        assert np.asarray(batch.history_codes).dtype == np.uint32
