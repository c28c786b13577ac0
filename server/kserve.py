"""inference.GRPCInferenceService: the KServe v2 protocol, wire-compatible with Triton's clients.

    from tritonclient.grpc import InferenceServerClient, InferInput
    client = InferenceServerClient("localhost:8500")
    client.get_model_metadata("resnet")                  # platform, versions, signature
    result = client.infer("resnet", [image_input])       # any model of the repository

Thin, like the Recommend servicer: protobuf tensors <-> NumPy arrays, and the registry
(server/models.py) and the engines do the work. Every served version is exposed by its
engine signature: a ``generic`` model (server/generic.py) by the signature of its ONNX file,
a ``retrieval`` model by its dense engine's (the user tower: pooled inputs -> user vector).
ModelInfer validates the request on the event loop, then runs the engine and encodes the
outputs in the server's compute executor, never on the loop.

Tensors: ``raw_input_contents`` (little-endian, row-major; BYTES as a 4-byte little-endian
length + the bytes per element) or typed ``contents``; FP16 raw only; outputs always come
back in ``raw_output_contents``. A bad tensor (unknown name, datatype, shape, byte size) is
INVALID_ARGUMENT naming it; an unknown model NOT_FOUND; a model not ready UNAVAILABLE (the
domain errors of server/errors.py, mapped by the server's error interceptor).
RepositoryModelLoad/Unload need the admin bearer token of recserve.v1.ModelService.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc
from recserve.server.admin import ModelServicer
from recserve.server.errors import DeadlineExpired, InvalidRequest, ModelNotFound, NotReady, VersionNotLoaded
from recserve.server.generic import DTYPES, is_input_error
from recserve.server.models import ServedVersion, State

KSERVE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EXTENSIONS = ("model_repository", "model_repository(unload_dependents)", "statistics")

# Signature dtype (server/generic.py DTYPES) <-> KServe datatype.
DATATYPES = {"bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
             "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16",
             "float32": "FP32", "float64": "FP64", "string": "BYTES"}
_NUMPY = {dt: DTYPES[name] for name, dt in DATATYPES.items()}
# The typed field of InferTensorContents that carries each datatype (FP16 has none).
CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                  "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                  "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
                  "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
_ALL_FIELDS = sorted(set(CONTENTS_FIELD.values()))
_NARROW = ("INT8", "INT16", "UINT8", "UINT16")  # carried in 32-bit fields: range-checked
_PLATFORMS = {"onnx": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
_LENGTH = struct.Struct("<I")


# ---- tensors ----------------------------------------------------------------------------

def decode_inputs(request, signature: Mapping) -> dict[str, np.ndarray]:
    """The request's input tensors as arrays, checked against the signature."""
    expected = {t["name"]: t for t in signature["inputs"]}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs "
                             "(one per input, in the order of inputs)")
    feeds: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        spec = expected.get(name)
        if spec is None:
            raise InvalidRequest(f"unknown input {name!r} (the model's inputs: {', '.join(expected)})")
        if name in feeds:
            raise InvalidRequest(f"input {name!r} is given twice")
        datatype = DATATYPES[spec["dtype"]]
        if tensor.datatype != datatype:
            raise InvalidRequest(f"input {name!r}: datatype {tensor.datatype or '(empty)'}, the model expects "
                                 f"{datatype}")
        shape = tuple(tensor.shape)
        want = spec["shape"]
        if (len(shape) != len(want) or any(d < 0 for d in shape)
                or any(w >= 0 and d != w for d, w in zip(shape, want))):
            raise InvalidRequest(f"input {name!r}: shape {list(shape)}, the model expects {list(want)} "
                                 "(-1: any size)")
        count = math.prod(shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidRequest(f"input {name!r}: typed contents in a request that uses raw_input_contents")
            feeds[name] = _from_raw(raw[i], datatype, shape, count, name)
        else:
            feeds[name] = _from_contents(tensor.contents, datatype, shape, count, name)
    missing = [n for n in expected if n not in feeds]
    if missing:
        raise InvalidRequest(f"missing input{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    return feeds


def _from_raw(data: bytes, datatype: str, shape: tuple, count: int, name: str) -> np.ndarray:
    if datatype == "BYTES":
        return decode_bytes(data, count, name, shape).reshape(shape)
    dtype = _NUMPY[datatype]
    need = count * dtype.itemsize
    if len(data) != need:
        raise InvalidRequest(f"input {name!r}: {len(data)} bytes of raw contents, a {datatype} tensor of shape "
                             f"{list(shape)} takes {need}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)  # read-only, no copy


def _from_contents(contents, datatype: str, shape: tuple, count: int, name: str) -> np.ndarray:
    if datatype == "FP16":
        raise InvalidRequest(f"input {name!r}: FP16 data must be sent in raw_input_contents (the protocol has "
                             "no typed FP16 field)")
    field_name = CONTENTS_FIELD[datatype]
    for other in _ALL_FIELDS:
        if other != field_name and len(getattr(contents, other)):
            raise InvalidRequest(f"input {name!r}: {datatype} data goes in contents.{field_name}, not "
                                 f"contents.{other}")
    values = getattr(contents, field_name)
    if len(values) != count:
        hint = " (no data: send raw_input_contents or typed contents)" if not len(values) else ""
        raise InvalidRequest(f"input {name!r}: {len(values)} elements in contents.{field_name}, shape "
                             f"{list(shape)} has {count}{hint}")
    if datatype == "BYTES":
        return np.array([_text(v, name, j) for j, v in enumerate(values)], dtype=object).reshape(shape)
    dtype = _NUMPY[datatype]
    if datatype in _NARROW:
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidRequest(f"input {name!r}: a value outside the {datatype} range [{info.min}, {info.max}]")
        return wide.astype(dtype).reshape(shape)
    return np.array(values, dtype=dtype).reshape(shape)


def _text(value: bytes, name: str, index: int) -> str:
    """BYTES elements feed ONNX string tensors, which hold UTF-8 text."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"input {name!r}: element {index} is not valid UTF-8 (the model's string "
                             "tensors hold text)") from None


def decode_bytes(data: bytes, count: int, name: str, shape: Sequence[int] = ()) -> np.ndarray:
    """Raw BYTES contents (per element: 4-byte little-endian length, then the bytes) ->
    an object array of ``count`` str."""
    out = []
    offset, end = 0, len(data)
    for j in range(count):
        if offset + 4 > end:
            raise InvalidRequest(f"input {name!r}: raw BYTES contents end at element {j}; shape {list(shape)} "
                                 f"has {count} (each element: 4-byte little-endian length, then the bytes)")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + length > end:
            raise InvalidRequest(f"input {name!r}: BYTES element {j} is {length} bytes long, only "
                                 f"{end - offset} remain in its raw contents")
        out.append(_text(data[offset:offset + length], name, j))
        offset += length
    if offset != end:
        raise InvalidRequest(f"input {name!r}: {end - offset} bytes of raw contents left after the "
                             f"{count} BYTES elements of shape {list(shape)}")
    return np.array(out, dtype=object)


def encode_bytes(array: np.ndarray) -> bytes:
    parts = []
    for value in array.reshape(-1):
        b = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        parts += (_LENGTH.pack(len(b)), b)
    return b"".join(parts)


def encode_output(name: str, array) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    array = np.asarray(array)
    dtype_name = "string" if array.dtype == object or array.dtype.kind in "US" else array.dtype.name
    datatype = DATATYPES.get(dtype_name)
    if datatype is None:
        raise TypeError(f"output {name!r}: the engine returned {array.dtype}, which has no KServe datatype")
    raw = encode_bytes(array) if datatype == "BYTES" else np.ascontiguousarray(array).tobytes()
    return pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=array.shape), raw


def requested_outputs(request, signature: Mapping) -> list[str]:
    known = [t["name"] for t in signature["outputs"]]
    names = []
    for o in request.outputs:
        if o.name not in known:
            raise InvalidRequest(f"unknown output {o.name!r} (the model's outputs: {', '.join(known)})")
        if o.name in names:
            raise InvalidRequest(f"output {o.name!r} is requested twice")
        if "classification" in o.parameters:
            raise InvalidRequest(f"output {o.name!r}: the classification extension is not supported")
        names.append(o.name)
    return names or known


def tensor_metadata(signature: Mapping, kind: str) -> list:
    return [pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=DATATYPES[t["dtype"]],
                                                    shape=t["shape"]) for t in signature[kind]]


# ---- statistics -------------------------------------------------------------------------

_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class VersionStats:
    """Cumulative counts and times of one model version (plain ints: a few adds per call)."""

    durations: dict = field(default_factory=lambda: {k: [0, 0] for k in _DURATIONS})  # name -> [count, ns]
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict = field(default_factory=dict)  # batch size -> [[count, ns] input, infer, output]

    def add(self, name: str, ns: int) -> None:
        d = self.durations[name]
        d[0] += 1
        d[1] += ns

    def executed(self, batch: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.inference_count += batch
        self.execution_count += 1
        self.last_inference_ms = time.time_ns() // 1_000_000
        b = self.batches.setdefault(batch, [[0, 0], [0, 0], [0, 0]])
        for d, ns in zip(b, (input_ns, infer_ns, output_ns)):
            d[0] += 1
            d[1] += ns
        for stage, ns in zip(("compute_input", "compute_infer", "compute_output"), (input_ns, infer_ns, output_ns)):
            self.add(stage, ns)

    def to_pb(self, name: str, version: int) -> pb.ModelStatistics:
        def duration(d):
            return pb.StatisticDuration(count=d[0], ns=d[1])

        return pb.ModelStatistics(
            name=name, version=str(version), last_inference=self.last_inference_ms,
            inference_count=self.inference_count, execution_count=self.execution_count,
            inference_stats=pb.InferStatistics(**{k: duration(v) for k, v in self.durations.items()}),
            batch_stats=[pb.InferBatchStatistics(batch_size=size, compute_input=duration(b[0]),
                                                 compute_infer=duration(b[1]), compute_output=duration(b[2]))
                         for size, b in sorted(self.batches.items())])


# ---- the servicer -----------------------------------------------------------------------

def _version(text: str) -> int | None:
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise InvalidRequest(f"version must be a positive integer, got {text!r}")
    return int(text)


def _need_name(name: str) -> str:
    if not name:
        raise InvalidRequest("model name is empty")
    return name


def platform(model) -> str:
    return _PLATFORMS.get(model.engine.backend, model.engine.backend)


class KServeServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, server):
        """``server``: the RecserveServer (its registry, compute executor, config and the
        Recommend servicer's draining flag)."""
        from importlib.metadata import PackageNotFoundError, version

        self.server = server
        self.registry = server.registry
        self.admin = ModelServicer(server.registry, server.config.admin_bearer_token)  # its token check
        self.stats: dict[tuple[str, int], VersionStats] = {}
        self._was_ready = False  # like health: ready once every model found at start serves
        try:
            self.version = version("recserve")
        except PackageNotFoundError:
            self.version = "unknown"

    def add_to_server(self, grpc_server) -> None:
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self, grpc_server)

    @property
    def draining(self) -> bool:
        return self.server.servicer.draining

    # -- health and metadata ------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        # A model added later that fails to load does not take the server out of rotation
        # (the health service's rule, docs/operations.md); draining does.
        self._was_ready = self._was_ready or self.registry.ready
        return pb.ServerReadyResponse(ready=self._was_ready and not self.draining)

    async def ModelReady(self, request, context):
        entry = self.registry.models.get(_need_name(request.name))
        version = _version(request.version)
        if entry is None or self.draining:
            return pb.ModelReadyResponse(ready=False)
        if version is None:
            return pb.ModelReadyResponse(ready=entry.serving is not None)
        ve = entry.versions.get(version)
        return pb.ModelReadyResponse(ready=ve is not None and ve.state == State.READY and ve.served is not None)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="recserve", version=self.version, extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        name = _need_name(request.name)
        served = self.registry.get(name, _version(request.version))
        signature = served.model.signature
        return pb.ModelMetadataResponse(
            name=name, versions=[str(v) for v in self.registry.entry(name).ready()],
            platform=platform(served.model), inputs=tensor_metadata(signature, "inputs"),
            outputs=tensor_metadata(signature, "outputs"))

    # -- inference ----------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        started = time.perf_counter_ns()
        if self.draining:
            raise NotReady("server is draining; retry on another replica")
        served = self.registry.get(_need_name(request.model_name), _version(request.model_version))
        stats = self.stats.setdefault((served.name, served.version), VersionStats())
        try:
            if "sequence_id" in request.parameters:
                raise InvalidRequest("sequence_id: recserve models are stateless (no sequence batching)")
            signature = served.model.signature
            feeds = decode_inputs(request, signature)
            names = requested_outputs(request, signature)
            decoded = time.perf_counter_ns()
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            loop = asyncio.get_running_loop()
            outputs, raws, queue_ns, infer_ns, output_ns = await loop.run_in_executor(
                self.registry.executor, _compute, served, feeds, names, decoded, deadline)
        except BaseException:
            stats.add("fail", time.perf_counter_ns() - started)
            raise
        first = signature["inputs"][0] if signature["inputs"] else None
        batch = int(feeds[first["name"]].shape[0]) if first and first["shape"] and first["shape"][0] == -1 else 1
        stats.add("queue", queue_ns)
        stats.executed(batch, decoded - started, infer_ns, output_ns)
        stats.add("success", time.perf_counter_ns() - started)
        return pb.ModelInferResponse(model_name=served.name, model_version=str(served.version), id=request.id,
                                     outputs=outputs, raw_output_contents=raws)

    # -- statistics and repository ------------------------------------------------------
    async def ModelStatistics(self, request, context):
        entries = [self.registry.entry(request.name)] if request.name else self.registry.status()
        version = _version(request.version)
        out = []
        for entry in entries:
            known = {v for v, ve in entry.versions.items() if ve.state == State.READY}
            known |= {v for (n, v) in self.stats if n == entry.name}
            if version is not None:
                if version not in known and version not in entry.versions:
                    raise ModelNotFound(f"model {entry.name!r} has no statistics for version {version} "
                                        f"(versions: {sorted(known)})")
                known = {version}
            out += [self.stats.get((entry.name, v), VersionStats()).to_pb(entry.name, v) for v in sorted(known)]
        return pb.ModelStatisticsResponse(model_stats=out)

    async def RepositoryIndex(self, request, context):
        models = []
        for entry in self.registry.status():
            if not entry.versions and not request.ready:
                models.append(pb.RepositoryIndexResponse.ModelIndex(
                    name=entry.name, state=State.UNAVAILABLE.value,
                    reason=entry.policy_error or ("unloaded by request" if entry.unloaded else "no version loaded")))
            for v, ve in sorted(entry.versions.items()):
                if request.ready and ve.state != State.READY:
                    continue
                models.append(pb.RepositoryIndexResponse.ModelIndex(name=entry.name, version=str(v),
                                                                    state=ve.state.value, reason=ve.reason))
        return pb.RepositoryIndexResponse(models=models)

    async def RepositoryModelLoad(self, request, context):
        self.admin.authorize(context)
        name = _need_name(request.model_name)
        if request.parameters:
            raise InvalidRequest(f"load parameters are not supported (got {', '.join(sorted(request.parameters))}): "
                                 "publish the model into the repository (recserve publish / export) and load it")
        await self.registry.load(name)
        entry = self.registry.entry(name)
        if entry.serving is None:
            raise VersionNotLoaded(f"model {name!r} did not load: {entry.failures()}")
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        self.admin.authorize(context)
        name = _need_name(request.model_name)
        unknown = sorted(set(request.parameters) - {"unload_dependents"})  # no ensembles: nothing depends
        if unknown:
            raise InvalidRequest(f"unload parameters not supported: {', '.join(unknown)}")
        await self.registry.unload_model(name)
        return pb.RepositoryModelUnloadResponse()


def _compute(served: ServedVersion, feeds: dict, names: list[str], submitted_ns: int, deadline: float | None):
    """In the compute executor: the engine run and the output encoding, with their times."""
    start = time.perf_counter_ns()
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExpired("the deadline passed before the request was computed")
    try:
        arrays = served.model.engine.run(feeds)
    except Exception as e:
        if is_input_error(e):
            message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise InvalidRequest(f"model {served.name!r}: the engine rejected the inputs: {message}") from None
        raise
    ran = time.perf_counter_ns()
    outputs, raws = [], []
    for name in names:
        tensor, raw = encode_output(name, arrays[name])
        outputs.append(tensor)
        raws.append(raw)
    return outputs, raws, start - submitted_ns, ran - start, time.perf_counter_ns() - ran
