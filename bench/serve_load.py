"""Processes for bench/serve.py: the load generator and the bare gRPC floor server.

    python bench/serve_load.py load --target localhost:8500 --model m --requests req.json \
        --concurrency 64 --seconds 10 [--k 20] [--channels 4]   # prints one JSON line of results
    python bench/serve_load.py floor --port 8600 --k 20 [--sync | --native]  # RecommendService, a fixed reply

The load generator is closed-loop: ``concurrency`` asyncio workers each send the next
request as soon as their previous one returns, cycling through the request file (users
with their recent items), for ``seconds`` after a one-second warm-up. It runs in its own
process so it never shares the server's event loop or GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import grpc
import numpy as np

from closed_loop import add_load_arguments, closed_loop
from recserve.v1 import recommend_pb2, recommend_pb2_grpc


async def _load(args) -> dict:
    users = json.loads(open(args.requests).read())
    requests = [recommend_pb2.RecommendRequest(model=args.model, user_id=u["user_id"], k=args.k,
                                               recent_item_ids=u.get("history", [])) for u in users]
    # One connection per channel (a local subchannel pool stops gRPC from sharing one), so
    # a server with several SO_REUSEPORT worker processes gets connections for each.
    channels = [grpc.aio.insecure_channel(args.target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(args.channels)]
    stubs = [recommend_pb2_grpc.RecommendServiceStub(c) for c in channels]
    for stub in stubs:
        await stub.Recommend(requests[0], timeout=30)  # connect and warm the model

    async def send(i: int, worker: int) -> None:
        await stubs[worker % len(stubs)].Recommend(requests[i], timeout=10)

    def error_name(e: Exception) -> str | None:
        return e.code().name if isinstance(e, grpc.aio.AioRpcError) else None

    result = await closed_loop(send, len(requests), args.concurrency, args.seconds, error_name)
    for channel in channels:
        await channel.close()
    return result


class _Floor(recommend_pb2_grpc.RecommendServiceServicer):
    def __init__(self, k: int):
        rng = np.random.default_rng(0)
        self.reply = recommend_pb2.RecommendResponse(
            item_ids=[f"I{i:07d}" for i in rng.integers(0, 10**6, k)],
            scores=np.sort(rng.random(k).astype(np.float32))[::-1].tolist(), model="floor", version=1)

    async def Recommend(self, request, context):
        return self.reply


class _SyncFloor(recommend_pb2_grpc.RecommendServiceServicer):
    def __init__(self, k: int):
        self.reply = _Floor(k).reply

    def Recommend(self, request, context):
        return self.reply


def _sync_floor(args) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=16))
    recommend_pb2_grpc.add_RecommendServiceServicer_to_server(_SyncFloor(args.k), server)
    port = server.add_insecure_port(f"localhost:{args.port}")
    server.start()
    print(f"floor serving on port {port}", flush=True)
    server.wait_for_termination()


async def _floor(args) -> None:
    server = grpc.aio.server()
    recommend_pb2_grpc.add_RecommendServiceServicer_to_server(_Floor(args.k), server)
    port = server.add_insecure_port(f"localhost:{args.port}")
    await server.start()
    print(f"floor serving on port {port}", flush=True)
    await server.wait_for_termination()


async def _native_floor(args) -> None:
    """The same fixed reply from recserve's gRPC C++ front end (server/native.py's module),
    answered in the event loop's reader callback: what the native port costs below the servicer."""
    from recserve import _frontend

    reply = _Floor(args.k).reply.SerializeToString()
    frontend = _frontend.NativeFrontend(f"localhost:{args.port}")
    port = frontend.start()

    def answer() -> None:
        calls, _ = frontend.take()
        for call in calls:
            call.finish(reply)

    asyncio.get_running_loop().add_reader(frontend.fd, answer)
    print(f"floor serving on port {port}", flush=True)
    await asyncio.Event().wait()  # until the process is terminated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_load_arguments(sub.add_parser("load"))
    p = sub.add_parser("floor")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--k", type=int, default=20)
    stack = p.add_mutually_exclusive_group()
    stack.add_argument("--sync", action="store_true", help="grpc.server with a thread pool instead of grpc.aio")
    stack.add_argument("--native", action="store_true", help="recserve's gRPC C++ front end instead of grpc.aio")
    args = parser.parse_args()
    if args.cmd == "load":
        print(json.dumps(asyncio.run(_load(args))), flush=True)
    elif args.sync:
        _sync_floor(args)
    elif args.native:
        asyncio.run(_native_floor(args))
    else:
        asyncio.run(_floor(args))


if __name__ == "__main__":
    sys.exit(main())
