"""The closed-loop load pattern shared by bench/serve_load.py and bench/serve_triton.py
(and free_ports, for servers told their ports).

Kept free of recserve imports: the Triton client runs in its own venv, whose protobuf is
older than the one recserve's generated stubs need.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time

import numpy as np


async def closed_loop(send, n_requests: int, concurrency: int, seconds: float, error_name) -> dict:
    """``concurrency`` workers each await ``send(i)`` for request i (worker w takes i = w,
    w + concurrency, ...) until ``seconds`` after a one-second warm-up; latencies of the
    calls started after the warm-up. ``error_name(exception)`` names a failure, or
    returns None for an exception that is not an RPC failure (re-raised)."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    calls = 0  # every call answered, warm-up included (what the server's CPU time paid for)
    warm_until = time.perf_counter() + 1.0
    stop_at = warm_until + seconds

    async def worker(offset: int) -> None:
        nonlocal calls
        i = offset
        while True:
            started = time.perf_counter()
            if started >= stop_at:
                return
            try:
                await send(i % n_requests, offset)
                if started >= warm_until:
                    latencies.append(time.perf_counter() - started)
            except Exception as e:
                name = error_name(e)
                if name is None:
                    raise
                errors[name] = errors.get(name, 0) + 1
            calls += 1
            i += concurrency

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    lat = np.asarray(latencies) * 1e3
    return {"concurrency": concurrency, "requests": len(lat), "calls": calls, "rps": len(lat) / seconds,
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": errors}


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The `load` subcommand's arguments, the same for every load generator."""
    parser.add_argument("--target", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", required=True, help="JSON list of {user_id, history}")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--channels", type=int, default=4, help="client connections (workers share them)")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (for servers that must be told theirs)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
