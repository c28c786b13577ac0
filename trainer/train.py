"""Train a two-tower retrieval model (or the MF baseline) into a run directory.

    recserve train runs/retail --interactions data/interactions.csv.gz --items data/items.csv.gz
    recserve train runs/retail --resume          # continue from the last checkpoint
    torchrun --nproc_per_node=2 -m recserve.cli.main train ...   # data-parallel (distributed.py)

Run directory: config.json, spec.json, checkpoint.pt (after every epoch: weights, optimizer,
losses; ``--resume`` continues from it and ends bit-identical to an uninterrupted run),
model.pt (final weights), metrics.json (per-epoch loss, throughput, held-out metrics) and
curves.png. Deterministic given the seed, the world size and the thread count: the data
order of epoch e is a permutation drawn from (seed, e) alone.

Under torchrun every rank takes an equal share of each global batch and the gradients are
averaged over the ranks after each backward (gloo; see distributed.py for why not DDP);
in-batch negatives are the rank's own share. Rank 0 writes the run directory.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from recserve.features.spec import FeatureSpec
from recserve.server.repository import write_json
from recserve.trainer.config import TrainConfig
from recserve.features.csr import take_bags
from recserve.trainer.data import Dataset, build_spec, encode_training, load_dataset
from recserve.trainer.distributed import average_gradients, broadcast_parameters, check_ranks_in_sync, init_distributed
from recserve.trainer.model import TwoTower

CONFIG, SPEC, CHECKPOINT, MODEL, METRICS, CURVES = (
    "config.json", "spec.json", "checkpoint.pt", "model.pt", "metrics.json", "curves.png")


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _to_torch(bags: tuple[np.ndarray, np.ndarray]):
    return torch.from_numpy(bags[0]), torch.from_numpy(bags[1])


def _batch(enc, rows: np.ndarray, log_q_all: torch.Tensor | None):
    user_bags = {name: _to_torch(take_bags(b, rows)) for name, b in enc.user_bags.items()}
    items = enc.example_item[rows]
    uniq, item_rows = np.unique(items, return_inverse=True)
    item_bags = {name: _to_torch(take_bags(b, uniq)) for name, b in enc.item_bags.items()}
    log_q = log_q_all[torch.from_numpy(items)] if log_q_all is not None else None
    return user_bags, item_bags, torch.from_numpy(item_rows.astype(np.int64)), log_q


def plot_curves(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    losses = np.asarray(metrics["step_loss"])
    if len(losses):
        window = max(1, len(losses) // 100)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axes[0].plot(losses, alpha=0.25, label="step")
        axes[0].plot(np.arange(len(smooth)) + window - 1, smooth, label=f"mean of {window}")
        axes[0].legend()
    axes[0].set(title="training loss", xlabel="step", ylabel="sampled softmax loss")
    epochs = [e for e in metrics["epochs"] if e.get("eval")]
    for name in (epochs[0]["eval"] if epochs else {}):
        if name.startswith(("recall", "ndcg")):
            axes[1].plot([e["epoch"] for e in epochs], [e["eval"][name] for e in epochs], marker="o", label=name)
    axes[1].set(title="held-out metrics", xlabel="epoch")
    if epochs:
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(cfg: TrainConfig, run_dir: Path, *, resume: bool = False, progress: bool = True,
          evaluate_each_epoch: bool = True) -> dict:
    """Train into ``run_dir``; returns metrics.json's content."""
    from recserve.trainer.evaluate import model_topk, split_test_set
    from recserve.trainer.metrics import retrieval_metrics

    world = init_distributed()
    run_dir = Path(run_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Multi-threaded sparse-gradient coalescing sums in a varying order; the deterministic
    # kernels cost ~10 % per step on CPU and make a seed reproduce a run bit for bit.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.batch_size % world.size:
        raise ValueError(f"batch_size {cfg.batch_size} must divide evenly over {world.size} processes")
    data = load_dataset(cfg)
    spec = build_spec(cfg, data)
    enc = encode_training(cfg, spec, data)
    torch.manual_seed(cfg.seed)
    model = TwoTower(spec, cfg)
    optimizers = model.optimizers(cfg.lr)
    metrics = {"epochs": [], "step_loss": []}
    start_epoch = 0
    if resume:
        state = _load_checkpoint(run_dir / CHECKPOINT)
        if TrainConfig.from_dict(state["config"]).replace(epochs=cfg.epochs) != cfg:
            raise ValueError(f"{run_dir / CHECKPOINT}: was written with a different config (only epochs may change)")
        if FeatureSpec.from_dict(json.loads((run_dir / SPEC).read_text())) != spec:
            raise ValueError(f"{run_dir}: the training data changed since the checkpoint (feature spec differs)")
        if state["epoch"] > cfg.epochs:
            raise ValueError(f"{run_dir / CHECKPOINT}: already at epoch {state['epoch']}, more than epochs={cfg.epochs}")
        model.load_state_dict(state["model"])
        for opt, opt_state in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        metrics, start_epoch = state["metrics"], state["epoch"]
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / CONFIG, cfg.to_dict())
        write_json(run_dir / SPEC, spec.to_dict())
    if world.size > 1:
        broadcast_parameters(model)

    counts = np.bincount(enc.example_item, minlength=len(data.catalog)).astype(np.float64)
    log_q_all = (torch.from_numpy(np.log(np.maximum(counts, 1) / counts.sum())).float()
                 if cfg.logq_correction else None)
    n_examples = len(enc.example_item)
    steps = max(1, n_examples // cfg.batch_size)
    test = split_test_set(data)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n_examples)
        bar = _progress(steps, f"epoch {epoch + 1}/{cfg.epochs}", progress and world.is_main)
        started, losses = time.perf_counter(), []
        for step in range(steps):
            rows = order[step * cfg.batch_size:(step + 1) * cfg.batch_size][world.rank::world.size]
            loss = model(*_batch(enc, rows, log_q_all))
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            if world.size > 1:
                average_gradients(model, world.size)
            for opt in optimizers:
                opt.step()
            losses.append(loss.item())
            if bar is not None:
                rate = (step + 1) * cfg.batch_size / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", ex_per_s=f"{rate:,.0f}", refresh=False)
                bar.update()
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - started
        if not world.is_main:
            continue
        record = {"epoch": epoch + 1, "world_size": world.size, "loss": float(np.mean(losses)), "seconds": seconds,
                  "examples_per_s": steps * cfg.batch_size / seconds}
        if evaluate_each_epoch or epoch + 1 == cfg.epochs:
            rows = model_topk(model, cfg, spec, data, test, max(cfg.eval_ks))
            record["eval"] = retrieval_metrics(rows, test.indptr, test.items, cfg.eval_ks)
        metrics["epochs"].append(record)
        metrics["step_loss"].extend(losses)
        _atomic_save({"config": cfg.to_dict(), "model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
                      "epoch": epoch + 1, "metrics": metrics}, run_dir / CHECKPOINT)
        write_json(run_dir / METRICS, _summary(metrics))
        plot_curves(metrics, run_dir / CURVES)
        if progress:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in record.get("eval", {}).items())
            print(f"epoch {epoch + 1}: loss {record['loss']:.4f}, {record['examples_per_s']:,.0f} ex/s"
                  + (f", {shown}" if shown else ""), flush=True)
    if world.size > 1:
        check_ranks_in_sync(model)
    if world.is_main:
        _atomic_save(model.state_dict(), run_dir / MODEL)
    if world.size > 1:
        dist.barrier()
    return _summary(metrics)


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no checkpoint to resume from") from None
    except Exception as e:  # a truncated or foreign file: pickle/zip errors of many kinds
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def _summary(metrics: dict) -> dict:
    epochs = metrics["epochs"]
    return {"epochs": epochs, "final": epochs[-1] if epochs else None}


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False)


def load_trained(run_dir: Path) -> tuple[TrainConfig, FeatureSpec, Dataset, TwoTower]:
    """Config, spec, data and final weights of a finished run."""
    run_dir = Path(run_dir)
    if not (run_dir / MODEL).exists():
        raise FileNotFoundError(f"{run_dir}: not a finished run (no {MODEL}; train it, or --resume it)")
    cfg = TrainConfig.from_json(run_dir / CONFIG)
    spec = FeatureSpec.from_dict(json.loads((run_dir / SPEC).read_text()))
    data = load_dataset(cfg)
    if build_spec(cfg, data) != spec:
        raise ValueError(f"{run_dir}: the training data changed since this run (feature spec differs)")
    model = TwoTower(spec, cfg)
    model.load_state_dict(torch.load(run_dir / MODEL, weights_only=True))
    model.eval()
    return cfg, spec, data, model
