"""Recent-item history derived from an interaction log: the one definition of "history".

A user's history at a point in time is their last ``max_len`` *distinct* items, newest
first; an item seen again moves to the front. The trainer uses the history before each
training event, the feature store (and the model's golden requests) the history after a
user's last event, and live events update a stored history with ``push_history`` — all
three agree by construction (a test checks it).

    order = sort_events(user_codes, timestamps)              # by user, time, file order
    idx, off = history_before_events(users[order], items[order], max_len=50)
    idx, off, users = history_at_end(users[order], items[order], max_len=50)

Arrays are integer codes; ``idx`` holds item codes, ``off`` CSR offsets (one bag per event
or per user). Vectorised with NumPy; memory is bounded by ``chunk`` x window.
"""

from __future__ import annotations

import numpy as np

from recserve.features.csr import take_bags

# The raw-record key (a field's ``source``) under which a user's history travels.
HISTORY_SOURCE = "history"


def sort_events(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """Stable order by (user, timestamp); equal timestamps keep file order."""
    return np.lexsort((np.arange(len(user)), timestamp, user))


def _next_same(user: np.ndarray, item: np.ndarray) -> np.ndarray:
    """For each event, the position of the same user's next event with the same item (or n)."""
    n = len(user)
    order = np.lexsort((np.arange(n), item, user))
    nxt = np.full(n, n, dtype=np.int64)
    same = (user[order[1:]] == user[order[:-1]]) & (item[order[1:]] == item[order[:-1]])
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


def _user_starts(user: np.ndarray) -> np.ndarray:
    """Position of the first event of each event's user (events grouped by user)."""
    n = len(user)
    boundary = np.r_[True, user[1:] != user[:-1]] if n else np.zeros(0, bool)
    return np.maximum.accumulate(np.where(boundary, np.arange(n), 0)) if n else np.zeros(0, np.int64)


def _recent_distinct(item, nxt, query, start, max_len, chunk):
    """Bags of the last max_len distinct items strictly before each query position.

    Scans a window of earlier events per query; the few queries whose window neither
    reaches the user's first event nor holds max_len distinct items are retried with a
    wider one, so the result is exact whatever the repeat rate.
    """
    pieces = []  # (query rows, counts, items newest first) per processed block
    pending = np.arange(len(query))
    window = max(2 * max_len, 8)
    while len(pending):
        rows_per_block = max(1, chunk // window)
        unfinished = []
        for lo in range(0, len(pending), rows_per_block):
            sel = pending[lo : lo + rows_per_block]
            q, s = query[sel], start[sel]
            cand = q[:, None] - 1 - np.arange(window)[None, :]  # newest first
            inside = cand >= s[:, None]
            # j is the newest occurrence of its item before q iff its next occurrence is >= q
            valid = inside & (nxt[np.where(inside, cand, 0)] >= q[:, None])
            take = valid & (np.cumsum(valid, axis=1) <= max_len)
            n_taken = take.sum(axis=1)
            done = (q - window <= s) | (n_taken >= max_len)
            pieces.append((sel[done], n_taken[done], item[cand[done][take[done]]]))
            unfinished.append(sel[~done])
        pending = np.concatenate(unfinished)
        window *= 4
    if not pieces:
        return np.zeros(0, np.int64), np.zeros(1, np.int64)
    rows = np.concatenate([p[0] for p in pieces])
    counts = np.concatenate([p[1] for p in pieces])
    flat = np.concatenate([p[2] for p in pieces]).astype(np.int64)
    # Bags are in processing order; put them in query order.
    return take_bags((flat, np.r_[0, np.cumsum(counts)]), np.argsort(rows, kind="stable"))


def history_before_events(user: np.ndarray, item: np.ndarray, max_len: int, at: np.ndarray | None = None,
                          chunk: int = 1 << 22):
    """History before each event (events sorted with ``sort_events``) -> (items, offsets).

    ``at[e]`` (default ``e``) is the position whose history event e gets, e.g. the first
    event of e's basket so that a basket's items do not see each other.
    """
    user, item = np.asarray(user), np.asarray(item)
    if max_len <= 0:
        return np.zeros(0, np.int64), np.zeros(len(user) + 1, np.int64)
    nxt = _next_same(user, item)
    query = np.arange(len(user), dtype=np.int64) if at is None else np.asarray(at, dtype=np.int64)
    return _recent_distinct(item, nxt, query, _user_starts(user), max_len, chunk)


def history_at_end(user: np.ndarray, item: np.ndarray, max_len: int, chunk: int = 1 << 22):
    """History after each user's last event -> (items, offsets, user code per bag)."""
    user, item = np.asarray(user), np.asarray(item)
    n = len(user)
    last = np.flatnonzero(np.r_[user[1:] != user[:-1], True]) if n else np.zeros(0, np.int64)
    if max_len <= 0:
        return np.zeros(0, np.int64), np.zeros(len(last) + 1, np.int64), user[last]
    nxt = _next_same(user, item)
    starts = _user_starts(user)[last]
    idx, off = _recent_distinct(item, nxt, last + 1, starts, max_len, chunk)
    return idx, off, user[last]


def push_history(history: list, items: list, max_len: int) -> list:
    """Live update: ``items`` (oldest first) applied to a newest-first history."""
    out = list(history)
    for it in items:
        if it in out:
            out.remove(it)
        out.insert(0, it)
    return out[:max_len]
