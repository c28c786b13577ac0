"""Scale benchmark of the synthetic data generator (recserve.trainer.synthetic).

Usage::

    .venv/bin/python bench/synthetic_scale.py                      # 10M users x 1M items, temp dir
    .venv/bin/python bench/synthetic_scale.py --users 1000000 --items 100000
    .venv/bin/python bench/synthetic_scale.py --out /data/synth --keep --format csv.gz

Runs `write_dataset` end to end (generation + Parquet/CSV encoding + disk writes) and
reports rows, wall time, rows/s, peak RSS of this process (ru_maxrss) and file sizes. Prints
a Markdown summary and writes it to bench/results/synthetic_scale.md. The output goes to a
temporary directory that is deleted afterwards unless --out is given.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recserve.trainer.synthetic import FORMATS, SyntheticConfig, interaction_chunks, write_dataset

RESULTS = Path(__file__).resolve().parent / "results" / "synthetic_scale.md"


def _peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return kib / (1024 * 1024) if sys.platform == "darwin" else kib / 1024


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    d = SyntheticConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=10_000_000)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--clusters", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--users-per-chunk", type=int, default=d.users_per_chunk)
    p.add_argument("--format", choices=FORMATS, default="parquet")
    p.add_argument("--out", help="output directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the temporary output")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    cfg = SyntheticConfig(
        n_users=args.users,
        n_items=args.items,
        n_clusters=args.clusters,
        seed=args.seed,
        users_per_chunk=args.users_per_chunk,
    )
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="synthetic_scale_"))
    rss_before = _peak_rss_mib()
    progress_every = max(1, cfg.n_users // 10)
    next_report = [progress_every]
    t0 = time.perf_counter()

    def on_chunk(users: int, rows: int) -> None:
        if users >= next_report[0] or users == cfg.n_users:
            el = time.perf_counter() - t0
            print(
                f"  {users:>12,} users {rows:>14,} rows {el:8.1f} s  peak RSS {_peak_rss_mib():,.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
            next_report[0] = users + progress_every

    try:
        inter, items = write_dataset(cfg, out, fmt=args.format, on_chunk=on_chunk)
        wall = time.perf_counter() - t0
        inter_size, items_size = inter.stat().st_size, items.stat().st_size
        if args.format == "parquet":
            meta = pq.ParquetFile(inter).metadata
            rows, row_groups = meta.num_rows, meta.num_row_groups
        else:
            rows, row_groups = None, None
    finally:
        if not args.out and not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    peak = _peak_rss_mib()

    rows_txt = f"{rows:,}" if rows is not None else "(not counted for CSV)"
    rate = f"{rows / wall:,.0f}" if rows is not None else "-"
    lines = [
        "# Synthetic data generator at scale",
        "",
        f"`bench/synthetic_scale.py --users {cfg.n_users} --items {cfg.n_items} --clusters {cfg.n_clusters}"
        f" --format {args.format}` on {platform.node()} ({os.cpu_count()} CPUs, Python"
        f" {platform.python_version()}, NumPy {np.__version__}, PyArrow {pa.__version__}), "
        f"{time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| users x items x clusters | {cfg.n_users:,} x {cfg.n_items:,} x {cfg.n_clusters} |",
        f"| users per chunk | {cfg.users_per_chunk:,} |",
        f"| interaction rows | {rows_txt} |",
        f"| row groups | {row_groups if row_groups is not None else '-'} |",
        f"| wall time (write_dataset) | {wall:,.1f} s |",
        f"| rows/s | {rate} |",
        f"| peak RSS (ru_maxrss) | {peak:,.0f} MiB (at start: {rss_before:,.0f} MiB) |",
        f"| interactions file | {_mib(inter_size)} ({inter.name}) |",
        f"| items file | {_mib(items_size)} ({items.name}) |",
    ]
    if rows:
        lines.append(f"| bytes per row | {inter_size / rows:.2f} |")
        # Baseline: holding every row in memory at once, measured as the Arrow size per
        # row of the first chunk, scaled to all rows.
        first = next(interaction_chunks(cfg))
        in_memory = first.nbytes / first.num_rows * rows
        lines.append(f"| baseline: all rows in memory (Arrow) | {in_memory / 2**30:,.1f} GiB "
                     f"({in_memory / 2**20 / peak:,.0f}x the streaming peak RSS) |")
    if args.out or args.keep:
        lines.append(f"| output | {out} |")
    report = "\n".join(lines) + "\n"
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(report)
    print(report)
    print(f"(written to {args.results})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
