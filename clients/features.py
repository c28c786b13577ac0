"""Python client for recserve.v1.FeatureService: live events into the server's feature store.

    with FeatureClient("localhost:8500") as features:
        features.push([("17850", "85123A", time.time(), "click")])      # durable when it returns
        features.stream([[...], [...]])                                 # batches over one stream
    async with AsyncFeatureClient("localhost:8500") as features:
        await features.push(events)

An event is ``(user_id, item_id, unix seconds, event_type)``; event_type is one of
interaction, view, click, add_to_cart, purchase. Errors surface as ``grpc.RpcError``
(INVALID_ARGUMENT names the bad event; nothing of that call is written).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc

from recserve.clients.channel import ChannelOptions, make_channel
from recserve.v1 import feature_service_pb2 as pb
from recserve.v1 import feature_service_pb2_grpc


def _request(events: Iterable[Sequence]) -> pb.PushEventsRequest:
    return pb.PushEventsRequest(events=[
        pb.Event(user_id=e[0], item_id=e[1], timestamp=float(e[2]), event_type=e[3] if len(e) > 3 else "")
        for e in events])


class FeatureClient:
    def __init__(self, target: str, options: ChannelOptions | None = None, channel: grpc.Channel | None = None):
        self._channel = channel or make_channel(target, options)
        self._stub = feature_service_pb2_grpc.FeatureServiceStub(self._channel)

    def push(self, events: Iterable[Sequence], timeout: float | None = None) -> int:
        """Returns the number of events written."""
        return self._stub.PushEvents(_request(events), timeout=timeout).accepted

    def stream(self, batches: Iterable[Iterable[Sequence]], timeout: float | None = None) -> int:
        return self._stub.StreamEvents((_request(b) for b in batches), timeout=timeout).accepted

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> FeatureClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncFeatureClient:
    def __init__(self, target: str, options: ChannelOptions | None = None, channel: grpc.aio.Channel | None = None):
        self._channel = channel or make_channel(target, options, aio=True)
        self._stub = feature_service_pb2_grpc.FeatureServiceStub(self._channel)

    async def push(self, events: Iterable[Sequence], timeout: float | None = None) -> int:
        return (await self._stub.PushEvents(_request(events), timeout=timeout)).accepted

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncFeatureClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
