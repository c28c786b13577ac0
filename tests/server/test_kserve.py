"""inference.GRPCInferenceService (KServe v2) through a real server: generic ONNX models
published with `recserve publish`, the retrieval model's dense engine, raw and typed
contents, every INVALID_ARGUMENT path, metadata, repository index, load/unload and the
admin token, statistics, hot-swap of a generic model. The tritonclient run is in
test_kserve_tritonclient.py."""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc
from recserve.clients import RecommendClient
from recserve.server.generic import GenericModel, publish_onnx
from recserve.server.repository import file_entries, publish_version, read_manifest, write_json
from tests.compat.onnx_models import TYPED, build, reference_session
from tests.server.conftest import ServerThread, server_config

TOKEN = "kserve-admin-token-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
GENERIC = ("dense", "half", "text", "typed")


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("onnx")
    for name in GENERIC:
        build(d, name)
    return d


@pytest.fixture(scope="module")
def kserve_repo(onnx_dir, repo, tmp_path_factory) -> Path:
    """The four generic models (published the documented way) and the retrieval model "tiny"."""
    r = tmp_path_factory.mktemp("kserve-repo")
    for name in GENERIC:
        assert publish_onnx(onnx_dir / f"{name}.onnx", r, name, log=lambda *_: None) == 1
    shutil.copytree(repo / "tiny", r / "tiny")
    return r


def kserve_config(repository: Path, **changes):
    return replace(server_config(repository), admin_token=TOKEN, poll_interval_s=0, **changes)


@pytest.fixture(scope="module")
def server(kserve_repo):
    with ServerThread(kserve_config(kserve_repo)) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


def raw_request(model: str, arrays: dict, datatypes: dict, outputs=(), **fields) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **fields)
    for name, a in arrays.items():
        request.inputs.add(name=name, datatype=datatypes[name], shape=a.shape)
        request.raw_input_contents.append(bytes_of(a) if datatypes[name] == "BYTES" else a.tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def bytes_of(a: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in (s.encode() if isinstance(s, str) else s
                                                           for s in a.reshape(-1)))


def outputs_of(response) -> dict[str, np.ndarray]:
    """Decode raw outputs (tests' own decoder, independent of server/kserve.py)."""
    numpy = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
             "INT8": np.int8, "UINT16": np.uint16, "UINT64": np.uint64, "BOOL": np.bool_}
    out = {}
    assert len(response.raw_output_contents) == len(response.outputs)
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        if tensor.datatype == "BYTES":
            values, offset = [], 0
            while offset < len(raw):
                (n,) = struct.unpack_from("<I", raw, offset)
                values.append(raw[offset + 4:offset + 4 + n])
                offset += 4 + n
            out[tensor.name] = np.array(values, dtype=object).reshape(tuple(tensor.shape))
        else:
            out[tensor.name] = np.frombuffer(raw, dtype=numpy[tensor.datatype]).reshape(tuple(tensor.shape))
    return out


def expect_error(call, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details(), info.value.details()
    return info.value.details()


RNG = np.random.default_rng(7)
X = RNG.standard_normal((3, 4)).astype(np.float32)
TEXT = np.array(["hello", "héllo wörld", "", "abc"], dtype=object)


# ---- health and metadata -------------------------------------------------------------------

def test_server_live_ready_and_metadata(stub):
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "recserve" and meta.version and "model_repository" in meta.extensions
    assert "statistics" in meta.extensions


def test_model_ready_per_version(stub):
    assert stub.ModelReady(pb.ModelReadyRequest(name="dense")).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="dense", version="1")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="dense", version="9")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="no-such-model")).ready
    expect_error(lambda: stub.ModelReady(pb.ModelReadyRequest(name="dense", version="v1")),
                 grpc.StatusCode.INVALID_ARGUMENT, "version")


def test_generic_model_metadata_is_the_onnx_signature(stub):
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="text"))
    assert (meta.name, meta.platform, list(meta.versions)) == ("text", "onnxruntime_onnx", ["1"])
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("text", "BYTES", [-1]),
                                                                          ("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("tagged", "BYTES", [-1]), ("match", "BOOL", [-1]), ("y", "FP16", [-1, 4])]
    assert stub.ModelMetadata(pb.ModelMetadataRequest(name="text", version="1")).name == "text"


def test_retrieval_model_metadata_is_its_dense_engine(stub, kserve_repo):
    signature = read_manifest(kserve_repo / "tiny" / "1")["signature"]
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"))
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        (i["name"], "FP32", i["shape"]) for i in signature["inputs"]]
    assert [t.name for t in meta.outputs] == ["user_vector"]


def test_metadata_errors(stub):
    expect_error(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="nope")), grpc.StatusCode.NOT_FOUND, "nope")
    expect_error(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="dense", version="4")),
                 grpc.StatusCode.NOT_FOUND, "version 4")
    expect_error(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="")), grpc.StatusCode.INVALID_ARGUMENT)


# ---- inference -----------------------------------------------------------------------------

def test_infer_raw_equals_onnxruntime(stub, onnx_dir):
    y, label = reference_session(onnx_dir / "dense.onnx").run(None, {"x": X})
    response = stub.ModelInfer(raw_request("dense", {"x": X}, {"x": "FP32"}, id="req-1"))
    assert (response.model_name, response.model_version, response.id) == ("dense", "1", "req-1")
    out = outputs_of(response)
    assert [t.datatype for t in response.outputs] == ["FP32", "INT64"]
    np.testing.assert_allclose(out["y"], y, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out["label"], label)


def test_infer_typed_contents_equal_raw(stub):
    request = pb.ModelInferRequest(model_name="dense")
    request.inputs.add(name="x", datatype="FP32", shape=X.shape).contents.fp32_contents.extend(X.reshape(-1))
    typed = outputs_of(stub.ModelInfer(request))
    raw = outputs_of(stub.ModelInfer(raw_request("dense", {"x": X}, {"x": "FP32"})))
    np.testing.assert_array_equal(typed["y"], raw["y"])
    np.testing.assert_array_equal(typed["label"], raw["label"])


def test_requested_outputs_and_pinned_version(stub):
    response = stub.ModelInfer(raw_request("dense", {"x": X}, {"x": "FP32"}, outputs=["label"], model_version="1"))
    assert [t.name for t in response.outputs] == ["label"] and response.model_version == "1"


def test_fp16_raw_input_and_output(stub, onnx_dir):
    x = RNG.standard_normal((2, 4)).astype(np.float16)
    y, total = reference_session(onnx_dir / "half.onnx").run(None, {"x": x})
    response = stub.ModelInfer(raw_request("half", {"x": x}, {"x": "FP16"}))
    out = outputs_of(response)
    assert [t.datatype for t in response.outputs] == ["FP16", "FP32"]
    np.testing.assert_array_equal(out["y"], y)
    np.testing.assert_array_equal(out["total"], total)


def test_bytes_input_raw_and_typed(stub, onnx_dir):
    x = X[:2]
    tagged, match, y = reference_session(onnx_dir / "text.onnx").run(None, {"text": TEXT, "x": x})
    raw = stub.ModelInfer(raw_request("text", {"text": TEXT, "x": x}, {"text": "BYTES", "x": "FP32"}))
    request = pb.ModelInferRequest(model_name="text")
    request.inputs.add(name="text", datatype="BYTES", shape=[4]).contents.bytes_contents.extend(
        s.encode() for s in TEXT)
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend(x.reshape(-1))
    typed = stub.ModelInfer(request)
    for response in (raw, typed):
        out = outputs_of(response)
        assert [t.datatype for t in response.outputs] == ["BYTES", "BOOL", "FP16"]
        assert [v.decode() for v in out["tagged"]] == list(tagged) == ["hello!", "héllo wörld!", "!", "abc!"]
        np.testing.assert_array_equal(out["match"], match)
        assert out["match"].tolist() == [True, True, False, False]
        np.testing.assert_array_equal(out["y"], y)


def test_every_typed_contents_field(stub):
    values = {"i8": [-128, 0, 127], "u16": [0, 7, 65535], "i32": [-(2 ** 31), 1, 2 ** 31 - 1],
              "i64": [-(2 ** 63), 5, 2 ** 63 - 1], "u64": [0, 9, 2 ** 64 - 1], "flag": [True, False, True],
              "f64": [0.1, -2.5, 1e300]}
    field = {"INT8": "int_contents", "UINT16": "uint_contents", "INT32": "int_contents", "INT64": "int64_contents",
             "UINT64": "uint64_contents", "BOOL": "bool_contents", "FP64": "fp64_contents"}
    request = pb.ModelInferRequest(model_name="typed")
    for name, datatype in TYPED.items():
        getattr(request.inputs.add(name=name, datatype=datatype, shape=[3]).contents,
                field[datatype]).extend(values[name])
    out = outputs_of(stub.ModelInfer(request))
    for name in TYPED:
        assert out[f"{name}_out"].tolist() == values[name], name


def test_retrieval_model_runs_its_dense_engine(stub, kserve_repo):
    from recserve.server.engines import load_engine

    manifest = read_manifest(kserve_repo / "tiny" / "1")
    engine = load_engine("onnx", kserve_repo / "tiny" / "1" / manifest["engines"]["onnx"]["file"],
                         providers=["CPUExecutionProvider"])
    feeds = {i["name"]: RNG.standard_normal((5, i["shape"][1])).astype(np.float32)
             for i in manifest["signature"]["inputs"]}
    expected = engine.run(feeds)["user_vector"]
    out = outputs_of(stub.ModelInfer(raw_request("tiny", feeds, {n: "FP32" for n in feeds})))
    np.testing.assert_allclose(out["user_vector"], expected, rtol=1e-5, atol=1e-6)
    assert out["user_vector"].shape == (5, manifest["signature"]["outputs"][0]["shape"][1])


def _dense(shape=(2, 4), datatype="FP32", name="x", raw=None, **fields):
    data = np.zeros(shape, np.float32).tobytes() if raw is None else raw
    request = pb.ModelInferRequest(model_name="dense", **fields)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(data)
    return request


def _text_raw(text_bytes: bytes, n: int):
    request = pb.ModelInferRequest(model_name="text")
    request.inputs.add(name="text", datatype="BYTES", shape=[n])
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.extend([text_bytes, np.zeros(4, np.float32).tobytes()])
    return request


def _typed(name, datatype, field, values, model="typed"):
    request = pb.ModelInferRequest(model_name=model)
    for n, t in TYPED.items():
        tensor = request.inputs.add(name=n, datatype=t, shape=[len(values)] if n == name else [1])
        if n == name:
            getattr(tensor.contents, field).extend(values)
        else:
            fields = {"INT8": "int_contents", "UINT16": "uint_contents", "INT32": "int_contents",
                      "INT64": "int64_contents", "UINT64": "uint64_contents", "BOOL": "bool_contents",
                      "FP64": "fp64_contents"}
            getattr(tensor.contents, fields[t]).append(0)
    return request


def _two_x():
    request = _dense()
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    request.raw_input_contents.append(np.zeros((2, 4), np.float32).tobytes())
    return request


def _mixed():
    request = _dense()
    request.inputs[0].contents.fp32_contents.extend([0.0] * 8)
    return request


def _fp16_typed():
    request = pb.ModelInferRequest(model_name="half")
    request.inputs.add(name="x", datatype="FP16", shape=[1, 4]).contents.fp32_contents.extend([1, 2, 3, 4])
    return request


def _typed_wrong_field():
    request = pb.ModelInferRequest(model_name="dense")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp64_contents.extend([1, 2, 3, 4])
    return request


def _typed_count():
    request = pb.ModelInferRequest(model_name="dense")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend([1, 2, 3])
    return request


def _no_data():
    request = pb.ModelInferRequest(model_name="dense")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    return request


def _raw_count():
    request = _dense()
    request.raw_input_contents.append(b"")
    return request


def _missing():
    request = pb.ModelInferRequest(model_name="text")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.zeros(4, np.float32).tobytes())
    return request


def _unknown_output():
    request = _dense()
    request.outputs.add(name="logits")
    return request


def _sequence():
    request = _dense()
    request.parameters["sequence_id"].int64_param = 3
    return request


def _invalid_utf8():
    return _text_raw(struct.pack("<I", 2) + b"\xff\xfe", 1)


INVALID = {
    "unknown input": (lambda: _dense(name="image"), ["'image'", "x"]),
    "missing input": (_missing, ["'text'"]),
    "input twice": (_two_x, ["'x'", "twice"]),
    "datatype": (lambda: _dense(datatype="FP64", raw=np.zeros((2, 4)).tobytes()), ["'x'", "FP64", "FP32"]),
    "rank": (lambda: _dense(shape=(8,), raw=np.zeros(8, np.float32).tobytes()), ["'x'", "shape [8]", "[-1, 4]"]),
    "fixed dimension": (lambda: _dense(shape=(2, 5), raw=np.zeros((2, 5), np.float32).tobytes()), ["'x'", "[2, 5]"]),
    "negative dimension": (lambda: _dense(shape=(-1, 4), raw=b""), ["'x'", "[-1, 4]"]),
    "raw byte size": (lambda: _dense(raw=b"\0" * 31), ["'x'", "31 bytes", "32"]),
    "raw entries vs inputs": (_raw_count, ["raw_input_contents has 2 entries for 1 inputs"]),
    "raw and typed": (_mixed, ["'x'", "raw_input_contents"]),
    "typed count": (_typed_count, ["'x'", "3 elements", "8"]),
    "no data": (_no_data, ["'x'", "0 elements"]),
    "typed wrong field": (_typed_wrong_field, ["'x'", "fp32_contents", "fp64_contents"]),
    "fp16 typed": (_fp16_typed, ["'x'", "FP16", "raw_input_contents"]),
    "bytes truncated prefix": (lambda: _text_raw(struct.pack("<I", 1) + b"a" + b"\0\0", 2), ["'text'", "element 1"]),
    "bytes element too long": (lambda: _text_raw(struct.pack("<I", 9) + b"abc", 1), ["'text'", "9 bytes"]),
    "bytes trailing": (lambda: _text_raw(struct.pack("<I", 1) + b"a" + b"zz", 1), ["'text'", "2 bytes", "left"]),
    "bytes not utf-8": (_invalid_utf8, ["'text'", "UTF-8"]),
    "int8 range": (lambda: _typed("i8", "INT8", "int_contents", [1, 300]), ["'i8'", "INT8 range"]),
    "uint16 range": (lambda: _typed("u16", "UINT16", "uint_contents", [70000]), ["'u16'", "UINT16 range"]),
    "unknown output": (_unknown_output, ["'logits'", "y, label"]),
    "bad version": (lambda: _dense(model_version="latest"), ["version", "'latest'"]),
    "sequence": (_sequence, ["sequence_id"]),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_argument_names_the_tensor(stub, case):
    make, fragments = INVALID[case]
    expect_error(lambda: stub.ModelInfer(make()), grpc.StatusCode.INVALID_ARGUMENT, *fragments)


def test_unknown_model_and_version(stub):
    expect_error(lambda: stub.ModelInfer(raw_request("nope", {"x": X}, {"x": "FP32"})), grpc.StatusCode.NOT_FOUND,
                 "'nope'")
    expect_error(lambda: stub.ModelInfer(raw_request("dense", {"x": X}, {"x": "FP32"}, model_version="7")),
                 grpc.StatusCode.NOT_FOUND, "version 7")


def test_recommend_on_a_generic_model_says_to_use_model_infer(server):
    with RecommendClient(server.target) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.recommend("dense", "u1", k=3, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "generic model" in info.value.details() and "ModelInfer" in info.value.details()


def test_statistics_count_successes_failures_and_batches(server, stub):
    before = {s.version: s for s in stub.ModelStatistics(pb.ModelStatisticsRequest(name="half")).model_stats}["1"]
    x = np.ones((5, 4), np.float16)
    for _ in range(3):
        stub.ModelInfer(raw_request("half", {"x": x}, {"x": "FP16"}))
    stub.ModelInfer(raw_request("half", {"x": x[:2]}, {"x": "FP16"}))
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(raw_request("half", {"x": x.astype(np.float32)}, {"x": "FP32"}))
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="half", version="1")).model_stats
    assert len(stats) == 1
    s = stats[0]
    inference = s.inference_stats
    assert (s.name, s.version) == ("half", "1")
    assert inference.success.count - before.inference_stats.success.count == 4
    assert inference.fail.count - before.inference_stats.fail.count == 1
    assert s.execution_count - before.execution_count == 4
    assert s.inference_count - before.inference_count == 3 * 5 + 2
    for d in (inference.success, inference.queue, inference.compute_input, inference.compute_infer,
              inference.compute_output):
        assert d.ns > 0
    assert inference.queue.count == inference.compute_infer.count == s.execution_count
    sizes = {b.batch_size: b.compute_infer.count for b in s.batch_stats}
    assert sizes[5] >= 3 and sizes[2] >= 1
    assert s.last_inference > 1.7e12  # ms since the epoch
    every = stub.ModelStatistics(pb.ModelStatisticsRequest()).model_stats
    assert {m.name for m in every} >= set(GENERIC) | {"tiny"}
    expect_error(lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(name="nope")), grpc.StatusCode.NOT_FOUND)
    expect_error(lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(name="half", version="12")),
                 grpc.StatusCode.NOT_FOUND, "version 12")


def test_repository_index(stub):
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest())
    entries = {(m.name, m.version): (m.state, m.reason) for m in index.models}
    for name in (*GENERIC, "tiny"):
        assert entries[(name, "1")] == ("READY", "")
    ready = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert all(m.state == "READY" for m in ready.models)


def test_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert "inference.GRPCInferenceService" in names


# ---- repository: load, unload, admin token, rejected and swapped versions -----------------------

@pytest.fixture
def private(kserve_repo, tmp_path):
    """A server on a private copy of the repository (these tests change it)."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("dense", "text"):
        shutil.copytree(kserve_repo / name, copy / name)
    with ServerThread(kserve_config(copy)) as s, grpc.insecure_channel(s.target) as channel:
        yield copy, s, grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_load_and_unload_need_the_admin_token(private):
    _, _, stub = private
    load = pb.RepositoryModelLoadRequest(model_name="dense")
    unload = pb.RepositoryModelUnloadRequest(model_name="dense")
    expect_error(lambda: stub.RepositoryModelLoad(load), grpc.StatusCode.UNAUTHENTICATED, "Bearer")
    expect_error(lambda: stub.RepositoryModelUnload(unload, metadata=(("authorization", "Bearer wrong-token"),)),
                 grpc.StatusCode.UNAUTHENTICATED, "not valid")
    assert stub.ModelReady(pb.ModelReadyRequest(name="dense")).ready


def test_no_admin_token_configured_means_permission_denied(kserve_repo, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(kserve_repo / "dense", copy / "dense")
    with ServerThread(replace(server_config(copy), poll_interval_s=0)) as s, grpc.insecure_channel(s.target) as ch:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
        expect_error(lambda: stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="dense"),
                                                        metadata=AUTH), grpc.StatusCode.PERMISSION_DENIED)


def test_unload_then_load_a_model(private):
    _, _, stub = private
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="dense"), metadata=AUTH)
    assert not stub.ModelReady(pb.ModelReadyRequest(name="dense")).ready
    expect_error(lambda: stub.ModelInfer(raw_request("dense", {"x": X}, {"x": "FP32"})),
                 grpc.StatusCode.UNAVAILABLE, "unloaded")
    index = {(m.name, m.version): m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert index[("dense", "1")].state in ("UNLOADING", "UNAVAILABLE")
    assert "unloaded by request" in index[("dense", "1")].reason
    assert stub.ModelReady(pb.ModelReadyRequest(name="text")).ready  # the other model is untouched
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="dense"), metadata=AUTH)
    assert stub.ModelReady(pb.ModelReadyRequest(name="dense")).ready
    assert outputs_of(stub.ModelInfer(raw_request("dense", {"x": X}, {"x": "FP32"})))["y"].shape == (3, 3)


def test_load_errors(private):
    repo, _, stub = private
    expect_error(lambda: stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="ghost"), metadata=AUTH),
                 grpc.StatusCode.NOT_FOUND, "ghost")
    request = pb.RepositoryModelLoadRequest(model_name="dense")
    request.parameters["config"].string_param = "{}"
    expect_error(lambda: stub.RepositoryModelLoad(request, metadata=AUTH), grpc.StatusCode.INVALID_ARGUMENT, "config")


def _publish_changed(repo: Path, name: str, change) -> int:
    """A copy of version 1 after ``change(version_dir, manifest)``, checksums recomputed."""
    def build(tmp: Path, version: int) -> None:
        shutil.copytree(repo / name / "1", tmp, dirs_exist_ok=True)
        manifest = read_manifest(tmp)
        manifest["version"] = version
        change(tmp, manifest)
        manifest["files"] = file_entries(tmp)
        write_json(tmp / "manifest.json", manifest)

    return publish_version(repo, name, build)


def _wrong_golden(tmp: Path, manifest: dict) -> None:
    path = tmp / manifest["golden"][0]["file"]
    with np.load(path) as data:
        arrays = dict(data)
    arrays["output_0"] = arrays["output_0"] + 1
    np.savez(path, **arrays)


def _wrong_signature(tmp: Path, manifest: dict) -> None:
    manifest["signature"]["inputs"][0]["shape"] = [-1, 5]


def _corrupt_engine(tmp: Path, manifest: dict) -> None:
    (tmp / "engine" / "model.onnx").write_bytes(b"not an onnx model")


@pytest.mark.parametrize("change, reason", [(_wrong_golden, "golden request 0: output 'y' differs"),
                                            (_wrong_signature, "does not match the manifest signature"),
                                            (_corrupt_engine, "ONNX Runtime cannot load it")])
def test_a_bad_generic_version_is_rejected_and_the_old_one_serves(private, change, reason):
    repo, _, stub = private
    version = _publish_changed(repo, "dense", change)
    # the load succeeds: the model still serves (version 1); the new version is reported
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="dense"), metadata=AUTH)
    index = {(m.name, m.version): m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert index[("dense", str(version))].state == "UNAVAILABLE"
    assert reason in index[("dense", str(version))].reason
    assert index[("dense", "1")].state == "READY"
    assert stub.ModelInfer(raw_request("dense", {"x": X}, {"x": "FP32"})).model_version == "1"


def test_a_model_with_no_loadable_version_fails_to_load(private):
    repo, _, stub = private
    shutil.copytree(repo / "dense" / "1", repo / "broken" / "1")
    (repo / "broken" / "1" / "engine" / "model.onnx").write_bytes(b"truncated")
    expect_error(lambda: stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="broken"), metadata=AUTH),
                 grpc.StatusCode.FAILED_PRECONDITION, "broken", "9 bytes, manifest says")


def test_a_new_generic_version_swaps_in(private, onnx_dir, tmp_path):
    repo, _, stub = private
    doubled = build(tmp_path, "dense", scale=2.0)
    assert publish_onnx(doubled, repo, "dense", log=lambda *_: None) == 2
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="dense"), metadata=AUTH)
    response = stub.ModelInfer(raw_request("dense", {"x": X}, {"x": "FP32"}))
    assert response.model_version == "2"
    expected = reference_session(doubled).run(None, {"x": X})[0]
    np.testing.assert_allclose(outputs_of(response)["y"], expected, rtol=1e-6, atol=1e-7)
    assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name="dense")).versions) == ["2"]


# ---- publishing ----------------------------------------------------------------------------

def test_publish_cli_writes_a_generic_version(onnx_dir, tmp_path, capsys):
    from recserve.cli.main import main

    repo = tmp_path / "models"
    assert main(["publish", str(onnx_dir / "text.onnx"), "--repository", str(repo), "--model", "nlp"]) == 0
    assert capsys.readouterr().out.strip() == "1"
    manifest = read_manifest(repo / "nlp" / "1")
    assert manifest["kind"] == "generic" and manifest["engines"] == {"onnx": {"file": "engine/model.onnx"}}
    assert set(manifest["files"]) == {"engine/model.onnx", "golden/request-0.npz"}
    model = GenericModel.load(repo / "nlp" / "1", engine_options={"providers": ["CPUExecutionProvider"]})
    model.check_golden()
    # a sample of the user's, and no golden at all
    sample = tmp_path / "sample.npz"
    np.savez(sample, text=np.array(["hi", "yo"]), x=np.ones((1, 4), np.float32))
    assert main(["publish", str(onnx_dir / "text.onnx"), "--repository", str(repo), "--model", "nlp",
                 "--sample", str(sample), "--quiet"]) == 0
    assert main(["publish", str(onnx_dir / "text.onnx"), "--repository", str(repo), "--model", "nlp",
                 "--no-golden", "--quiet"]) == 0
    assert read_manifest(repo / "nlp" / "3")["golden"] == []
    assert json.loads((repo / "nlp" / "2" / "manifest.json").read_text())["golden"][0]["inputs"] == ["text", "x"]


def test_publish_cli_errors_are_one_line(onnx_dir, tmp_path, capsys):
    from recserve.cli.main import main

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    repo = tmp_path / "models"
    assert main(["publish", str(bad), "--repository", str(repo), "--model", "m"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("recserve publish: error:") and "ONNX Runtime cannot load it" in err and "\n" not in err
    sample = tmp_path / "wrong.npz"
    np.savez(sample, y=np.ones((1, 4), np.float32))
    assert main(["publish", str(onnx_dir / "dense.onnx"), "--repository", str(repo), "--model", "m",
                 "--sample", str(sample)]) == 1
    assert "the model's inputs are ['x']" in capsys.readouterr().err
    assert main(["publish", str(tmp_path / "missing.onnx"), "--repository", str(repo), "--model", "m"]) == 1
    assert not (repo / "m").exists() or not any((repo / "m").iterdir())
