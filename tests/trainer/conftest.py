"""Tiny planted-structure datasets and one trained run, shared by the trainer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from recserve.trainer.config import TrainConfig
from recserve.trainer.synthetic import SyntheticConfig, write_dataset

RETAIL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "online-retail"
TINY = SyntheticConfig(n_users=400, n_items=120, n_clusters=6, mean_baskets=5.0, mean_basket_size=3.0, seed=11)


def tiny_config(data_dir: Path, **changes) -> TrainConfig:
    base = dict(
        interactions=str(data_dir / "interactions.csv.gz"), items=str(data_dir / "items.csv.gz"),
        epochs=3, batch_size=128, lr=1e-2, user_id_buckets=1024, item_id_buckets=512, text_buckets=256,
        id_dim=16, text_dim=8, small_dim=4, hidden=(32,), out_dim=16, history_len=10, threads=1,
        eval_ks=(5, 10),
    )
    base.update(changes)
    return TrainConfig(**base)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-data")
    write_dataset(TINY, out, fmt="csv.gz")
    (out / "README.md").write_text("# tiny\n\nLicense: CC0 (synthetic, made by the tests).\n")
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    from recserve.trainer.train import train

    run = tmp_path_factory.mktemp("tiny-run")
    train(tiny_config(tiny_data), run, progress=False)
    return run
