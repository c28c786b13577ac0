"""Python clients for recserve.v1.RecommendService (sync and asyncio), with typed results.

    with RecommendClient("localhost:8500") as client:
        rec = client.recommend("retail", "17850", k=10, recent_items=["85123A"], timeout=1.0)
        for item_id, score in rec: ...
        recs = client.batch_recommend("retail", ["17850", "13047"], k=10)

    async with AsyncRecommendClient("localhost:8500", ChannelOptions(tls_ca="ca.pem")) as client:
        rec = await client.recommend("retail", "17850", k=10)
        recs = await client.batch_recommend("retail", ["17850", "13047"], k=10)

``ChannelOptions`` (clients/channel.py) sets TLS, retries (UNAVAILABLE only, with
backoff), keepalive and message sizes. Errors surface as ``grpc.RpcError`` with the
server's status code and message.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import grpc

from recserve.clients.channel import ChannelOptions, make_channel
from recserve.v1 import recommend_pb2, recommend_pb2_grpc


@dataclass(frozen=True)
class Recommendation:
    item_ids: list[str]
    scores: list[float]
    model: str
    version: int
    variant: str

    def __iter__(self) -> Iterator[tuple[str, float]]:
        return iter(zip(self.item_ids, self.scores))

    @classmethod
    def from_proto(cls, r) -> Recommendation:
        return cls(list(r.item_ids), list(r.scores), r.model, r.version, r.variant)


def _request(model: str, user_id: str, k: int, context: Mapping[str, str] | None, exclude: Sequence[str] | None,
             recent_items: Sequence[str] | None, version: int | None, variant: str | None = None):
    return recommend_pb2.RecommendRequest(
        model=model, user_id=user_id, k=k, context=dict(context or {}), exclude_item_ids=list(exclude or ()),
        recent_item_ids=list(recent_items or ()), version=version, variant=variant)


def _batch_request(model: str, user_ids: Sequence[str], k: int, recent_items) -> recommend_pb2.BatchRecommendRequest:
    histories = recent_items if recent_items is not None else [None] * len(user_ids)
    if len(histories) != len(user_ids):
        raise ValueError(f"recent_items has {len(histories)} lists for {len(user_ids)} users")
    return recommend_pb2.BatchRecommendRequest(
        requests=[_request(model, u, k, None, None, h, None) for u, h in zip(user_ids, histories)])


class RecommendClient:
    def __init__(self, target: str, options: ChannelOptions | None = None, channel: grpc.Channel | None = None):
        self._channel = channel or make_channel(target, options)
        self._stub = recommend_pb2_grpc.RecommendServiceStub(self._channel)

    def recommend(self, model: str, user_id: str, k: int = 10, *, context=None, exclude=None, recent_items=None,
                  version: int | None = None, variant: str | None = None,
                  timeout: float | None = None) -> Recommendation:
        request = _request(model, user_id, k, context, exclude, recent_items, version, variant)
        return Recommendation.from_proto(self._stub.Recommend(request, timeout=timeout))

    def batch_recommend(self, model: str, user_ids: Sequence[str], k: int = 10, *, recent_items=None,
                        timeout: float | None = None) -> list[Recommendation]:
        """``recent_items``: one list per user (or None)."""
        request = _batch_request(model, user_ids, k, recent_items)
        return [Recommendation.from_proto(r) for r in self._stub.BatchRecommend(request, timeout=timeout).responses]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RecommendClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncRecommendClient:
    def __init__(self, target: str, options: ChannelOptions | None = None, channel: grpc.aio.Channel | None = None):
        self._channel = channel or make_channel(target, options, aio=True)
        self._stub = recommend_pb2_grpc.RecommendServiceStub(self._channel)

    async def recommend(self, model: str, user_id: str, k: int = 10, *, context=None, exclude=None,
                        recent_items=None, version: int | None = None, variant: str | None = None,
                        timeout: float | None = None) -> Recommendation:
        request = _request(model, user_id, k, context, exclude, recent_items, version, variant)
        return Recommendation.from_proto(await self._stub.Recommend(request, timeout=timeout))

    async def batch_recommend(self, model: str, user_ids: Sequence[str], k: int = 10, *, recent_items=None,
                              timeout: float | None = None) -> list[Recommendation]:
        request = _batch_request(model, user_ids, k, recent_items)
        reply = await self._stub.BatchRecommend(request, timeout=timeout)
        return [Recommendation.from_proto(r) for r in reply.responses]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncRecommendClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
