"""NVIDIA's tritonclient (unmodified, in its own venv) against a live recserve server.

    .venv-tritonclient/bin/python tests/compat/tritonclient_check.py --target localhost:8500 \
        --expected expected.npz --descriptor recserve_grpc_service.pb --token ADMIN_TOKEN \
        [--doc docs/clients.md]

Run by tests/server/test_kserve_tritonclient.py, which starts the server, publishes the
models (tests/compat/onnx_models.py: "text" with a BYTES input and an FP16 output, "dense")
and computes the expected outputs with ONNX Runtime. This script imports nothing from
recserve (its venv has protobuf < 7, recserve's stubs need >= 7): it is an external
client. It runs docs/clients.md's tritonclient example first (its output must be the one
the page shows), then checks, with the sync client and then the asyncio one: liveness, readiness,
server and model metadata, inference (BYTES in, BYTES/BOOL/FP16 out; FP32 in, FP32/INT64
out), an INVALID_ARGUMENT error, repository index, statistics, unload/load with the admin
token; and that every message recserve's .proto defines has tritonclient's field numbers
and types. Prints "tritonclient: N checks passed"; any failure is an exception (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

CHECKS = 0


def check(condition, what: str) -> None:
    global CHECKS
    if not condition:
        raise AssertionError(what)
    CHECKS += 1


def text_inputs(module, e):
    text = module.InferInput("text", list(e["text"].shape), "BYTES")
    text.set_data_from_numpy(e["text"].astype(object))
    x = module.InferInput("x", list(e["text_x"].shape), "FP32")
    x.set_data_from_numpy(e["text_x"])
    return [text, x]


def check_text_result(result, e, client: str) -> None:
    tagged, match, y = result.as_numpy("tagged"), result.as_numpy("match"), result.as_numpy("y")
    check([v.decode() if isinstance(v, bytes) else v for v in tagged.reshape(-1)]
          == [str(v) for v in e["tagged"].reshape(-1)], f"{client}: BYTES output {tagged!r}")
    check(match.dtype == np.bool_ and np.array_equal(match, e["match"]), f"{client}: BOOL output {match!r}")
    check(y.dtype == np.float16 and np.array_equal(y, e["y"]), f"{client}: FP16 output {y!r} ({y.dtype})")
    check(result.get_response().model_name == "text", f"{client}: response model name")


def check_metadata(meta, client: str) -> None:
    inputs = [(t.name, t.datatype, list(t.shape)) for t in meta.inputs]
    outputs = [(t.name, t.datatype, list(t.shape)) for t in meta.outputs]
    check(meta.platform == "onnxruntime_onnx" and list(meta.versions) == ["1"], f"{client}: model metadata {meta}")
    check(inputs == [("text", "BYTES", [-1]), ("x", "FP32", [-1, 4])], f"{client}: inputs {inputs}")
    check(outputs == [("tagged", "BYTES", [-1]), ("match", "BOOL", [-1]), ("y", "FP16", [-1, 4])],
          f"{client}: outputs {outputs}")


def check_sync(target: str, e, token: str) -> None:
    client = grpcclient.InferenceServerClient(target)
    check(client.is_server_live() and client.is_server_ready(), "sync: live and ready")
    meta = client.get_server_metadata()
    check(meta.name == "recserve" and "model_repository" in meta.extensions, f"sync: server metadata {meta}")
    check(client.is_model_ready("text") and client.is_model_ready("text", "1"), "sync: model ready")
    check(not client.is_model_ready("text", "5"), "sync: version 5 is not ready")
    check_metadata(client.get_model_metadata("text"), "sync")
    check_text_result(client.infer("text", text_inputs(grpcclient, e)), e, "sync")

    x = grpcclient.InferInput("x", list(e["dense_x"].shape), "FP32")
    x.set_data_from_numpy(e["dense_x"])
    result = client.infer("dense", [x], outputs=[grpcclient.InferRequestedOutput("y"),
                                                 grpcclient.InferRequestedOutput("label")], request_id="r-7")
    check(np.allclose(result.as_numpy("y"), e["dense_y"], rtol=1e-6, atol=1e-7), "sync: dense FP32 output")
    check(np.array_equal(result.as_numpy("label"), e["dense_label"]), "sync: dense INT64 output")
    check(result.get_response().id == "r-7", "sync: request id echoed")

    bad = grpcclient.InferInput("x", [2, 5], "FP32")
    bad.set_data_from_numpy(np.zeros((2, 5), np.float32))
    try:
        client.infer("dense", [bad])
        raise AssertionError("sync: a wrong shape was accepted")
    except InferenceServerException as err:
        check("INVALID_ARGUMENT" in str(err.status()) and "'x'" in err.message(), f"sync: bad shape -> {err}")

    index = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
    check(index.get(("text", "1")) == "READY" and index.get(("dense", "1")) == "READY", f"sync: index {index}")
    stats = client.get_inference_statistics("text").model_stats
    check(len(stats) == 1 and stats[0].inference_stats.success.count >= 1, f"sync: statistics {stats}")

    try:
        client.unload_model("dense")
        raise AssertionError("sync: unload without the admin token was accepted")
    except InferenceServerException as err:
        check("UNAUTHENTICATED" in str(err.status()), f"sync: unload without token -> {err}")
    auth = {"authorization": f"Bearer {token}"}
    client.unload_model("dense", headers=auth)
    check(not client.is_model_ready("dense"), "sync: dense unloaded")
    client.load_model("dense", headers=auth)
    check(client.is_model_ready("dense"), "sync: dense loaded again")
    client.close()


async def check_aio(target: str, e) -> None:
    client = aioclient.InferenceServerClient(target)
    check(await client.is_server_live() and await client.is_server_ready(), "aio: live and ready")
    check((await client.get_server_metadata()).name == "recserve", "aio: server metadata")
    check(await client.is_model_ready("text"), "aio: model ready")
    check_metadata(await client.get_model_metadata("text"), "aio")
    results = await asyncio.gather(*(client.infer("text", text_inputs(aioclient, e)) for _ in range(4)))
    for result in results:
        check_text_result(result, e, "aio")
    await client.close()


def check_descriptor(path: str) -> None:
    """recserve's grpc_service.proto, field by field, against tritonclient's."""
    from google.protobuf import descriptor_pb2
    from tritonclient.grpc import service_pb2

    def messages(fd):
        out = {}

        def walk(msgs, prefix):
            for m in msgs:
                out[prefix + m.name] = {f.name: (f.number, f.type, f.label, f.type_name.rsplit(".", 1)[-1])
                                        for f in m.field}
                walk(m.nested_type, f"{prefix}{m.name}.")
        walk(fd.message_type, "")
        return out

    with open(path, "rb") as f:
        ours = descriptor_pb2.FileDescriptorProto.FromString(f.read())
    theirs = descriptor_pb2.FileDescriptorProto.FromString(service_pb2.DESCRIPTOR.serialized_pb)
    check(ours.package == theirs.package == "inference", "descriptor: package")
    mine, triton = messages(ours), messages(theirs)
    for name, fields in mine.items():
        check(name in triton, f"descriptor: tritonclient has no message {name}")
        for field, signature in fields.items():
            check(triton[name].get(field) == signature,
                  f"descriptor: {name}.{field} is {signature}, tritonclient's is {triton[name].get(field)}")
    methods = {m.name: (m.input_type, m.output_type) for m in theirs.service[0].method}
    for m in ours.service[0].method:
        check(methods.get(m.name) == (m.input_type, m.output_type), f"descriptor: rpc {m.name}")


def run_doc_example(path: str, target: str, token: str) -> None:
    """The tritonclient block of docs/clients.md, as written; its output must match the page's."""
    import contextlib
    import io
    import re

    text = open(path, encoding="utf-8").read()
    (block, shown), = re.findall(r"## tritonclient.*?```python\n(.*?)```\n```\n(.*?)```", text, re.S)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.replace("localhost:8500", target), path, "exec"), {"ADMIN_TOKEN": token})
    check(out.getvalue() == shown, f"docs example printed:\n{out.getvalue()}\nthe page shows:\n{shown}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--expected", required=True)
    parser.add_argument("--descriptor", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--doc", help="docs/clients.md: run its tritonclient example first")
    args = parser.parse_args()
    with np.load(args.expected, allow_pickle=False) as data:
        expected = {k: data[k] for k in data.files}
    check_descriptor(args.descriptor)
    if args.doc:
        run_doc_example(args.doc, args.target, args.token)
    check_sync(args.target, expected, args.token)
    asyncio.run(check_aio(args.target, expected))
    print(f"tritonclient: {CHECKS} checks passed")


if __name__ == "__main__":
    main()
