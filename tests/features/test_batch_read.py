"""The batch read path: the whole-batch decode (one-size and mixed-size values, missing and
expired users) against a per-value reference, corrupt values, lookups, and the reader gate."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from recserve.features.encoding import ENCODING_VERSION, EVENT_COUNT, HISTORY, LAST_SEEN
from recserve.features.store import FeatureStore, StoreError, _Gate, cold_start
from tests.features.conftest import T0

MAX = 6


def reference(store: FeatureStore, user_ids, values, now: float, vocab: dict[int, str]) -> list[dict]:
    """What user_records must return, one value at a time through View.decode."""
    view = store.view("users")
    out = []
    for u, v in zip(user_ids, values):
        if v is None:
            out.append(cold_start(u))
            continue
        rec, updated_at = view.decode(v)
        if view.ttl_s and updated_at < now - view.ttl_s:
            out.append(cold_start(u))
            continue
        out.append({"user_id": u, HISTORY: [vocab[c] for c in rec[HISTORY]], EVENT_COUNT: rec[EVENT_COUNT],
                    LAST_SEEN: rec[LAST_SEEN], "updated_at": updated_at})
    return out


def fill(store: FeatureStore, lengths: dict[str, int], clock) -> dict[int, str]:
    """Users with histories of the given lengths, user j written 10 j seconds ago; code -> id."""
    items = [f"I{i}" for i in range(40)]
    codes = store.assign_item_codes(items)
    view, rng = store.view("users"), np.random.default_rng(len(lengths))
    pairs = []
    for j, (u, n) in enumerate(lengths.items()):
        hist = codes[rng.choice(len(items), n, replace=False)]
        pairs.append((u.encode(), view.encode({HISTORY: hist, EVENT_COUNT: 3 * n + 1, LAST_SEEN: T0 + j},
                                              int(clock.now) - 10 * j)))
    store.bulk_put("users", pairs)
    return dict(zip(codes.tolist(), items))


@pytest.mark.parametrize("shape", ["one size", "mixed sizes", "empty histories"])
def test_batch_decode_equals_the_per_value_decode(tmp_path, clock, shape):
    users = [f"u{i}" for i in range(12)]
    lengths = {u: {"one size": MAX, "mixed sizes": i % (MAX + 1), "empty histories": 0}[shape]
               for i, u in enumerate(users)}
    with FeatureStore.open(tmp_path / "s", create=True, max_history=MAX, clock=clock) as store:
        vocab = fill(store, lengths, clock)
        batches = [users, users[::-1], users[:1], [], users + ["nobody"], ["x", *users[3:7], "y", "x"],
                   users[2:5] * 3, ["nobody", "nobody"]]
        for ttl in (0, 55):  # 55 s: users 6.. (written 60 s or more ago) have expired
            if ttl:
                store.set_ttl("users", ttl)
            for batch in batches:
                values = store.get_values("users", [u.encode() for u in batch])
                want = reference(store, batch, values, clock.now, vocab)
                assert store.user_records(batch) == want
                assert store.decode_users(batch, values).records() == want  # the benchmark's Redis path
                cols = store.user_batch(batch)
                assert cols.history_offsets.tolist() == np.cumsum([0] + [len(r[HISTORY]) for r in want]).tolist()
                assert cols.vocab[cols.history_codes].tolist() == [i for r in want for i in r[HISTORY]]
                assert cols.found.tolist() == [r["updated_at"] is not None for r in want]
                assert cols.event_count.tolist() == [r[EVENT_COUNT] for r in want]
                assert cols.history_codes.dtype == np.uint32 and cols.event_count.dtype == np.int64
                assert all(a.flags.c_contiguous for a in (cols.event_count, cols.last_seen, cols.updated_at))


def test_counters_of_batches_with_missing_and_expired_users(tmp_path, clock):
    with FeatureStore.open(tmp_path / "s", create=True, max_history=MAX, clock=clock) as store:
        fill(store, {f"u{i}": MAX for i in range(8)}, clock)
        store.set_ttl("users", 35)  # u4.. were written 40 s or more ago
        store.user_records(["u0", "u1", "u5", "nobody", "u0"])
        c = store.counters()
    assert (c["users_reads"], c["users_hits"], c["users_missing"], c["users_expired"]) == (5, 3, 1, 1)


def test_corrupt_values_fail_the_read_with_one_line(tmp_path, clock):
    with FeatureStore.open(tmp_path / "s", create=True, max_history=MAX, clock=clock) as store:
        fill(store, {"u1": 2, "u2": 2}, clock)
        good = store.get_values("users", [b"u1"])[0]
        cases = {
            b"short": good[:7],  # shorter than the prefix
            b"odd": good + b"\x00",  # not a whole number of codes
            b"long": good[:-4],  # the length field says one more code than there is
            b"newer": bytes([ENCODING_VERSION + 1]) + good[1:],
        }
        store.bulk_put("users", list(cases.items()))
        for key, words in ((b"short", "length"), (b"odd", "length"), (b"long", "length"), (b"newer", "version")):
            for batch in (["u1", key.decode()], [key.decode(), key.decode()], ["u1", "u2", key.decode(), "nobody"]):
                with pytest.raises(StoreError) as err:
                    store.user_records(batch)
                assert len(str(err.value).splitlines()) == 1 and words in str(err.value), (key, str(err.value))


def test_get_values_is_aligned_with_the_keys(tmp_path):
    with FeatureStore.open(tmp_path / "s", create=True) as store:
        store.push_events([("u1", "a", T0, "view"), ("u2", "b", T0, "view")])
        v1, v2 = store.get_values("users", [b"u1", b"u2"])
        assert v1 and v2 and v1 != v2
        got = store.get_values("users", [b"u2", b"", b"nobody", b"u1", b"x" * 600, b"u2"])
        assert got == [v2, None, None, v1, None, v2]
        assert store.get_values("users", []) == []


def test_the_gate_lets_readers_in_together_and_closes_for_one_remap():
    gate, log, inside = _Gate(), [], threading.Event()
    gate.enter()
    gate.enter()  # readers do not exclude each other

    def closer():
        with gate.exclusive():
            log.append("remap")

    def late_reader():
        inside.wait(5)
        gate.enter()
        log.append("late reader")
        gate.exit()

    c, r = threading.Thread(target=closer), threading.Thread(target=late_reader)
    c.start()
    deadline = time.monotonic() + 5
    while not gate._closed and time.monotonic() < deadline:
        time.sleep(0.001)
    assert gate._closed and not log  # the closer waits for the two readers
    r.start()
    inside.set()
    time.sleep(0.05)
    assert not log  # a new reader waits while the gate is closed
    gate.exit()
    time.sleep(0.02)
    assert not log
    gate.exit()  # the last reader leaves: the remap runs, then the late reader
    c.join(5)
    r.join(5)
    assert log == ["remap", "late reader"]
