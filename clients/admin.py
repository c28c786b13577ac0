"""Python client for recserve.v1.ModelService (model administration), with typed results.

    with ModelClient("localhost:8500", token=open("admin-token").read().strip()) as admin:
        for model in admin.list_models():
            print(model.name, model.serving_version, [(v.version, v.state, v.reason) for v in model.versions])
        admin.load("retail", version=3)             # pin version 3 (rollback)
        admin.load("retail")                        # unpin, rescan, apply the version policy
        admin.unload("retail", 2)
        admin.set_traffic("retail", [{"name": "a", "version": 3, "weight": 90},
                                     {"name": "b", "version": 4, "weight": 10}], salt="exp-1")
        admin.set_traffic("retail", [])             # back to serving.json's split

Errors surface as ``grpc.RpcError`` (UNAUTHENTICATED without a valid token, PERMISSION_DENIED
when the server has no admin token configured).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc

from recserve.clients.channel import ChannelOptions, make_channel
from recserve.v1 import model_service_pb2 as pb
from recserve.v1 import model_service_pb2_grpc


@dataclass(frozen=True)
class VersionState:
    version: int
    state: str  # LOADING | READY | UNAVAILABLE | UNLOADING
    reason: str


@dataclass(frozen=True)
class ModelState:
    name: str
    versions: list[VersionState]
    serving_version: int  # 0: nothing READY
    pinned_version: int | None
    traffic: dict  # {"salt", "variants": [...], "shadow"?}, as in serving.json
    policy_error: str

    def version(self, v: int) -> VersionState | None:
        return next((x for x in self.versions if x.version == v), None)

    @classmethod
    def from_proto(cls, m: pb.ModelStatus) -> ModelState:
        def variant(v: pb.Variant) -> dict:
            d = {"name": v.name, "weight": v.weight}
            if v.model:
                d["model"] = v.model
            if v.HasField("version"):
                d["version"] = v.version
            return d

        traffic = {"salt": m.traffic.salt, "variants": [variant(v) for v in m.traffic.variants]}
        if m.traffic.HasField("shadow"):
            traffic["shadow"] = variant(m.traffic.shadow)
        return cls(m.name, [VersionState(v.version, pb.VersionStatus.State.Name(v.state), v.reason) for v in m.versions],
                   m.serving_version, m.pinned_version if m.HasField("pinned_version") else None, traffic,
                   m.policy_error)


def _variant_pb(d: Mapping) -> pb.Variant:
    return pb.Variant(name=d["name"], model=d.get("model", ""), version=d.get("version"),
                      weight=float(d.get("weight", 0.0)))


def _split(variants: Sequence[Mapping], salt: str, shadow: Mapping | None) -> pb.TrafficSplit:
    return pb.TrafficSplit(salt=salt, variants=[_variant_pb(v) for v in variants],
                           shadow=_variant_pb(shadow) if shadow else None)


class ModelClient:
    def __init__(self, target: str, token: str | None = None, options: ChannelOptions | None = None,
                 channel: grpc.Channel | None = None, timeout: float = 60.0):
        self._channel = channel or make_channel(target, options)
        self._stub = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout

    def _call(self, method, request) -> pb.ModelStatus:
        return method(request, metadata=self._metadata, timeout=self._timeout)

    def list_models(self, model: str = "") -> list[ModelState]:
        reply = self._call(self._stub.ListModels, pb.ListModelsRequest(model=model))
        return [ModelState.from_proto(m) for m in reply.models]

    def load(self, model: str, version: int | None = None) -> ModelState:
        return ModelState.from_proto(self._call(self._stub.LoadModel, pb.LoadModelRequest(model=model, version=version)))

    def unload(self, model: str, version: int) -> ModelState:
        return ModelState.from_proto(self._call(self._stub.UnloadModel,
                                                pb.UnloadModelRequest(model=model, version=version)))

    def set_traffic(self, model: str, variants: Sequence[Mapping], salt: str = "",
                    shadow: Mapping | None = None) -> ModelState:
        return ModelState.from_proto(self._call(self._stub.SetTrafficSplit, pb.SetTrafficSplitRequest(
            model=model, traffic=_split(variants, salt, shadow))))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ModelClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncModelClient:
    """The same calls as ModelClient, awaitable."""

    def __init__(self, target: str, token: str | None = None, options: ChannelOptions | None = None,
                 channel: grpc.aio.Channel | None = None, timeout: float = 60.0):
        self._channel = channel or make_channel(target, options, aio=True)
        self._stub = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout

    async def _call(self, method, request):
        return await method(request, metadata=self._metadata, timeout=self._timeout)

    async def list_models(self, model: str = "") -> list[ModelState]:
        reply = await self._call(self._stub.ListModels, pb.ListModelsRequest(model=model))
        return [ModelState.from_proto(m) for m in reply.models]

    async def load(self, model: str, version: int | None = None) -> ModelState:
        return ModelState.from_proto(await self._call(self._stub.LoadModel,
                                                      pb.LoadModelRequest(model=model, version=version)))

    async def unload(self, model: str, version: int) -> ModelState:
        return ModelState.from_proto(await self._call(self._stub.UnloadModel,
                                                      pb.UnloadModelRequest(model=model, version=version)))

    async def set_traffic(self, model: str, variants: Sequence[Mapping], salt: str = "",
                          shadow: Mapping | None = None) -> ModelState:
        return ModelState.from_proto(await self._call(self._stub.SetTrafficSplit, pb.SetTrafficSplitRequest(
            model=model, traffic=_split(variants, salt, shadow))))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncModelClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
