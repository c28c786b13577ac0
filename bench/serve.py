"""Serving benchmark: Recommend latency and throughput vs a bare gRPC floor (and Triton).

Usage::

    .venv/bin/python bench/serve.py                     # builds the models once into build/bench-serve
    .venv/bin/python bench/serve.py --seconds 5 --rounds 3 --concurrency 1,8,64
    .venv/bin/python bench/serve.py --triton-python /path/to/triton-venv/bin/python
    .venv/bin/python bench/serve.py --device cuda        # adds GPU serving (--device cuda) to the same run

Models: two-tower models trained (1 epoch) on synthetic data with 10,000 and 1,000,000
items, exported with `recserve export` — the real pipeline (hash -> embedding_bag on
mmap'd tables -> ONNX Runtime -> fused top-k), k = 20. Every server and the load
generator (bench/serve_load.py, closed loop) are separate processes on this machine.

Contenders, same run, same requests (users with their recent items):
  floor     a bare grpc.aio RecommendService returning a precomputed 20-item reply
            (and the same as a sync grpc.server with a thread pool, and on recserve's gRPC
            C++ front end, to compare the stacks)
  recserve  `recserve serve` on the 10k-item model (and on the 1M-item model at c=64)
  recserve native  the same servers, load sent to their `--native-port` (the gRPC C++ front
            end, server/native.py) when this build has it
  triton    (with --triton-python) the same pipeline in NVIDIA Triton via pytriton
Targets (server issue): p50 at c=1 within 1.3x of the floor; c=64 throughput >= 2x
Triton's; 1M items at c=64 >= 400 req/s with p95 < 100 ms. Each point also reports the
server's CPU time per call (all its threads and child processes) and the hypervisor's steal
during the point: on a shared VM latency swings with the neighbours, CPU per call much less.
Writes bench/results/serve.md.

With ``--device cuda`` (GPU serving, issue 8) the same run also serves both models with
``recserve serve --device cuda`` (tables, items and every stage on the GPU) and reports GPU vs
CPU at each concurrency; it writes bench/results/serve-cuda.md. Without a usable GPU it says
why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

from closed_loop import free_ports
from recserve.server.native import native_frontend_available

HERE = Path(__file__).resolve().parent
K = 20
N_REQUEST_USERS = 2000


def build_model(work: Path, n_items: int) -> tuple[Path, Path]:
    """Synthetic data -> 1-epoch two-tower run -> repository; returns (repository, requests.json)."""
    from recserve.trainer.config import TrainConfig
    from recserve.trainer.data import user_records
    from recserve.trainer.export import export_run
    from recserve.trainer.synthetic import SyntheticConfig, write_dataset
    from recserve.trainer.train import load_trained, train

    base = work / f"items-{n_items}"
    repo, requests = base / "repo", base / "requests.json"
    if (repo / "m" / "1" / "manifest.json").exists() and requests.exists():
        return repo, requests
    data = base / "data"
    write_dataset(SyntheticConfig(n_users=20_000, n_items=n_items, n_clusters=50, seed=1), data)
    cfg = TrainConfig(interactions=str(data / "interactions.parquet"), items=str(data / "items.parquet"), epochs=1,
                      item_id_buckets=1 << 18 if n_items > 100_000 else 1 << 15)
    train(cfg, base / "run", progress=False, evaluate_each_epoch=False)
    export_run(base / "run", repo, "m", log=lambda *_: None)
    _, _, dataset, _ = load_trained(base / "run")
    users = dataset.split.test_users[:N_REQUEST_USERS]
    requests.write_text(json.dumps(user_records(dataset, users, cfg.history_len)))
    return repo, requests


def start(cmd: list[str], marker: str) -> tuple[subprocess.Popen, int]:
    from recserve.server.process import start_server_process

    return start_server_process(cmd, marker, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def load(python: str, target: str, model: str, requests: Path, concurrency: int, seconds: float,
         client: str = "recserve") -> dict:
    script = HERE / ("serve_load.py" if client == "recserve" else "serve_triton.py")
    out = subprocess.run([python, str(script), "load", "--target", target, "--model", model, "--requests",
                          str(requests), "--concurrency", str(concurrency), "--seconds", str(seconds), "--k", str(K)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants (Triton's launcher starts
    tritonserver and its Python-backend stubs as children), from /proc."""
    parents, cpu = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    tree, frontier = {pid}, [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier and p not in tree]
        tree.update(children)
        frontier = children
    return sum(cpu.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


def _steal_seconds() -> float:
    """CPU time the hypervisor gave to others while this VM's vCPUs wanted to run (all CPUs)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def measured_load(proc: subprocess.Popen, *load_args) -> dict:
    """One load point, with what the server spent on it: its CPU time per call answered
    (all threads and child processes; a latency-independent cost, steadier than latency on
    a shared VM) and the share of the machine's CPU time stolen by the hypervisor meanwhile."""
    cpu, steal, started = _cpu_seconds(proc.pid), _steal_seconds(), time.perf_counter()
    r = load(*load_args)
    elapsed = time.perf_counter() - started
    r["server_cpu_us_per_call"] = (_cpu_seconds(proc.pid) - cpu) / max(r["calls"], 1) * 1e6
    r["steal_pct"] = 100 * (_steal_seconds() - steal) / (elapsed * (os.cpu_count() or 1))
    return r


def run(args) -> dict:
    work = Path(args.work)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    repo10k, req10k = build_model(work, 10_000)
    repo1m, req1m = build_model(work, 1_000_000)
    py = sys.executable

    contenders = {
        "floor": ([py, str(HERE / "serve_load.py"), "floor", "--port", "0", "--k", str(K)], "floor serving", "m",
                  req10k, py, "recserve"),
        "floor (sync server)": ([py, str(HERE / "serve_load.py"), "floor", "--sync", "--port", "0", "--k", str(K)],
                                "floor serving", "m", req10k, py, "recserve"),
        "recserve 10k items": ([py, "-m", "recserve.cli", "serve", "--repository", str(repo10k), "--host",
                                "localhost", "--port", "0"], "on port", "m", req10k, py, "recserve"),
    }
    if native_frontend_available():  # the floor on recserve's gRPC C++ front end; each server's native port
        contenders["floor (native front end)"] = (
            [py, str(HERE / "serve_load.py"), "floor", "--native", "--port", "0", "--k", str(K)], "floor serving", "m",
            req10k, py, "recserve")
        contenders["recserve native 10k items"] = _native(contenders["recserve 10k items"])
    if args.triton_python:
        contenders["triton 10k items"] = (
            [args.triton_python, str(HERE / "serve_triton.py"), "serve", "--repository", str(repo10k), "--k", str(K)],
            "triton serving", "m", req10k, args.triton_python, "triton")
    contenders["recserve 1M items"] = ([py, "-m", "recserve.cli", "serve", "--repository", str(repo1m), "--host",
                                        "localhost", "--port", "0"], "on port", "m", req1m, py, "recserve")
    if native_frontend_available():
        contenders["recserve native 1M items"] = _native(contenders["recserve 1M items"])
    if args.device == "cuda":
        for size, repo, requests in (("10k", repo10k, req10k), ("1M", repo1m, req1m)):
            contenders[f"recserve {size} items on cuda"] = (
                [py, "-m", "recserve.cli", "serve", "--repository", str(repo), "--host", "localhost", "--port", "0",
                 "--device", "cuda", "--cuda-device", str(args.cuda_device)], "on port", "m", requests, py, "recserve")
    rounds: dict[str, dict[int, list[dict]]] = {name: {} for name in contenders}
    # Rounds alternate the contenders so that the VM's slow minutes hit all of them.
    for _ in range(args.rounds):
        for name, (cmd, marker, model, requests, client_py, client) in contenders.items():
            points = [64] if "1M items" in name and "cuda" not in name else concurrencies
            if name == "recserve 1M items" and args.device == "cuda":
                points = concurrencies  # the GPU comparison needs the CPU path at every point
            native_port = None
            if "--native-port" in cmd:  # a fresh free port each start
                native_port = free_ports(1)[0]
                cmd = [*cmd[:-1], str(native_port)]
            proc, port = start(cmd, marker)
            port = native_port or port
            try:
                for c in points:
                    r = measured_load(proc, client_py, f"localhost:{port}", model, requests, c, args.seconds, client)
                    rounds[name].setdefault(c, []).append(r)
                    print(name, json.dumps(r), file=sys.stderr, flush=True)
            finally:
                stop(proc)
    return {name: {c: _median(rs) for c, rs in points.items()} for name, points in rounds.items()}


def _native(contender: tuple) -> tuple:
    """The contender's server with --native-port (its value picked at each start)."""
    cmd, *rest = contender
    return ([*cmd, "--native-port", "0"], *rest)


def _median(runs: list[dict]) -> dict:
    """Per-metric median over rounds; errors summed."""
    out = {key: statistics.median(r[key] for r in runs)
           for key in ("rps", "p50_ms", "p95_ms", "p99_ms", "server_cpu_us_per_call", "steal_pct")}
    out["errors"] = {}
    for r in runs:
        for code, n in r["errors"].items():
            out["errors"][code] = out["errors"].get(code, 0) + n
    out["rounds"] = len(runs)
    return out


def report(results: dict, args) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    lines = ["## Serving: Recommend end to end (`bench/serve.py`)", "",
             f"Machine: {cpu}, {os.cpu_count()} cores; grpcio {grpc.__version__}; k = {K}; "
             f"{args.seconds:.0f} s per point after 1 s warm-up, median of {args.rounds} alternating rounds; "
             "closed-loop load generator in its own process.",
             "Server CPU: the server's processes' user + system time per call answered; steal: the "
             "share of the machine's CPU time the hypervisor gave elsewhere during the point.",
             "", "| server | concurrency | req/s | p50 ms | p95 ms | p99 ms | server CPU us/call | steal % | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, points in results.items():
        for c, r in points.items():
            lines.append(f"| {name} | {c} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['server_cpu_us_per_call']:,.0f} | {r['steal_pct']:.0f} | "
                         f"{sum(r['errors'].values()) or 0} |")
    floor, triton = results["floor"], results.get("triton 10k items")
    lines.append("")
    for port in ("", "native "):  # the main (grpc.aio) port, then the gRPC C++ front end
        ours = results.get(f"recserve {port}10k items")
        if ours is None:
            continue
        if 1 in ours:
            ratio = ours[1]["p50_ms"] / floor[1]["p50_ms"]
            lines.append(f"- p50 at c=1: recserve {port}/ floor = {ratio:.2f}x "
                         f"(target <= 1.3x: {'met' if ratio <= 1.3 else 'NOT met'})")
        if triton and 64 in ours:
            ratio = ours[64]["rps"] / triton[64]["rps"]
            lines.append(f"- c=64 throughput: recserve {port}/ Triton = {ratio:.2f}x "
                         f"(target >= 2x: {'met' if ratio >= 2 else 'NOT met'})")
        native_floor = results.get("floor (native front end)")
        if port and native_floor and 1 in ours:
            lines.append(f"- p50 at c=1: recserve native / floor (native front end) = "
                         f"{ours[1]['p50_ms'] / native_floor[1]['p50_ms']:.2f}x (the pipeline's share)")
        its_floor = native_floor if port else floor
        if its_floor and 1 in ours:
            lines.append(f"- server CPU per call at c=1: recserve {port}{ours[1]['server_cpu_us_per_call']:,.0f} us, "
                         f"its front end's floor {its_floor[1]['server_cpu_us_per_call']:,.0f} us")
        big = results[f"recserve {port}1M items"][64]
        met = big["rps"] >= 400 and big["p95_ms"] < 100
        lines.append(f"- 1M items{port and ' native'}, c=64: {big['rps']:,.0f} req/s, p95 {big['p95_ms']:.1f} ms "
                     f"(target >= 400 req/s and p95 < 100 ms: {'met' if met else 'NOT met'})")
    for size in ("10k", "1M"):
        gpu, cpu_path = results.get(f"recserve {size} items on cuda"), results.get(f"recserve {size} items")
        for c in sorted(set(gpu or ()) & set(cpu_path or ())):
            lines.append(f"- {size} items, c={c}: GPU serving p50 {gpu[c]['p50_ms']:.2f} ms vs CPU "
                         f"{cpu_path[c]['p50_ms']:.2f} ms, throughput GPU / CPU = "
                         f"{gpu[c]['rps'] / cpu_path[c]['rps']:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="build/bench-serve")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--rounds", type=int, default=3, help="medians over this many alternating rounds")
    parser.add_argument("--triton-python", help="python of a venv with nvidia-pytriton (see bench/serve_triton.py)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: also serve with --device cuda (GPU serving) and compare with the CPU path")
    parser.add_argument("--cuda-device", type=int, default=0)
    args = parser.parse_args()
    if args.device == "cuda":
        from recserve.server.gpu import cuda_unavailable_reason

        reason = cuda_unavailable_reason(args.cuda_device)
        if reason is not None:
            print(f"bench/serve.py --device cuda: skipped, this machine cannot serve on CUDA ({reason})")
            return
    text = report(run(args), args)
    out = HERE / "results" / ("serve-cuda.md" if args.device == "cuda" else "serve.md")
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
