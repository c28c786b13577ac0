"""GPU kernel benchmark (issue 8): recserve's CUDA kernels vs torch on the same GPU, same run.

Usage::

    .venv-cuda/bin/python bench/gpu_kernels.py                 # needs a CUDA build, torch with CUDA, a GPU
    .venv-cuda/bin/python bench/gpu_kernels.py --quick --json results.json

Without a GPU (or a CUDA build of recserve, or torch with CUDA) it says which is missing and
exits 0. Method (/work/.library/device/METHOD.md): first the two ceilings, measured here — HBM
bandwidth from a large device-to-device copy (bytes read + bytes written) and the float32
matrix rate from torch.matmul with TF32 off — then every case is checked for correctness on
fresh random data (never zeros; outputs poisoned first), then timed with CUDA events (warm-up,
median of many repeats, two timings of the same case to show the spread; inputs rotate over
several sets where they could sit in L2).

Cases and targets:
  topk_inner_product  N=1,000,000 d=64 k=100 float32 items. B=1: time vs the HBM floor (items
                      read once at the measured bandwidth; target <= 1.4x) and vs
                      torch.topk(q @ items.T) (target >= 2x faster); B=256: vs torch (>= 2x).
  embedding_bag       1M x 64 float32 table, 4096 bags of 32 rows, sum: vs
                      torch.nn.functional.embedding_bag (target >= 1.5x), and vs its floor.
  hash_features       16M "field=value" tokens (flat bytes + offsets): tokens/s on device-resident
                      input (target >= 1e9/s), and separately with the host-to-device copy of the
                      flat bytes from pinned memory included.
Prints a table last; --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def unavailable() -> str | None:
    from recserve import kernels

    info = kernels.build_info()
    if not info["cuda"]:
        return info.get("cuda_error") or "recserve was built without CUDA kernels (make cuda-check builds them)"
    if info["cuda_devices"] == 0:
        return "no CUDA device is visible"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch is installed without CUDA support"
    return None


def timed(fn, *, warmup: int = 5, reps: int = 50) -> float:
    """Median milliseconds of ``fn()`` between CUDA events on the current stream."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def twice(fn, **kw) -> tuple[float, float]:
    """The same case timed twice: a difference smaller than their spread is noise."""
    return timed(fn, **kw), timed(fn, **kw)


def _poison_allocator(torch, nbytes: int) -> None:
    """Leave NaN-filled blocks in torch's caching allocator, so an output the kernel fails
    to write shows up as NaN (outputs are allocated by the kernels from that allocator)."""
    for size in (nbytes, nbytes // 3 + 1, 2 * nbytes // 3 + 1):
        torch.full((max(1, size // 4),), float("nan"), device="cuda")
    torch.cuda.synchronize()


def ceilings(torch, quick: bool) -> dict:
    n = (256 if quick else 1024) << 20  # bytes per buffer
    src = torch.randn(n // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), reps=20)
    bw = 2 * n / (ms / 1e3)  # read + write
    torch.backends.cuda.matmul.allow_tf32 = False
    m = 4096 if quick else 8192
    a, b = torch.randn(m, m, device="cuda"), torch.randn(m, m, device="cuda")
    ms_mm = timed(lambda: a @ b, reps=10)
    return {"copy_bytes_per_s": bw, "fp32_matmul_flops": 2 * m**3 / (ms_mm / 1e3)}


def bench_topk(torch, kernels, ceil: dict, quick: bool) -> list[dict]:
    n, d, k = (250_000 if quick else 1_000_000), 64, 100
    items = torch.randn(n, d, device="cuda")
    rows = []
    for batch in (1, 256):
        sets = [torch.randn(batch, d, device="cuda") for _ in range(4)]
        # correctness first, fresh data, poisoned outputs: against float64 torch
        q = sets[0]
        _poison_allocator(torch, batch * k * 12)
        scores, ids = kernels.topk_inner_product(q, items, k)
        assert bool(torch.isfinite(scores).all()) and int(ids.min()) >= 0, "unwritten top-k output"
        ref_scores, ref_ids = torch.topk(q.double() @ items.double().T, k)
        rel = float(torch.linalg.norm(scores.double() - ref_scores) / torch.linalg.norm(ref_scores))
        id_match = float((ids == ref_ids).double().mean())
        it = iter(range(10**9))
        ours = twice(lambda: kernels.topk_inner_product(sets[next(it) % 4], items, k))
        theirs = twice(lambda: torch.topk(sets[next(it) % 4] @ items.T, k))
        floor_ms = (n * d * 4 + batch * d * 4 + batch * k * 12) / ceil["copy_bytes_per_s"] * 1e3
        flops_ms = 2 * batch * n * d / ceil["fp32_matmul_flops"] * 1e3
        rows.append({"case": f"topk N={n} d={d} k={k} B={batch}", "recserve_ms": min(ours), "spread_ms": ours,
                     "torch_ms": min(theirs), "torch_spread_ms": theirs,
                     "speedup_vs_torch": min(theirs) / min(ours), "floor_ms": max(floor_ms, flops_ms),
                     "x_floor": min(ours) / max(floor_ms, flops_ms), "rel_err_vs_fp64": rel, "id_match": id_match})
    return rows


def bench_embedding_bag(torch, kernels, ceil: dict, quick: bool) -> list[dict]:
    import torch.nn.functional as F

    n, d, bags, per = (250_000 if quick else 1_000_000), 64, 4096, 32
    table = torch.randn(n, d, device="cuda")
    sets = []
    for _ in range(4):
        idx = torch.randint(0, n, (bags * per,), device="cuda")
        sets.append((idx, torch.arange(0, bags * per + 1, per, device="cuda")))
    idx, off = sets[0]
    _poison_allocator(torch, bags * d * 4)
    out = kernels.embedding_bag(table, idx, off, mode="sum")
    assert bool(torch.isfinite(out).all()), "unwritten embedding_bag output"
    ref = F.embedding_bag(idx, table.double(), off[:-1], mode="sum")
    rel = float(torch.linalg.norm(out.double() - ref) / torch.linalg.norm(ref))
    it = iter(range(10**9))
    ours = twice(lambda: kernels.embedding_bag(table, *sets[next(it) % 4], mode="sum", validate=False))
    checked = timed(lambda: kernels.embedding_bag(table, *sets[next(it) % 4], mode="sum"))
    theirs = twice(lambda: F.embedding_bag(sets[next(it) % 4][0], table, sets[next(it) % 4][1][:-1], mode="sum"))
    floor_ms = (bags * per * (d * 4 + 8) + bags * d * 4) / ceil["copy_bytes_per_s"] * 1e3
    return [{"case": f"embedding_bag {n}x{d} {bags} bags x {per}", "recserve_ms": min(ours), "spread_ms": ours,
             "recserve_validated_ms": checked, "torch_ms": min(theirs), "torch_spread_ms": theirs,
             "speedup_vs_torch": min(theirs) / min(ours), "floor_ms": floor_ms, "x_floor": min(ours) / floor_ms,
             "rel_err_vs_fp64": rel}]


def bench_hash(torch, kernels, quick: bool) -> list[dict]:
    import numpy as np

    from recserve.kernels import reference as ref

    n = (2 if quick else 16) << 20
    rng = np.random.default_rng(0)
    tokens = [f"item_id={v}" for v in rng.integers(0, 10**9, size=n).tolist()]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.fromiter(map(len, tokens), np.int64, n), out=offsets[1:])
    data = np.frombuffer("".join(tokens).encode(), np.uint8)
    dev_data, dev_off = torch.from_numpy(data.copy()).cuda(), torch.from_numpy(offsets).cuda()
    got = kernels.hash_features((dev_data, dev_off), seed=7, num_buckets=1 << 20).cpu().numpy()
    want = kernels.hash_features(tokens[:4096], seed=7, num_buckets=1 << 20)
    ok = bool((got[:4096] == want).all()) and bool((want[:64] == ref.hash_features(tokens[:64], seed=7,
                                                                                   num_buckets=1 << 20)).all())
    ours = twice(lambda: kernels.hash_features((dev_data, dev_off), seed=7, num_buckets=1 << 20, validate=False))
    pinned = torch.from_numpy(data.copy()).pin_memory()
    buf = torch.empty_like(dev_data)

    def with_copy():
        buf.copy_(pinned, non_blocking=True)
        kernels.hash_features((buf, dev_off), seed=7, num_buckets=1 << 20, validate=False)

    incl = timed(with_copy)
    return [{"case": f"hash_features {n} tokens ({len(data) / n:.1f} B each)", "recserve_ms": min(ours),
             "spread_ms": ours, "tokens_per_s": n / (min(ours) / 1e3), "with_h2d_ms": incl,
             "tokens_per_s_with_h2d": n / (incl / 1e3), "matches_cpu": ok}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--json", help="write every number to this file")
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        print(f"bench/gpu_kernels.py: skipped, no usable GPU here ({reason})")
        return 0
    import torch

    from recserve import kernels

    name = torch.cuda.get_device_name()
    ceil = ceilings(torch, args.quick)
    rows = bench_topk(torch, kernels, ceil, args.quick) + bench_embedding_bag(torch, kernels, ceil, args.quick)
    rows += bench_hash(torch, kernels, args.quick)
    result = {"device": name, "torch": torch.__version__, "build": kernels.build_info(), "ceilings": ceil, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    print(f"device: {name}; copy {ceil['copy_bytes_per_s'] / 1e9:.0f} GB/s (read+write), "
          f"fp32 matmul {ceil['fp32_matmul_flops'] / 1e12:.1f} TFLOP/s")
    print(f"{'case':<48} {'recserve ms':>11} {'torch ms':>9} {'vs torch':>8} {'x floor':>8} {'check':>10}")
    for r in rows:
        check = (f"{r['rel_err_vs_fp64']:.1e}" if "rel_err_vs_fp64" in r else
                 ("ok" if r.get("matches_cpu") else "MISMATCH"))
        torch_ms = f"{r['torch_ms']:.3f}" if "torch_ms" in r else "-"
        vs = f"{r['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in r else "-"
        xf = f"{r['x_floor']:.2f}" if "x_floor" in r else "-"
        print(f"{r['case']:<48} {r['recserve_ms']:>11.3f} {torch_ms:>9} {vs:>8} {xf:>8} {check:>10}")
        if "tokens_per_s" in r:
            print(f"{'':<48} {r['tokens_per_s'] / 1e9:.2f} G tokens/s on device, "
                  f"{r['tokens_per_s_with_h2d'] / 1e9:.2f} G tokens/s with the H2D copy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
