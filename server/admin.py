"""recserve.v1.ModelService: model administration over gRPC, behind a bearer token.

    servicer = ModelServicer(registry, admin_token="...")   # None: every call PERMISSION_DENIED

Thin, like the Recommend servicer: checks the token, converts protobuf <-> the registry's
types (server/models.py, server/serving_config.py) and lets the registry do the work.
"""

from __future__ import annotations

import hmac

from recserve.server.errors import InvalidRequest, PermissionDenied, Unauthenticated
from recserve.server.models import ModelEntry, ModelRegistry, State
from recserve.server.repository import RepositoryError
from recserve.server.serving_config import TrafficSplit, Variant
from recserve.v1 import model_service_pb2 as pb
from recserve.v1 import model_service_pb2_grpc

_STATES = {State.LOADING: pb.VersionStatus.LOADING, State.READY: pb.VersionStatus.READY,
           State.UNAVAILABLE: pb.VersionStatus.UNAVAILABLE, State.UNLOADING: pb.VersionStatus.UNLOADING}


def _variant_pb(v: Variant | None) -> pb.Variant | None:
    if v is None:
        return None
    return pb.Variant(name=v.name, model=v.model, version=v.version, weight=v.weight)


def split_to_pb(split: TrafficSplit) -> pb.TrafficSplit:
    return pb.TrafficSplit(salt=split.salt, variants=[_variant_pb(v) for v in split.variants],
                           shadow=_variant_pb(split.shadow))


def split_from_pb(msg: pb.TrafficSplit) -> TrafficSplit | None:
    """None (back to serving.json) when the message has no variants and no shadow."""
    def variant(v: pb.Variant, weighted: bool) -> dict:
        d = {"name": v.name, "weight": v.weight} if weighted else {"name": v.name}
        if v.model:
            d["model"] = v.model
        if v.HasField("version"):
            d["version"] = v.version
        return d

    if not msg.variants and not msg.HasField("shadow"):
        return None
    d = {"salt": msg.salt, "variants": [variant(v, True) for v in msg.variants]}
    if msg.HasField("shadow"):
        d["shadow"] = variant(msg.shadow, False)
    try:
        return TrafficSplit.from_dict(d, "traffic")
    except RepositoryError as e:
        raise InvalidRequest(str(e)) from None


def status_pb(entry: ModelEntry) -> pb.ModelStatus:
    serving = entry.serving
    return pb.ModelStatus(
        name=entry.name,
        versions=[pb.VersionStatus(version=v, state=_STATES[e.state], reason=e.reason)
                  for v, e in sorted(entry.versions.items())],
        serving_version=serving.version if serving else 0, pinned_version=entry.pinned,
        traffic=split_to_pb(entry.traffic), policy_error=entry.policy_error)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, registry: ModelRegistry, admin_token: str | None):
        self.registry = registry
        self._token = admin_token.encode() if admin_token else None

    def authorize(self, context) -> None:
        """The call carries the admin bearer token (also used by server/kserve.py's
        RepositoryModelLoad/Unload): PERMISSION_DENIED without one configured."""
        if self._token is None:
            raise PermissionDenied("the admin API is disabled on this server (set admin_token in its config)")
        header = dict(context.invocation_metadata()).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("admin calls need 'authorization: Bearer <admin token>' metadata")
        if not hmac.compare_digest(token.encode(), self._token):
            raise Unauthenticated("the admin token is not valid")

    @staticmethod
    def _need_model(request) -> str:
        if not request.model:
            raise InvalidRequest("model is empty")
        return request.model

    async def ListModels(self, request, context):
        self.authorize(context)
        entries = [self.registry.entry(request.model)] if request.model else self.registry.status()
        return pb.ListModelsResponse(models=[status_pb(e) for e in entries])

    async def LoadModel(self, request, context):
        self.authorize(context)
        name = self._need_model(request)
        await self.registry.load(name, request.version if request.HasField("version") else None)
        return status_pb(self.registry.entry(name))

    async def UnloadModel(self, request, context):
        self.authorize(context)
        name = self._need_model(request)
        await self.registry.unload(name, request.version)
        return status_pb(self.registry.entry(name))

    async def SetTrafficSplit(self, request, context):
        self.authorize(context)
        name = self._need_model(request)
        await self.registry.set_traffic(name, split_from_pb(request.traffic))
        return status_pb(self.registry.entry(name))
