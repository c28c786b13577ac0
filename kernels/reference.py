"""Plain NumPy implementations of every recserve kernel: the specification.

Usage::

    from recserve.kernels import reference as ref
    ids = ref.hash_features(["user_id=1", "item_id=7"], seed=0, num_buckets=1 << 20)

These functions are slow on purpose (clear Python, no tricks). The native kernels in
``recserve.kernels`` must return the same values; the test suite checks them against
this module on every device present. Argument validation lives in the native code;
this module assumes well-formed input. Each op's ``validate`` keyword (the kernels'
"the caller guarantees valid values": no device synchronisation) does not change the
function computed on valid input, so here it is accepted and has no effect.
"""

from __future__ import annotations

import numpy as np

_MASK32 = 0xFFFFFFFF


def _rotl32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _MASK32


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    h ^= h >> 16
    return h


def murmur3_32(data: bytes | str, seed: int = 0) -> int:
    """MurmurHash3_x86_32 of ``data`` (str is hashed as UTF-8), as an unsigned int."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    c1, c2 = 0xCC9E2D51, 0x1B873593
    h = seed & _MASK32
    nblocks = len(data) // 4
    for i in range(nblocks):
        k = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        k = (k * c1) & _MASK32
        k = _rotl32(k, 15)
        k = (k * c2) & _MASK32
        h ^= k
        h = _rotl32(h, 13)
        h = (h * 5 + 0xE6546B64) & _MASK32
    tail = data[4 * nblocks :]
    k = 0
    if len(tail) >= 3:
        k ^= tail[2] << 16
    if len(tail) >= 2:
        k ^= tail[1] << 8
    if len(tail) >= 1:
        k ^= tail[0]
        k = (k * c1) & _MASK32
        k = _rotl32(k, 15)
        k = (k * c2) & _MASK32
        h ^= k
    h ^= len(data)
    return _fmix32(h)


def hash_features(tokens, *, seed: int, num_buckets: int, validate: bool = True) -> np.ndarray:
    """``murmur3_32(utf8(token), seed) % num_buckets`` for each token, as int64[n].

    ``tokens`` is a sequence of str/bytes, or the flat form ``(data uint8[M], offsets
    int64[n + 1])`` where token i is ``data[offsets[i]:offsets[i + 1]]``.
    """
    if isinstance(tokens, tuple) and len(tokens) == 2 and all(
        isinstance(t, np.ndarray) for t in tokens
    ):
        data, offsets = tokens
        raw = data.tobytes()
        tokens = [raw[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    out = np.empty(len(tokens), dtype=np.int64)
    for i, tok in enumerate(tokens):
        if isinstance(tok, np.str_):
            tok = str(tok)
        elif isinstance(tok, np.bytes_):
            tok = bytes(tok)
        out[i] = murmur3_32(tok, seed) % num_buckets
    return out


def embedding_bag(table, indices, offsets, *, mode: str = "sum", weights=None,
                  validate: bool = True) -> np.ndarray:
    """Pooled rows: ``out[b] = reduce(table[indices[offsets[b]:offsets[b + 1]]])``.

    ``sum`` adds the rows (each scaled by ``weights[j]`` when given); ``mean`` divides
    the sum by the bag size. An empty bag pools to zeros. Accumulates in float32.
    """
    table = np.asarray(table)
    num_bags = len(offsets) - 1
    out = np.zeros((num_bags, table.shape[1]), dtype=np.float32)
    for b in range(num_bags):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        acc = np.zeros(table.shape[1], dtype=np.float32)
        for j in range(lo, hi):
            row = table[indices[j]].astype(np.float32)
            w = np.float32(1.0) if weights is None else np.float32(weights[j])
            acc += w * row
        if mode == "mean" and hi > lo:
            acc /= np.float32(hi - lo)
        out[b] = acc
    return out


def topk_inner_product(queries, items, k: int, *, exclude_indptr=None, exclude_ids=None,
                       validate: bool = True):
    """Top-k items by inner product for each query, as ``(scores float32[B, k], ids int64[B, k])``.

    Scores are sorted descending with ties broken by the smaller item id. Items listed
    for query b in ``exclude_ids[exclude_indptr[b]:exclude_indptr[b + 1]]`` are never
    returned, and neither is an item whose score is NaN or -inf. When fewer than k
    items are eligible, the tail holds id -1 and score -inf.

    This spec scores in float64 and rounds once; the kernels accumulate in float32
    (in an order of their choosing). The two agree exactly when every partial sum is
    exact in float32 (e.g. small-integer data, as the parity tests use) and within
    float32 rounding otherwise — so near-ties may order differently, and a dot
    product whose float32 partial sums overflow differs (inf instead of a finite
    value). -0.0 and +0.0 compare equal and may come back as either.
    """
    queries = np.asarray(queries, dtype=np.float32)
    items = np.asarray(items)
    num_queries, num_items = queries.shape[0], items.shape[0]
    scores_out = np.full((num_queries, k), -np.inf, dtype=np.float32)
    ids_out = np.full((num_queries, k), -1, dtype=np.int64)
    all_scores = (queries.astype(np.float64) @ items.astype(np.float64).T).astype(np.float32)
    for b in range(num_queries):
        scores = all_scores[b]
        eligible = np.isfinite(scores) | (scores == np.inf)
        if exclude_indptr is not None:
            excluded = exclude_ids[exclude_indptr[b] : exclude_indptr[b + 1]]
            eligible[np.asarray(excluded, dtype=np.int64)] = False
        ids = np.nonzero(eligible)[0]
        # lexsort: last key is primary -> score descending, then id ascending.
        order = np.lexsort((ids, -scores[ids]))[:k]
        n = len(order)
        scores_out[b, :n] = scores[ids[order]]
        ids_out[b, :n] = ids[order]
    return scores_out, ids_out
