"""CSR helpers shared by feature encoding, history derivation, splits and evaluation.

A bag list is ``(values, offsets)`` with ``offsets[b]:offsets[b+1]`` the values of bag b,
the layout ``recserve.kernels.embedding_bag`` takes.
"""

from __future__ import annotations

import numpy as np


def take_bags(bags: tuple[np.ndarray, np.ndarray], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bags of ``rows`` (any order, repeats allowed) as a new CSR pair."""
    values, offsets = bags
    rows = np.asarray(rows, dtype=np.int64)
    starts, lens = offsets[rows], offsets[rows + 1] - offsets[rows]
    out_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=out_offsets[1:])
    gather = np.repeat(starts - out_offsets[:-1], lens) + np.arange(out_offsets[-1])
    return values[gather], out_offsets


def group_pairs(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (key, value) pairs grouped by key -> (sorted keys, offsets, values)."""
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64)
    pairs = np.unique(np.stack([np.asarray(keys, np.int64), np.asarray(values, np.int64)], 1), axis=0)
    uniq, first = np.unique(pairs[:, 0], return_index=True)
    return uniq, np.r_[first, len(pairs)].astype(np.int64), pairs[:, 1].copy()


def find_sorted(vocabulary: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``values`` in the sorted ``vocabulary`` and whether each is present."""
    if len(vocabulary) == 0:
        return np.zeros(len(values), np.int64), np.zeros(len(values), bool)
    pos = np.minimum(np.searchsorted(vocabulary, values), len(vocabulary) - 1)
    return pos.astype(np.int64), vocabulary[pos] == values
