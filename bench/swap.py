"""Hot-swap benchmark: Recommend latency in steady state vs while a 1M-item version swaps in.

Usage::

    .venv/bin/python bench/swap.py                      # model from bench/serve.py's cache (build/bench-serve)
    .venv/bin/python bench/swap.py --concurrency 8 --seconds 20 --swaps 3

One `recserve serve` process (repository rescanned every 0.5 s) serves the 1,000,000-item
two-tower model of bench/serve.py under closed-loop load from a separate process. Each
round: `--seconds` of steady state, then a new version (a copy of version 1, prepared
beforehand outside the repository) appears by atomic rename, as `recserve export`
publishes; the server verifies its checksums (~300 MB), memory-maps it, reproduces its
golden requests, warms it up, switches and drains the old version, while the load goes
on. The swap window runs from the rename to the first answer of the new version plus the
time the old one takes to unload (read from the server's metrics endpoint). Reported:
p50/p99 of requests started in steady state vs in swap windows, errors, swap durations.
Target (lifecycle issue): p99 during a swap at most 1.5x the steady-state p99, zero errors.
Writes bench/results/swap.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


async def _load(args) -> None:
    """Closed loop; prints one JSON list of [start (monotonic), latency s, version, error]."""
    import grpc

    from recserve.v1 import recommend_pb2, recommend_pb2_grpc

    users = json.loads(Path(args.requests).read_text())
    requests = [recommend_pb2.RecommendRequest(model="m", user_id=u["user_id"], k=20,
                                               recent_item_ids=u.get("history", [])) for u in users]
    channel = grpc.aio.insecure_channel(args.target)
    stub = recommend_pb2_grpc.RecommendServiceStub(channel)
    await stub.Recommend(requests[0], timeout=30)
    samples: list = []
    stop_at = time.monotonic() + args.seconds

    async def worker(w: int) -> None:
        i = w
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                reply = await stub.Recommend(requests[i % len(requests)], timeout=10)
                samples.append([started, time.monotonic() - started, reply.version, ""])
            except grpc.aio.AioRpcError as e:
                samples.append([started, time.monotonic() - started, 0, e.code().name])
            i += args.concurrency

    await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
    await channel.close()
    print(json.dumps(samples))


def _metric(port: int, name: str, **labels) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=5).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def run(args) -> str:
    import serve as bench_serve
    from recserve.server.process import start_server_process
    from recserve.server.repository import read_manifest, write_json

    source, requests = bench_serve.build_model(Path(args.work), 1_000_000)
    work = Path(args.work) / "swap"
    shutil.rmtree(work, ignore_errors=True)
    repo, staging = work / "repo", work / "staging"
    shutil.copytree(source / "m" / "1", repo / "m" / "1")
    for v in range(2, args.swaps + 2):  # prepared outside the repository: only the rename is timed
        shutil.copytree(source / "m" / "1", staging / str(v))
        manifest = read_manifest(staging / str(v))
        manifest["version"] = v
        write_json(staging / str(v) / "manifest.json", manifest)
    cmd = [sys.executable, "-m", "recserve.cli", "serve", "--repository", str(repo), "--host", "localhost",
           "--port", "0", "--metrics-port", "0", "--poll-interval-s", "0.5"]
    proc, port = start_server_process(cmd, "on port", stderr=subprocess.PIPE)
    metrics_port = None
    try:
        total = args.seconds * (args.swaps + 1) + 40 * args.swaps
        loader = subprocess.Popen([sys.executable, __file__, "load", "--target", f"localhost:{port}",
                                   "--requests", str(requests), "--concurrency", str(args.concurrency),
                                   "--seconds", str(total)], stdout=subprocess.PIPE, text=True)
        metrics_port = _metrics_port(proc)
        windows = []
        time.sleep(args.seconds)
        for v in range(2, args.swaps + 2):
            unloaded_before = _metric(metrics_port, "recserve_model_events_total", event="unloaded")
            start = time.monotonic()
            os.rename(staging / str(v), repo / "m" / str(v))  # what publish_version does last
            while _metric(metrics_port, "recserve_model_events_total", event="unloaded") <= unloaded_before:
                if time.monotonic() - start > 120:
                    raise RuntimeError(f"version {v} did not swap in within 120 s")
                time.sleep(0.05)
            windows.append((start, time.monotonic()))
            time.sleep(args.seconds)
        out, _ = loader.communicate(timeout=total + 60)
    finally:
        proc.terminate()
        proc.wait(30)
    samples = np.array([(s[0], s[1], s[2]) for s in json.loads(out)])
    errors = [s for s in json.loads(out) if s[3]]
    in_swap = np.zeros(len(samples), bool)
    for a, b in windows:
        in_swap |= (samples[:, 0] >= a) & (samples[:, 0] <= b)
    warm = samples[:, 0] >= samples[0, 0] + 2.0  # the first seconds warm up connections and caches
    steady, swap = samples[warm & ~in_swap, 1] * 1e3, samples[in_swap, 1] * 1e3
    durations = [b - a for a, b in windows]
    ratio = np.percentile(swap, 99) / np.percentile(steady, 99)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    lines = [
        "## Hot-swap: Recommend latency while a 1M-item version swaps in (`bench/swap.py`)", "",
        f"Machine: {cpu}, {os.cpu_count()} cores; concurrency {args.concurrency}, k = 20; {args.swaps} swaps, "
        f"{args.seconds:.0f} s of steady state around each; load generator in its own process.", "",
        "| phase | requests | p50 ms | p95 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|---:|"]
    for name, lat in (("steady state", steady), ("during swaps", swap)):
        lines.append(f"| {name} | {len(lat):,} | {np.percentile(lat, 50):.2f} | {np.percentile(lat, 95):.2f} | "
                     f"{np.percentile(lat, 99):.2f} | {lat.max():.2f} |")
    # Where in a window the slow requests fall (started after the rename, latency over the
    # steady p99), and which version answered them: loading (old) or just switched (new).
    slow_p99 = np.percentile(steady, 99)
    timeline = []
    for v, (a, b) in zip(range(2, args.swaps + 2), windows):
        sel = in_swap & (samples[:, 0] >= a) & (samples[:, 0] <= b) & (samples[:, 1] * 1e3 > slow_p99)
        starts, new = samples[sel, 0] - a, samples[sel, 2] == v
        timeline.append(f"v{v}: {sel.sum()} ({(~new).sum()} old, {new.sum()} new)"
                        + (f" at {starts.min():.1f}-{starts.max():.1f} s" if sel.any() else ""))
    lines += ["", f"- swap windows (rename -> old version unloaded): "
                  f"{', '.join(f'{d:.1f} s' for d in durations)}",
              f"- requests over the steady p99 in each window (answered by the old / new version; "
              f"start times after the rename): {'; '.join(timeline)}",
              f"- versions answered: {sorted({int(v) for v in samples[:, 2] if v})}; errors: {len(errors)}"
              + (f" ({errors[0][3]})" if errors else ""),
              f"- p99 during swaps / steady p99 = {ratio:.2f}x (target <= 1.5x with zero errors: "
              f"{'met' if ratio <= 1.5 and not errors else 'NOT met'})"]
    return "\n".join(lines)


def _metrics_port(proc) -> int:
    """The server logs 'metrics on http://host:PORT/metrics' at start (stderr)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "metrics on http://" in line:
            import threading  # keep draining the log so that the server never blocks on it

            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return int(line.rsplit(":", 1)[1].split("/")[0])
    raise RuntimeError("the server did not report its metrics port")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    p = sub.add_parser("load")
    p.add_argument("--target", required=True)
    p.add_argument("--requests", required=True)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--work", default="build/bench-serve")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15, help="steady state before and after each swap")
    parser.add_argument("--swaps", type=int, default=3)
    args = parser.parse_args()
    if args.cmd == "load":
        asyncio.run(_load(args))
        return
    text = run(args)
    out = HERE / "results" / "swap.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
