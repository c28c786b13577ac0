"""Ranking metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.trainer.metrics import retrieval_metrics


def test_hand_computed_values():
    topk = np.array([[5, 3, 9, 1], [2, 4, 6, -1], [7, 8, 0, 1]])
    indptr = np.array([0, 1, 3, 4])
    items = np.array([3, 6, 4, 11])  # user0: {3}; user1: {6, 4}; user2: {11} (never retrieved)
    m = retrieval_metrics(topk, indptr, items, ks=(1, 2, 4))
    assert m["recall@1"] == pytest.approx(0.0)
    assert m["recall@2"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["recall@4"] == pytest.approx((1 + 1 + 0) / 3)
    d = 1 / np.log2(np.arange(2, 6))
    ndcg2 = (d[1] / d[0] + d[1] / (d[0] + d[1]) + 0) / 3
    assert m["ndcg@2"] == pytest.approx(ndcg2)
    ndcg4 = (d[1] / d[0] + (d[1] + d[2]) / (d[0] + d[1]) + 0) / 3
    assert m["ndcg@4"] == pytest.approx(ndcg4)
    assert m["mrr@4"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)


def test_perfect_ranking_scores_one():
    topk = np.array([[1, 2, 3], [4, 5, 6]])
    m = retrieval_metrics(topk, np.array([0, 2, 3]), np.array([1, 2, 4]), ks=(3,))
    assert m["recall@3"] == 1.0 and m["ndcg@3"] == pytest.approx(1.0) and m["mrr@3"] == 1.0


def test_lists_shorter_than_k_are_refused():
    with pytest.raises(ValueError, match="fewer than k=5"):
        retrieval_metrics(np.zeros((1, 3), int), np.array([0, 1]), np.array([0]), ks=(5,))
