"""History derivation: batch (per event, at end) and live updates agree with one definition."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from recserve.features.history import history_at_end, history_before_events, push_history, sort_events


def brute_force(user, item, max_len):
    """Replay push_history event by event: the live-update definition."""
    before, at_end, state, prev = [], {}, [], None
    for u, i in zip(user.tolist(), item.tolist()):
        if u != prev:
            state, prev = [], u
        before.append(state)
        state = push_history(state, [i], max_len)
        at_end[u] = state
    return before, at_end


def test_push_history_is_distinct_newest_first_bounded():
    assert push_history(["c", "b", "a"], ["a", "d"], max_len=3) == ["d", "a", "c"]
    assert push_history([], ["x", "x", "y"], max_len=5) == ["y", "x"]


events = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 8)), max_size=200)


@given(events, st.integers(1, 6), st.sampled_from([8, 64, 1 << 20]))
def test_batch_derivation_equals_live_updates(pairs, max_len, chunk):
    pairs = sorted(pairs, key=lambda p: p[0])  # grouped by user, file order within
    user = np.array([p[0] for p in pairs], dtype=np.int64)
    item = np.array([p[1] for p in pairs], dtype=np.int64)
    before, at_end = brute_force(user, item, max_len)
    idx, off = history_before_events(user, item, max_len, chunk=chunk)
    assert len(off) == len(user) + 1
    assert [idx[off[k]:off[k + 1]].tolist() for k in range(len(user))] == before
    idx, off, users = history_at_end(user, item, max_len, chunk=chunk)
    assert {u: idx[off[k]:off[k + 1]].tolist() for k, u in enumerate(users.tolist())} == at_end


def test_long_repeat_runs_need_a_wider_window():
    # 300 repeats of one item then 3 others: the 3 distinct items before the end lie far back.
    item = np.array([1, 2, 3] + [9] * 300, dtype=np.int64)
    user = np.zeros(len(item), dtype=np.int64)
    idx, off, _ = history_at_end(user, item, max_len=4)
    assert idx.tolist() == [9, 3, 2, 1]


def test_sort_events_orders_by_user_then_time_then_file_order():
    user = np.array([1, 0, 1, 0, 1])
    ts = np.array([5, 9, 5, 1, 2])
    assert sort_events(user, ts).tolist() == [3, 1, 4, 0, 2]
