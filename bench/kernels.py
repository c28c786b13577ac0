"""Kernel benchmarks against baselines measured in the same run.

Usage::

    make bench                                  # installs torch + faiss-cpu, runs everything
    .venv/bin/python bench/kernels.py --quick   # smaller sizes, fewer rounds
    .venv/bin/python bench/kernels.py --only topk

Prints a Markdown report (medians, ratios vs each baseline, the targets from the
kernel issue) ready for docs/benchmarks.md, and writes it to bench/results/kernels.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from recserve import kernels

Timer = Callable[[], object]


def median_ms(contenders: dict[str, Timer], rounds: int, passes: int = 3) -> dict[str, float]:
    """Median wall time of each contender.

    Each contender runs in blocks of back-to-back calls after two warm-up calls: the
    steady state of a loaded server. (Interleaving single calls would measure
    thread wake-ups instead: each library's OpenMP/BLAS workers park while another
    library runs, and waking them costs ~1 ms on this VM.) Before each block the
    benchmark sleeps briefly so the previous library's spinning workers (OpenBLAS
    spins for a long time) stop competing for the cores. Blocks rotate over
    `passes` passes so slow drift on a shared machine hits every contender alike.
    """
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    per_pass = max(1, -(-rounds // passes))
    for _ in range(passes):
        for name, fn in contenders.items():
            time.sleep(0.3)
            fn()
            fn()
            for _ in range(per_pass):
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.add("| " + " | ".join(header) + " |")
        self.add("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            self.add("| " + " | ".join(row) + " |")
        self.add()

    def target(self, what: str, value: float, goal: float, *, at_most: bool = False) -> None:
        ok = value <= goal if at_most else value >= goal
        sign = "<=" if at_most else ">="
        self.add(f"- {what}: **{value:.2f}x** (target {sign} {goal}x) — {'met' if ok else 'NOT met'}")


def read_bandwidth_gbs(array: np.ndarray, rounds: int) -> float:
    """Best sustained read bandwidth we can measure: the faster of torch's
    multi-threaded sum and NumPy's single-threaded max over the same bytes."""
    import torch

    t = torch.from_numpy(array)
    ms = median_ms({"torch.sum": lambda: t.sum(), "np.max": lambda: array.max()}, rounds)
    return array.nbytes / (min(ms.values()) * 1e-3) / 1e9


def bench_topk(report: Report, quick: bool) -> None:
    import faiss
    import torch

    n_items = 200_000 if quick else 1_000_000
    d, k = 64, 100
    rng = np.random.default_rng(0)
    items = rng.standard_normal((n_items, d), dtype=np.float32)
    items16 = items.astype(np.float16)
    items_t = torch.from_numpy(items)
    index = faiss.IndexFlatIP(d)
    index.add(items)
    served = kernels.prepare_items(items)  # what the server searches (a copy made once per version)
    rounds = 5 if quick else 15

    bw = read_bandwidth_gbs(items, rounds)
    floor32 = items.nbytes / bw / 1e6
    floor16 = items16.nbytes / bw / 1e6
    report.add(f"### topk_inner_product: N = {n_items:,}, d = {d}, k = {k}")
    report.add()
    report.add(f"Measured read bandwidth {bw:.1f} GB/s -> memory floor {floor32:.2f} ms (float32 items), "
               f"{floor16:.2f} ms (float16 items).")
    report.add()
    rows, by_batch = [], {}
    for batch in (1, 32, 64):  # 64: the batch the 1M-item serving point computes
        q = rng.standard_normal((batch, d), dtype=np.float32)
        q_t = torch.from_numpy(q)
        contenders = {
            "recserve f32": lambda: kernels.topk_inner_product(q, items, k),
            "recserve f32, prepare_items": lambda: kernels.topk_inner_product(q, served, k),
            "recserve f16": lambda: kernels.topk_inner_product(q, items16, k),
            "torch mm+topk": lambda: torch.topk(q_t @ items_t.T, k),
            "faiss IndexFlatIP": lambda: index.search(q, k),
            "numpy matmul+argpartition": lambda: _numpy_topk(q, items, k),
        }
        if kernels.build_info()["cpu_isa"] == "amx":  # the same search without the tile unit
            contenders["recserve f32, prepare_items, avx512bf16"] = lambda: _with_isa(
                "avx512bf16", kernels.topk_inner_product, q, served, k)
        ms = median_ms(contenders, max(3, rounds // (4 if batch > 1 else 1)))
        ours = ms["recserve f32"]
        for name, t in ms.items():
            rows.append([str(batch), name, f"{t:.2f}", f"{t / ours:.2f}x" if name != "recserve f32" else "1.00x"])
        by_batch[batch] = ms
    b1, b32 = by_batch[1], by_batch[32]
    report.table(["B", "implementation", "median ms", "time / recserve f32"], rows)
    report.target("B=1: torch / recserve f32", b1["torch mm+topk"] / b1["recserve f32"], 1.5)
    report.target("B=1: recserve f32 / memory floor", b1["recserve f32"] / floor32, 1.25, at_most=True)
    report.target("B=32: torch / recserve f32", b32["torch mm+topk"] / b32["recserve f32"], 3.0)
    report.target("B=1: recserve f32 / recserve f16", b1["recserve f32"] / b1["recserve f16"], 1.8)
    report.add(f"- B=1 float16 vs its own floor: {b1['recserve f16'] / floor16:.2f}x")
    for batch, ms in by_batch.items():
        report.add(f"- B={batch}: recserve f32 / with prepare_items = "
                   f"{ms['recserve f32'] / ms['recserve f32, prepare_items']:.2f}x")
        if "recserve f32, prepare_items, avx512bf16" in ms:
            report.add(f"- B={batch}: prepare_items, avx512bf16 / amx = "
                       f"{ms['recserve f32, prepare_items, avx512bf16'] / ms['recserve f32, prepare_items']:.2f}x")
    report.add()


def bench_topk_clustered(report: Report, quick: bool) -> None:
    """Item and query vectors shaped like a trained two-tower model's (unit norm, around
    50 cluster centres; the 1M-item serving point's batch of 64, k = 20). Gaussian items
    pack the scores so close that the bfloat16 filter passes many rows; trained
    embeddings spread them, which is where the filter and its prepared rows pay off."""
    import torch

    n_items, d, k, batch = 200_000 if quick else 1_000_000, 64, 20, 64
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((50, d), dtype=np.float32)

    def around(n: int) -> np.ndarray:
        x = centres[rng.integers(0, 50, n)] + 0.6 * rng.standard_normal((n, d), dtype=np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    items, q = around(n_items), around(batch)
    items16, served = items.astype(np.float16), kernels.prepare_items(items)
    items_t, q_t = torch.from_numpy(items), torch.from_numpy(q)
    ms = median_ms({
        "recserve f32": lambda: kernels.topk_inner_product(q, items, k),
        "recserve f32, prepare_items": lambda: kernels.topk_inner_product(q, served, k),
        "recserve f16": lambda: kernels.topk_inner_product(q, items16, k),
        "torch mm+topk": lambda: torch.topk(q_t @ items_t.T, k),
    }, 5 if quick else 11)
    report.add(f"### topk_inner_product, trained-model-like vectors: N = {n_items:,}, d = {d}, k = {k}, B = {batch}")
    report.add()
    report.table(["implementation", "median ms", "time / recserve f32"],
                 [[name, f"{t:.2f}", f"{t / ms['recserve f32']:.2f}x"] for name, t in ms.items()])
    report.add(f"- recserve f32 / with prepare_items = "
               f"{ms['recserve f32'] / ms['recserve f32, prepare_items']:.2f}x")
    report.add()


def bench_topk_serving(report: Report, quick: bool) -> None:
    """The serving benchmark's shape: a 10,000-item catalogue, k = 20, the batch sizes
    dynamic batching forms. Small catalogues are where heap upkeep, not the dot products,
    sets the cost (thresholds rise late relative to the scan)."""
    import faiss
    import torch

    n_items, d, k = 10_000, 64, 20
    rng = np.random.default_rng(1)
    items = rng.standard_normal((n_items, d), dtype=np.float32)
    items_t = torch.from_numpy(items)
    index = faiss.IndexFlatIP(d)
    index.add(items)
    served = kernels.prepare_items(items)
    report.add(f"### topk_inner_product at serving size: N = {n_items:,}, d = {d}, k = {k}")
    report.add()
    rows = []
    for batch in (1, 8, 32, 64):
        q = rng.standard_normal((batch, d), dtype=np.float32)
        q_t = torch.from_numpy(q)
        ms = median_ms({
            "recserve f32": lambda: kernels.topk_inner_product(q, items, k),
            "prepared": lambda: kernels.topk_inner_product(q, served, k),
            "torch mm+topk": lambda: torch.topk(q_t @ items_t.T, k),
            "faiss IndexFlatIP": lambda: index.search(q, k),
        }, 10 if quick else 30)
        rows.append([str(batch)] + [f"{ms[n]:.3f}" for n in ("recserve f32", "prepared", "torch mm+topk",
                                                              "faiss IndexFlatIP")]
                    + [f"{ms['torch mm+topk'] / ms['prepared']:.2f}x"])
    report.table(["B", "recserve f32 ms", "with prepare_items ms", "torch mm+topk ms", "faiss ms",
                  "torch / recserve (prepared)"], rows)
    report.add()


def _with_isa(isa: str, fn, *args):
    """fn(*args) with the kernels' SIMD level forced to ``isa``, then back to the best."""
    from recserve import _C

    _C._set_isa(isa)
    try:
        return fn(*args)
    finally:
        _C._set_isa("best")


def _numpy_topk(q: np.ndarray, items: np.ndarray, k: int):
    scores = q @ items.T
    part = np.argpartition(-scores, k, axis=1)[:, :k]
    top = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(part, order, axis=1)


def bench_embedding_bag(report: Report, quick: bool) -> None:
    import torch
    import torch.nn.functional as F

    n_rows = 500_000 if quick else 4_000_000
    d, batch, fields = 64, 512, 26
    rng = np.random.default_rng(1)
    table = rng.standard_normal((n_rows, d), dtype=np.float32)
    table_t = torch.from_numpy(table)
    rounds = 5 if quick else 21
    report.add(f"### embedding_bag: table {n_rows:,} x {d} float32, batch {batch} x {fields} fields, sum")
    report.add()
    rows = []
    ratios = {}
    for bag in (1, 20):
        num_bags = batch * fields
        indices = rng.integers(0, n_rows, size=num_bags * bag, dtype=np.int64)
        offsets = np.arange(0, num_bags * bag + 1, bag, dtype=np.int64)
        ind_t, off_t = torch.from_numpy(indices), torch.from_numpy(offsets)
        contenders = {
            "recserve": lambda: kernels.embedding_bag(table, indices, offsets, mode="sum"),
            "torch F.embedding_bag": lambda: F.embedding_bag(ind_t, table_t, off_t, mode="sum",
                                                             include_last_offset=True),
            "numpy take+reduceat": lambda: np.add.reduceat(table[indices], offsets[:-1], axis=0),
        }
        ms = median_ms(contenders, rounds)
        for name, t in ms.items():
            rows.append([str(bag), name, f"{t:.3f}", f"{t / ms['recserve']:.2f}x"])
        ratios[bag] = ms["torch F.embedding_bag"] / ms["recserve"]
    report.table(["bag size", "implementation", "median ms", "time / recserve"], rows)
    for bag, r in ratios.items():
        report.target(f"bag size {bag}: torch / recserve", r, 1.2)
    report.add()


def bench_hash(report: Report, quick: bool) -> None:
    import mmh3

    n = 200_000 if quick else 1_000_000
    tokens = [f"user_id={i * 7919 % 1_000_003}" for i in range(n)]
    as_array = np.array(tokens)
    encoded = [t.encode() for t in tokens]
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(e) for e in encoded])
    flat = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    buckets = 1 << 22

    def python_loop():
        return [mmh3.hash(t, 0, signed=False) % buckets for t in tokens]

    contenders = {
        "recserve list[str]": lambda: kernels.hash_features(tokens, seed=0, num_buckets=buckets),
        "recserve np.str_ array": lambda: kernels.hash_features(as_array, seed=0, num_buckets=buckets),
        "recserve flat bytes+offsets": lambda: kernels.hash_features((flat, offsets), seed=0, num_buckets=buckets),
        "python loop over mmh3.hash": python_loop,
    }
    ms = median_ms(contenders, 5 if quick else 11)
    report.add(f"### hash_features: {n:,} tokens like `user_id=123456`")
    report.add()
    report.table(["implementation", "median ms", "Mtokens/s", "speed-up vs python loop"],
                 [[name, f"{t:.2f}", f"{n / t / 1e3:.1f}", f"{ms['python loop over mmh3.hash'] / t:.1f}x"]
                  for name, t in ms.items()])
    report.target("list[str]: python loop / recserve", ms["python loop over mmh3.hash"] / ms["recserve list[str]"], 5.0)
    report.add()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds")
    parser.add_argument("--only", choices=["topk", "embedding_bag", "hash"], action="append")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    info = kernels.build_info()
    report = Report()
    report.add(f"Machine: {cpu_model()}, {os.cpu_count()} cores; recserve {info['version']} "
               f"(CPU ISA {info['cpu_isa']}, {info['cpu_threads']} threads); torch {torch.__version__} "
               f"({torch.get_num_threads()} threads); numpy {np.__version__}.")
    report.add(f"Command: `python bench/kernels.py{' --quick' if args.quick else ''}`")
    report.add()
    wanted = args.only or ["topk", "embedding_bag", "hash"]
    if "topk" in wanted:
        bench_topk(report, args.quick)
        bench_topk_clustered(report, args.quick)
        bench_topk_serving(report, args.quick)
    if "embedding_bag" in wanted:
        bench_embedding_bag(report, args.quick)
    if "hash" in wanted:
        bench_hash(report, args.quick)
    out = Path(__file__).parent / "results" / "kernels.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(report.lines) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
