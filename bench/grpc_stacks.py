"""What the Python gRPC stack costs: grpc.aio vs the sync server, across grpcio versions.

Usage::

    .venv/bin/python bench/grpc_stacks.py run                                  # this venv's grpcio
    .venv/bin/python bench/grpc_stacks.py run --other-python .venv-grpc166/bin/python
    python bench/grpc_stacks.py serve --stack aio|sync --reply reply.bin       # one server (any venv)

Each server answers /recserve.v1.RecommendService/Recommend with a generic handler that
takes the request bytes and returns a precomputed 20-item RecommendResponse as bytes, so
it does no protobuf work and imports nothing but grpc: the same code runs under any
grpcio release (recserve's generated stubs need the grpcio they were generated for). The
load generator is bench/serve_load.py (this venv, closed loop, its own process); rounds
alternate the servers. `make bench-grpc-stacks` builds .venv-grpc166 (grpcio 1.66.2).
Writes bench/results/grpc_stacks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHOD = "/recserve.v1.RecommendService/Recommend"


def _handler(grpc, reply: bytes, aio: bool):
    if aio:
        async def recommend(request, context):
            return reply
    else:
        def recommend(request, context):
            return reply
    return grpc.method_handlers_generic_handler(
        "recserve.v1.RecommendService", {"Recommend": grpc.unary_unary_rpc_method_handler(recommend)})


def serve(args) -> None:
    import grpc

    reply = Path(args.reply).read_bytes()
    if args.stack == "sync":
        server = grpc.server(ThreadPoolExecutor(max_workers=16))
        server.add_generic_rpc_handlers((_handler(grpc, reply, aio=False),))
        port = server.add_insecure_port(f"localhost:{args.port}")
        server.start()
        print(f"floor serving on port {port}", flush=True)
        server.wait_for_termination()
        return

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_handler(grpc, reply, aio=True),))
        port = server.add_insecure_port(f"localhost:{args.port}")
        await server.start()
        print(f"floor serving on port {port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def _version(python: str) -> str:
    return subprocess.run([python, "-c", "import grpc; print(grpc.__version__)"], capture_output=True, text=True,
                          check=True).stdout.strip()


def run(args) -> None:
    sys.path.insert(0, str(HERE))
    import serve as bench_serve  # bench/serve.py: model building, process helpers, the load driver

    work = Path(args.work)
    _, requests = bench_serve.build_model(work, 10_000)
    reply = work / "floor-reply.bin"
    from serve_load import _Floor

    reply.write_bytes(_Floor(bench_serve.K).reply.SerializeToString())
    pythons = [sys.executable, *args.other_python]
    contenders = {f"grpcio {_version(py)} {stack}": (py, stack) for py in pythons for stack in ("aio", "sync")}
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    rounds: dict[str, dict[int, list[dict]]] = {name: {} for name in contenders}
    for _ in range(args.rounds):
        for name, (py, stack) in contenders.items():
            cmd = [py, str(Path(__file__)), "serve", "--stack", stack, "--reply", str(reply), "--port", "0"]
            proc, port = bench_serve.start(cmd, "floor serving on port")
            try:
                for c in concurrencies:
                    r = bench_serve.load(sys.executable, f"localhost:{port}", "m", requests, c, args.seconds)
                    rounds[name].setdefault(c, []).append(r)
                    print(name, json.dumps(r), file=sys.stderr, flush=True)
            finally:
                bench_serve.stop(proc)
    lines = [f"grpc stacks (`bench/grpc_stacks.py`), {args.seconds:.0f} s per point, median of {args.rounds} "
             "alternating rounds; generic handler returning a precomputed 20-item reply", "",
             "| server | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, points in rounds.items():
        for c, rs in points.items():
            med = {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50_ms", "p95_ms", "p99_ms")}
            errors = sum(sum(r["errors"].values()) for r in rs)
            lines.append(f"| {name} | {c} | {med['rps']:,.0f} | {med['p50_ms']:.2f} | {med['p95_ms']:.2f} | "
                         f"{med['p99_ms']:.2f} | {errors} |")
    text = "\n".join(lines)
    out = HERE / "results" / "grpc_stacks.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--stack", choices=("aio", "sync"), required=True)
    p.add_argument("--reply", required=True, help="the serialized RecommendResponse to answer with")
    p.add_argument("--port", type=int, default=0)
    p = sub.add_parser("run")
    p.add_argument("--work", default="build/bench-serve")
    p.add_argument("--other-python", action="append", default=[], help="python of a venv with another grpcio")
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", default="1,8,64")
    args = parser.parse_args()
    serve(args) if args.cmd == "serve" else run(args)


if __name__ == "__main__":
    main()
