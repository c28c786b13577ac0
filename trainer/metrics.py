"""Ranking metrics over held-out items: recall@k, NDCG@k, MRR (binary relevance).

    m = retrieval_metrics(topk_rows, test_indptr, test_items, ks=(10, 20))
    # {"recall@10": ..., "ndcg@10": ..., "recall@20": ..., "ndcg@20": ..., "mrr@20": ...}

``topk_rows[u]`` is the ranked list for test user u (-1 pads); the relevant set of user u
is ``test_items[test_indptr[u]:test_indptr[u+1]]`` (distinct items). recall@k is the
fraction of the relevant set in the top k (averaged over users); NDCG@k uses the ideal
DCG of min(k, |relevant|) hits; MRR is the mean reciprocal rank of the first relevant item
within the list (0 when none is in it), so it is MRR@len(list).
"""

from __future__ import annotations

import numpy as np


def _hits(topk_rows: np.ndarray, test_indptr: np.ndarray, test_items: np.ndarray) -> np.ndarray:
    """bool [U, K]: is the item at rank r relevant for user u."""
    n_users, k = topk_rows.shape
    owner = np.repeat(np.arange(n_users), np.diff(test_indptr))
    # Encode (user, item) pairs as one int64 key so membership is one np.isin.
    width = int(max(topk_rows.max(initial=0), test_items.max(initial=0))) + 2
    relevant = owner * width + test_items
    ranked = np.arange(n_users)[:, None] * width + np.where(topk_rows < 0, width - 1, topk_rows)
    return np.isin(ranked, relevant)


def retrieval_metrics(topk_rows: np.ndarray, test_indptr: np.ndarray, test_items: np.ndarray,
                      ks: tuple[int, ...]) -> dict:
    topk_rows = np.asarray(topk_rows)
    if topk_rows.shape[1] < max(ks):
        raise ValueError(f"ranked lists have {topk_rows.shape[1]} items, fewer than k={max(ks)}")
    hits = _hits(topk_rows, test_indptr, test_items)
    n_relevant = np.diff(test_indptr)
    discount = 1.0 / np.log2(np.arange(2, topk_rows.shape[1] + 2))
    out = {}
    for k in sorted(ks):
        h = hits[:, :k]
        out[f"recall@{k}"] = float(np.mean(h.sum(1) / n_relevant))
        ideal = np.cumsum(discount[:k])[np.minimum(n_relevant, k) - 1]
        out[f"ndcg@{k}"] = float(np.mean((h * discount[:k]).sum(1) / ideal))
    first = np.where(hits.any(1), hits.argmax(1) + 1, np.inf)
    out[f"mrr@{topk_rows.shape[1]}"] = float(np.mean(1.0 / first))
    return out
