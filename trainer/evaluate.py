"""Offline evaluation of a run against built-in baselines (popularity, matrix factorisation).

    recserve evaluate runs/retail                      # held-out split of the run's data
    recserve evaluate runs/retail --test heldout.csv   # user_id,item_id rows to predict
    results = evaluate_run(Path("runs/retail"), baselines=("popularity", "mf"))
    print(format_table(results))

Retrieval for the model goes the serving way: raw user records -> feature spec ->
``kernels.embedding_bag`` -> user tower -> ``kernels.topk_inner_product`` over the catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recserve import kernels
from recserve.features.csr import find_sorted, group_pairs, take_bags
from recserve.features.logs import lookup_ids, read_table
from recserve.features.spec import FeatureSpec
from recserve.trainer.config import TrainConfig
from recserve.trainer.data import Dataset, item_bags, user_records
from recserve.trainer.metrics import retrieval_metrics
from recserve.trainer.model import TwoTower

BASELINES = ("popularity", "mf")


@dataclass(frozen=True)
class TestSet:
    users: np.ndarray  # user codes; -1 for users unknown to the training data
    user_ids: np.ndarray  # raw ids (str)
    indptr: np.ndarray
    items: np.ndarray  # catalogue rows
    context_event: np.ndarray | None


def split_test_set(data: Dataset) -> TestSet:
    s = data.split
    return TestSet(s.test_users, data.user_ids[s.test_users], s.test_indptr, s.test_items, s.test_context_event)


def file_test_set(path: Path, data: Dataset) -> TestSet:
    """Held-out (user_id, item_id) rows from a file; an item outside the catalogue is an error."""
    table = read_table(path, required=("user_id", "item_id"), id_columns=("user_id", "item_id"))
    users, items = table["user_id"].astype(str), table["item_id"].astype(str)
    rows = lookup_ids(Path(path), "item_id", items, data.catalog.ids)
    uniq, inverse = np.unique(users, return_inverse=True)
    _, indptr, test_items = group_pairs(inverse, rows)
    pos, known = find_sorted(data.user_ids, uniq)
    return TestSet(np.where(known, pos, -1), uniq, indptr, test_items, None)


def numpy_tables(model: TwoTower) -> dict[str, np.ndarray]:
    return {name: bag.weight.detach().cpu().numpy() for name, bag in model.tables.items()}


@torch.no_grad()
def item_matrix(model: TwoTower, spec: FeatureSpec, data: Dataset) -> np.ndarray:
    pooled = spec.pool("item", item_bags(spec, data.catalog), numpy_tables(model))
    tensors = [torch.from_numpy(pooled[f.name]) for f in spec.side_fields("item")]
    return model.item_tower(*tensors).numpy()


@torch.no_grad()
def user_vectors(model: TwoTower, spec: FeatureSpec, records: list[dict]) -> np.ndarray:
    pooled = spec.pool("user", spec.encode("user", records), numpy_tables(model))
    tensors = [torch.from_numpy(pooled[f.name]) for f in spec.side_fields("user")]
    return model.user_tower(*tensors).numpy()


def test_records(cfg: TrainConfig, data: Dataset, test: TestSet) -> list[dict]:
    known = test.users >= 0
    records = [{"user_id": str(u)} for u in test.user_ids]
    if known.any():
        context = test.context_event[known] if test.context_event is not None else None
        for i, r in zip(np.flatnonzero(known), user_records(data, test.users[known], cfg.history_len, context)):
            records[i] = r
    return records


def seen_bags(data: Dataset, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(item rows, offsets): the items each user interacted with in training (exclude_seen)."""
    train = data.split.train
    seen_users, indptr, items = group_pairs(data.user[train], data.item[train])
    pos, known = find_sorted(seen_users, users)
    # A user with no training events (a cold start) points at one extra, empty bag.
    return take_bags((items, np.r_[indptr, indptr[-1]]), np.where(known, pos, len(seen_users)))


def model_topk(model: TwoTower, cfg: TrainConfig, spec: FeatureSpec, data: Dataset, test: TestSet,
               k: int) -> np.ndarray:
    model.eval()
    queries = user_vectors(model, spec, test_records(cfg, data, test))
    items = item_matrix(model, spec, data)
    ids, indptr = seen_bags(data, test.users) if cfg.exclude_seen else (None, None)
    _, rows = kernels.topk_inner_product(queries, items, k, exclude_indptr=indptr, exclude_ids=ids)
    return rows


def popularity_topk(cfg: TrainConfig, data: Dataset, test: TestSet, k: int) -> np.ndarray:
    """Most-bought items in training (ties to the smaller catalogue row), seen items excluded
    when the config excludes them for the model too."""
    counts = data.train_item_counts.astype(np.float32)[:, None]
    queries = np.ones((len(test.users), 1), np.float32)
    ids, indptr = seen_bags(data, test.users) if cfg.exclude_seen else (None, None)
    _, rows = kernels.topk_inner_product(queries, counts, k, exclude_indptr=indptr, exclude_ids=ids)
    return rows


def evaluate_run(run_dir: Path, baselines: tuple[str, ...] = BASELINES, test_path: Path | None = None,
                 progress: bool = True) -> dict[str, dict]:
    from recserve.trainer.train import CONFIG, MODEL, load_trained, train

    run_dir = Path(run_dir)
    for b in baselines:
        if b not in BASELINES:
            raise ValueError(f"unknown baseline {b!r} (known: {', '.join(BASELINES)})")
    cfg, spec, data, model = load_trained(run_dir)
    test = file_test_set(test_path, data) if test_path else split_test_set(data)
    k = max(cfg.eval_ks)
    results = {f"{cfg.model} (run)": retrieval_metrics(model_topk(model, cfg, spec, data, test, k),
                                                       test.indptr, test.items, cfg.eval_ks)}
    if "popularity" in baselines:
        results["popularity"] = retrieval_metrics(popularity_topk(cfg, data, test, k), test.indptr, test.items,
                                                  cfg.eval_ks)
    if "mf" in baselines and cfg.model != "mf":
        mf_dir = run_dir / "baselines" / "mf"
        mf_cfg = cfg.replace(model="mf")
        if not (mf_dir / MODEL).exists() or TrainConfig.from_json(mf_dir / CONFIG) != mf_cfg:
            train(mf_cfg, mf_dir, progress=progress, evaluate_each_epoch=False)
        mf_cfg, mf_spec, _, mf_model = load_trained(mf_dir)
        results["mf"] = retrieval_metrics(model_topk(mf_model, mf_cfg, mf_spec, data, test, k), test.indptr,
                                          test.items, cfg.eval_ks)
    return results


def format_table(results: dict[str, dict]) -> str:
    metrics = list(next(iter(results.values())))
    width = max(len(name) for name in results) + 2
    lines = ["model".ljust(width) + "".join(m.rjust(11) for m in metrics)]
    for name, values in results.items():
        lines.append(name.ljust(width) + "".join(f"{values[m]:11.4f}" for m in metrics))
    return "\n".join(lines)
