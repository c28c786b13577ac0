"""The Recommend computation for a batch of queries against one loaded model version.

    source = RequestFeatures()                          # the feature seam
    results = recommend_batch(model, source, queries)   # one result per query, in order

Pipeline: features (``FeatureSource.user_features``) -> ``RetrievalModel``: hash ->
embedding_bag on memory-mapped tables -> engine -> topk_inner_product with each query's
exclusions. Each stage's start and end are recorded once per batch (``Result.stages``)
for the per-stage metrics and trace spans. Queries of one batch may ask for different k: the batch runs at the largest
k and each result is cut to its own.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from recserve.server.retrieval import RetrievalModel
from recserve.features.history import HISTORY_SOURCE
from recserve.features.spec import FeatureValueError
from recserve.server.errors import InvalidRequest


@dataclass(frozen=True)
class Query:
    user_id: str
    k: int
    context: Mapping[str, str] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    recent_items: tuple[str, ...] = ()


@dataclass(frozen=True)
class Result:
    item_ids: list[str]
    scores: list[float]
    # The batch's pipeline stages: (name, start ns, end ns), shared by its results (tracing).
    stages: list = field(default_factory=list, compare=False, repr=False)


class FeatureSource(Protocol):
    """Where a user's raw features come from: the request (``RequestFeatures``) or the
    LMDB feature store (``features.serving.StoreFeatures``)."""

    def user_features(self, queries: Sequence[Query], spec=None) -> tuple[list[dict], dict]:
        """(records, bags): bags some of ``spec``'s user fields already have (taken as they
        are by ``FeatureSpec.encode``), raw records (keyed by field source) for the rest.
        No spec: every field from the records."""
        ...


class RequestFeatures:
    """Features carried by the request: context values, the user id, recent items."""

    def user_features(self, queries: Sequence[Query], spec=None) -> tuple[list[dict], dict]:
        return [{**q.context, "user_id": q.user_id, HISTORY_SOURCE: list(q.recent_items)} for q in queries], {}


def recommend_batch(model: RetrievalModel, source: FeatureSource, queries: Sequence[Query]) -> list[Result]:
    t0 = time.time_ns()
    # Bags from the source only for a model that encodes on the host (the GPU model
    # tokenises records itself).
    records, bags = source.user_features(queries, model.spec if model.takes_bags else None)
    stages = [("features", t0, time.time_ns())]
    k = max(q.k for q in queries)
    exclude = [q.exclude for q in queries] if any(q.exclude for q in queries) else None
    try:
        ranked = model.recommend(records, k, exclude=exclude, stages=stages, bags=bags)
    except FeatureValueError as e:  # e.g. a number-valued context field sent "abc"
        raise InvalidRequest(str(e)) from None
    return [Result(ids[: q.k], scores[: q.k], stages) for q, (ids, scores) in zip(queries, ranked)]
