"""Training configuration: one frozen dataclass, saved as ``config.json`` in the run dir.

    cfg = TrainConfig(interactions="data/interactions.csv.gz", items="data/items.csv.gz")
    cfg = TrainConfig.from_json(run_dir / "config.json")
    cfg = cfg.replace(epochs=2)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("leave_last_out", "last_basket")
MODELS = ("two_tower", "mf")


_SCALARS = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _check_type(name: str, annotation: str, value) -> None:
    """JSON configs arrive untyped: "3" for 3 must be an error naming the key, not a crash."""
    want = annotation.replace(" | None", "")
    ok = value is None and annotation.endswith("| None")
    if want.startswith("tuple["):
        want = want[len("tuple["):].split(",")[0]
        ok = ok or isinstance(value, (list, tuple)) and all(
            isinstance(v, _SCALARS[want]) and not isinstance(v, bool) for v in value)
        want = f"a list of {want}"
    else:
        ok = ok or isinstance(value, _SCALARS[want]) and (want == "bool" or not isinstance(value, bool))
    if not ok:
        raise ValueError(f"config: {name} must be {want}{' or null' if '| None' in annotation else ''}, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    interactions: str
    items: str | None = None
    # data and split
    split: str = "leave_last_out"
    min_events: int = 5  # users with fewer events (or baskets, for last_basket) are not tested
    basket_column: str = "invoice"
    history_len: int = 50
    # features
    model: str = "two_tower"  # "mf": user id and item id only, no MLP (the MF baseline)
    seed: int = 0
    user_id_buckets: int = 1 << 15
    item_id_buckets: int = 1 << 15
    text_buckets: int = 1 << 14
    price_bins: int = 16  # quantile bins of the item price column, when there is one
    context_columns: tuple[str, ...] = ()  # extra interaction columns used as user context
    id_dim: int = 64
    text_dim: int = 32
    small_dim: int = 8
    # model
    hidden: tuple[int, ...] = (128,)
    out_dim: int = 64
    temperature: float = 0.05
    logq_correction: bool = True
    # optimisation
    epochs: int = 8
    batch_size: int = 1024
    lr: float = 3e-3
    threads: int = 0  # torch intra-op threads; 0 = all cores
    # evaluation
    eval_ks: tuple[int, ...] = (10, 20, 50)
    exclude_seen: bool = False  # repeat purchases are real targets in retail data

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_type(f.name, f.type, getattr(self, f.name))
        for name in ("hidden", "context_columns", "eval_ks"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        checks = [
            (self.split in SPLITS, "split", f"one of {SPLITS}"),
            (self.model in MODELS, "model", f"one of {MODELS}"),
            (self.min_events >= 2, "min_events", ">= 2"),
            (self.history_len >= 0, "history_len", ">= 0"),
            (self.epochs >= 1, "epochs", ">= 1"),
            (self.batch_size >= 2, "batch_size", ">= 2 (in-batch negatives)"),
            (self.lr > 0, "lr", "> 0"),
            (self.temperature > 0, "temperature", "> 0"),
            (self.out_dim >= 1 and self.id_dim >= 1, "out_dim/id_dim", ">= 1"),
            (all(k >= 1 for k in self.eval_ks) and self.eval_ks, "eval_ks", "positive"),
            (all(b >= 1 for b in (self.user_id_buckets, self.item_id_buckets, self.text_buckets)), "buckets", ">= 1"),
            (self.price_bins >= 2, "price_bins", ">= 2"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise ValueError(f"config: {name} must be {want}")

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown key {unknown[0]!r}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: Path) -> TrainConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
