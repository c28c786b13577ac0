"""Trainer benchmark: the default config on Online Retail vs popularity and MF baselines.

Usage::

    .venv/bin/python bench/trainer.py                         # both splits, default config
    .venv/bin/python bench/trainer.py --splits leave_last_out
    .venv/bin/python bench/trainer.py --data /path/to/online-retail --work /tmp/bench-trainer

For each split it times ``recserve train`` end to end with the default TrainConfig (load,
encode, train, per-epoch evaluation, checkpoints), then evaluates the run against the
popularity and matrix-factorisation baselines on the same held-out users. Targets (trainer
issue): leave-last-out recall@20 >= 2x popularity's, training under 10 minutes on the
2-core dev machine. Prints Markdown and writes bench/results/trainer.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from recserve.trainer.config import TrainConfig
from recserve.trainer.evaluate import evaluate_run
from recserve.trainer.train import train

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "online-retail"
TIME_TARGET_S = 600
RATIO_TARGET = 2.0


def run_split(data: Path, work: Path, split: str) -> dict:
    cfg = TrainConfig(interactions=str(data / "interactions.csv.gz"), items=str(data / "items.csv.gz"), split=split)
    run = work / split
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    summary = train(cfg, run, progress=False)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = evaluate_run(run, baselines=("popularity", "mf"), progress=False)
    eval_s = time.perf_counter() - t0
    return {"cfg": cfg, "train_s": train_s, "eval_s": eval_s, "results": results, "summary": summary}


def report(outcomes: dict[str, dict]) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    lines = [
        "## Trainer: Online Retail, default config",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "Command: `.venv/bin/python bench/trainer.py`",
        "",
    ]
    for split, o in outcomes.items():
        cfg, results = o["cfg"], o["results"]
        k = 20 if 20 in cfg.eval_ks else max(cfg.eval_ks)
        model = results["two_tower (run)"]
        pop = results["popularity"]
        ratio = model[f"recall@{k}"] / pop[f"recall@{k}"]
        lines += [
            f"### split `{split}` ({cfg.epochs} epochs, batch {cfg.batch_size}, d={cfg.out_dim})",
            "",
            f"- train wall time: {o['train_s']:.0f} s (target < {TIME_TARGET_S} s: "
            f"{'met' if o['train_s'] < TIME_TARGET_S else 'NOT met'}); "
            f"{o['summary']['final']['examples_per_s']:,.0f} examples/s in the last epoch",
            f"- evaluation incl. training the MF baseline: {o['eval_s']:.0f} s",
            f"- recall@{k}: two-tower / popularity = {ratio:.2f}x"
            + (f" (target >= {RATIO_TARGET}x: {'met' if ratio >= RATIO_TARGET else 'NOT met'})"
               if split == "leave_last_out" else ""),
            "",
            "| model | " + " | ".join(model) + " |",
            "|---|" + "---:|" * len(model),
        ]
        for name, values in results.items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values.values()) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--splits", default="leave_last_out,last_basket")
    parser.add_argument("--work", type=Path, help="where runs go (default: a temp dir, deleted)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="recserve-bench-trainer-"))
    try:
        outcomes = {split: run_split(args.data, work, split) for split in args.splits.split(",")}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    text = report(outcomes)
    out = Path(__file__).parent / "results" / "trainer.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
