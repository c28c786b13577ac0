"""Triton baseline for bench/serve.py: recserve's retrieval pipeline served by NVIDIA Triton.

    .venv-triton/bin/python bench/serve_triton.py serve --repository R --k 20 [--model m]
        # prints "triton serving on port <grpc port>", then serves until SIGTERM/SIGINT
    .venv-triton/bin/python bench/serve_triton.py load --target localhost:PORT --model m \
        --requests req.json --concurrency 64 --seconds 10 [--k 20] [--channels 4]
        # prints one JSON line, same keys as `bench/serve_load.py load`
    .venv-triton/bin/python bench/serve_triton.py check --target localhost:PORT --repository R \
        --requests req.json [--model m] [--users 200] [--k 20]
        # Triton's answers vs RetrievalModel.recommend offline; exit status 1 on a mismatch
    .venv/bin/python bench/serve.py --triton-python .venv-triton/bin/python   # how serve.py uses it

The server is a real tritonserver (the one bundled in the `nvidia-pytriton` wheel, CPU
only here) with one model named after the recserve model. Its Python-backend stub hands
each dynamic batch to this process, whose inference callable decodes the batch into
records ``{"user_id": ..., "history": [...]}`` (exactly what recserve's RequestFeatures
builds) and calls ``RetrievalModel.recommend(records, k)`` once per batch: the same
pipeline and the same engine settings as `recserve serve` (ONNX Runtime, default threads;
OMP_WAIT_POLICY=PASSIVE; golden check at load). Model I/O:
  inputs   user_id  BYTES [1]   the user id
           history  BYTES [1]   recent item ids joined by "," (one element; "" for none)
  outputs  item_ids BYTES [K]   (padded with b"" if the catalogue has fewer than K items)
           scores   FP32  [K]   (padded with -inf)
max_batch_size 64, dynamic batcher with max_queue_delay 0 (recserve's greedy batching).

The virtual environment (its own: pytriton needs numpy<2 and protobuf<7, recserve's
.venv has numpy 2)::

    python3.11 -m venv .venv-triton            # /root/.pyenv/versions/3.11.7/bin/python3
    .venv-triton/bin/pip install -r bench/triton-requirements.txt
    # recserve itself, without rebuilding: reuse the editable install of .venv (its
    # compiled recserve._C and generated recserve/v1 protos; the sources are /work/main):
    echo 'import importlib.util as _u; _s = _u.spec_from_file_location("_editable_skbc_recserve", "'"$PWD"'/.venv/lib/python3.11/site-packages/_editable_skbc_recserve.py"); _m = _u.module_from_spec(_s); _s.loader.exec_module(_m); del _u, _s, _m' \
        > .venv-triton/lib/python3.11/site-packages/_recserve_from_main_venv.pth

The .pth line runs scikit-build-core's editable finder of .venv from its own location, so
`import recserve...` in .venv-triton resolves the sources in the checkout and
`recserve._C` to .venv's build (a pybind11 module for CPython 3.11 that does not use the
numpy C API, so numpy 1.26 at runtime is fine). Nothing of .venv's site-packages (numpy 2,
protobuf 7) lands on sys.path. Rebuild recserve in .venv and .venv-triton follows.
(`pip install -e .` into .venv-triton would instead rebuild into the same build/ folder.)

`serve` re-executes itself with LD_LIBRARY_PATH starting with this interpreter's
sysconfig LIBDIR: Triton's Python-backend stub otherwise loads the system libpython
instead of the one of the interpreter running pytriton. Everything that the server and
its children write to stdout goes to stderr: stdout carries only the one marker line
(serve.py reads that line and nothing else, so more output could fill the pipe).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import sysconfig
import threading
from pathlib import Path

import numpy as np

from closed_loop import add_load_arguments, closed_loop, free_ports

HISTORY_SEP = ","


def _latest_version(model_dir: Path) -> Path:
    versions = [int(p.name) for p in model_dir.iterdir()
                if p.name.isdigit() and (p / "manifest.json").exists()] if model_dir.is_dir() else []
    if not versions:
        raise SystemExit(f"{model_dir}: no version with a manifest.json")
    return model_dir / str(max(versions))


def _load_model(repository: str, model: str, version: int | None):
    from recserve.server.retrieval import RetrievalModel

    model_dir = Path(repository) / model
    version_dir = model_dir / str(version) if version else _latest_version(model_dir)
    retrieval = RetrievalModel.load(version_dir)  # onnx engine, default threads: as `recserve serve`
    retrieval.check_golden()
    return retrieval


def _decode(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values.reshape(len(values), -1)[:, 0]]


def _serve(args) -> None:
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = os.environ.get("LD_LIBRARY_PATH", "").split(":")
    if libdir and paths[0] != libdir:
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir] + [p for p in paths if p and p != libdir])
        os.execv(sys.executable, [sys.executable, *sys.argv])
    # As `recserve serve`: kernel OpenMP threads sleep between batches (set before the import).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    marker = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # this process and tritonserver: stdout -> stderr
    sys.stdout = sys.stderr

    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    retrieval = _load_model(args.repository, args.model, args.version)
    k = args.k

    @batch
    def infer(user_id: np.ndarray, history: np.ndarray) -> dict[str, np.ndarray]:
        records = [{"user_id": u, "history": h.split(HISTORY_SEP) if h else []}
                   for u, h in zip(_decode(user_id), _decode(history))]
        ranked = retrieval.recommend(records, k)
        item_ids = np.full((len(records), k), b"", dtype=object)
        scores = np.full((len(records), k), -np.inf, dtype=np.float32)
        for i, (ids, s) in enumerate(ranked):
            item_ids[i, : len(ids)] = [x.encode() for x in ids]
            scores[i, : len(s)] = s
        return {"item_ids": item_ids, "scores": scores}

    grpc_port, http_port, metrics_port = (
        (args.port, *free_ports(2)) if args.port else free_ports(3))
    config = TritonConfig(grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                          log_verbose=0, exit_on_error=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    triton = Triton(config=config)
    try:
        triton.bind(
            model_name=args.model,
            infer_func=infer,
            inputs=[Tensor(name="user_id", dtype=bytes, shape=(1,)),
                    Tensor(name="history", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="item_ids", dtype=bytes, shape=(k,)),
                     Tensor(name="scores", dtype=np.float32, shape=(k,))],
            config=ModelConfig(max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=0)),
            strict=True,
        )
        triton.run()  # returns once the server and the model are ready
        print(f"triton serving on port {grpc_port}", file=marker, flush=True)
        marker.close()
        while not stop.wait(1.0):
            if not triton.is_alive():
                raise SystemExit("tritonserver is no longer alive")
    finally:
        triton.stop()


def _requests(path: str) -> list[dict]:
    return json.loads(Path(path).read_text())


def _inputs(user: dict):
    import tritonclient.grpc.aio as grpcclient

    user_id = grpcclient.InferInput("user_id", [1, 1], "BYTES")
    user_id.set_data_from_numpy(np.array([[str(user["user_id"]).encode()]], dtype=object))
    history = grpcclient.InferInput("history", [1, 1], "BYTES")
    history.set_data_from_numpy(np.array([[HISTORY_SEP.join(user.get("history", [])).encode()]], dtype=object))
    return [user_id, history]


def _clients(target: str, n: int):
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.grpc import KeepAliveOptions

    ka = KeepAliveOptions()
    options = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
               ("grpc.keepalive_time_ms", ka.keepalive_time_ms), ("grpc.keepalive_timeout_ms", ka.keepalive_timeout_ms),
               ("grpc.keepalive_permit_without_calls", ka.keepalive_permit_without_calls),
               ("grpc.http2.max_pings_without_data", ka.http2_max_pings_without_data),
               # one connection per client, as serve_load.py's channels
               ("grpc.use_local_subchannel_pool", 1)]
    return [grpcclient.InferenceServerClient(target, channel_args=options) for _ in range(n)]


def _error_name(e: Exception) -> str:
    status = getattr(e, "status", lambda: None)()
    return str(status).removeprefix("StatusCode.") if status else type(e).__name__


async def _load(args) -> dict:
    from tritonclient.grpc.aio import InferRequestedOutput

    requests = [_inputs(u) for u in _requests(args.requests)]
    outputs = [InferRequestedOutput("item_ids"), InferRequestedOutput("scores")]
    clients = _clients(args.target, args.channels)
    for client in clients:
        await client.infer(args.model, requests[0], outputs=outputs, client_timeout=30)  # connect, warm

    async def send(i: int, worker: int) -> None:
        await clients[worker % len(clients)].infer(args.model, requests[i], outputs=outputs, client_timeout=10)

    result = await closed_loop(send, len(requests), args.concurrency, args.seconds, _error_name)
    for client in clients:
        await client.close()
    return result


async def _check(args) -> int:
    from tritonclient.grpc.aio import InferRequestedOutput

    users = _requests(args.requests)[: args.users]
    retrieval = _load_model(args.repository, args.model, args.version)
    expected = retrieval.recommend([{"user_id": u["user_id"], "history": list(u.get("history", []))}
                                    for u in users], args.k)
    (client,) = _clients(args.target, 1)
    outputs = [InferRequestedOutput("item_ids"), InferRequestedOutput("scores")]
    # Concurrent requests, so the dynamic batcher forms batches of several users as well.
    replies = await asyncio.gather(*(client.infer(args.model, _inputs(u), outputs=outputs, client_timeout=30)
                                     for u in users))
    await client.close()
    bad = 0
    max_err = 0.0
    for u, (ids, scores), r in zip(users, expected, replies):
        got_ids = [x.decode() for x in r.as_numpy("item_ids")[0] if x]
        got_scores = r.as_numpy("scores")[0][: len(got_ids)]
        err = float(np.max(np.abs(got_scores - np.asarray(scores, np.float32)), initial=0.0)) \
            if len(got_scores) == len(scores) else float("inf")
        max_err = max(max_err, err)
        if got_ids != ids or err > 1e-5:
            bad += 1
            if bad <= 3:
                print(f"user {u['user_id']}: triton {got_ids[:5]}... vs offline {ids[:5]}... (max |dscore| {err:.3g})",
                      file=sys.stderr)
    print(json.dumps({"users": len(users), "k": args.k, "id_mismatches": bad, "max_abs_score_diff": max_err}),
          flush=True)
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--repository", required=True)
    p.add_argument("--model", default="m")
    p.add_argument("--version", type=int, help="default: the highest version")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--port", type=int, default=0, help="gRPC port (default: a free one)")
    add_load_arguments(sub.add_parser("load"))  # (--k is the server's, fixed when it starts)
    p = sub.add_parser("check")
    p.add_argument("--target", required=True)
    p.add_argument("--repository", required=True)
    p.add_argument("--requests", required=True)
    p.add_argument("--model", default="m")
    p.add_argument("--version", type=int)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--k", type=int, default=20)
    args = parser.parse_args()
    if args.cmd == "serve":
        _serve(args)
        return 0
    if args.cmd == "load":
        print(json.dumps(asyncio.run(_load(args))), flush=True)
        return 0
    return asyncio.run(_check(args))


if __name__ == "__main__":
    sys.exit(main())
