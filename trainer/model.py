"""Two-tower retrieval model: shared embedding tables, a user tower and an item tower.

    model = TwoTower(spec, cfg)
    loss = model(user_bags, item_bags, item_rows, log_q)   # in-batch sampled softmax
    dense = model.user_tower                                # exported to ONNX (pooled -> vector)

Each tower concatenates the pooled embeddings of its side's fields (in spec order) and maps
them through an MLP to ``out_dim`` (the MF baseline uses no MLP), then L2-normalises, so
retrieval scores are cosines scaled by ``1 / temperature`` during training. Embedding
lookup is not part of the towers: serving pools rows with ``recserve.kernels`` and feeds
the pooled vectors to the exported tower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recserve.features.spec import FeatureSpec
from recserve.trainer.config import TrainConfig

EMBEDDING_INIT_STD = 0.05


class Tower(nn.Module):
    """Pooled field embeddings (one tensor per field, spec order) -> unit-norm vector."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], out_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, *pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(torch.cat(pooled, dim=1)), dim=1)


class IdentityTower(nn.Module):
    """Matrix factorisation: the (single) pooled id embedding, normalised."""

    def forward(self, *pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.cat(pooled, dim=1), dim=1)


class TwoTower(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: TrainConfig):
        super().__init__()
        self.spec = spec
        # Sparse gradients touch only the rows of a batch: the optimiser step costs
        # O(batch) instead of O(table) (SparseAdam for tables, Adam for the towers).
        self.temperature = cfg.temperature
        # nn.EmbeddingBag modules (not bare parameters) so the data-parallel gradient sync
        # knows their gradients are sparse; pooling is per field, so forward uses their weights.
        self.tables = nn.ModuleDict()
        for t in spec.tables:
            bag = nn.EmbeddingBag(t.num_buckets, t.dim, mode="sum", sparse=True)
            nn.init.normal_(bag.weight, std=EMBEDDING_INIT_STD)
            self.tables[t.name] = bag
        if cfg.model == "mf":
            self.user_tower, self.item_tower = IdentityTower(), IdentityTower()
        else:
            self.user_tower = Tower(spec.input_dim("user"), cfg.hidden, cfg.out_dim)
            self.item_tower = Tower(spec.input_dim("item"), cfg.hidden, cfg.out_dim)

    def pool(self, side: str, bags: dict) -> list[torch.Tensor]:
        """Bags (torch index/offset tensors) -> pooled embeddings per field in spec order."""
        out = []
        for f in self.spec.side_fields(side):
            indices, offsets = bags[f.name]
            out.append(F.embedding_bag(indices, self.tables[f.table].weight, offsets, mode=f.pooling,
                                       include_last_offset=True, sparse=True))
        return out

    def encode(self, side: str, bags: dict) -> torch.Tensor:
        tower = self.user_tower if side == "user" else self.item_tower
        return tower(*self.pool(side, bags))

    def forward(self, user_bags: dict, item_bags: dict, item_rows: torch.Tensor,
                log_q: torch.Tensor | None) -> torch.Tensor:
        """In-batch sampled softmax loss with log-Q correction.

        ``item_bags`` holds the bags of the batch's distinct items; ``item_rows[i]`` is the
        position of example i's item among them. Other examples' items are the negatives;
        subtracting log Q (the item's share of training events) undoes in-batch sampling's
        bias towards popular items. A duplicate of the positive is masked, not a negative.
        """
        users = self.encode("user", user_bags)
        items = self.encode("item", item_bags)[item_rows]
        logits = users @ items.T / self.temperature
        if log_q is not None:
            logits = logits - log_q[None, :]
        same = item_rows[:, None] == item_rows[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(users), device=logits.device))

    def optimizers(self, lr: float) -> list[torch.optim.Optimizer]:
        tables = list(self.tables.parameters())
        dense = [p for name, p in self.named_parameters() if not name.startswith("tables.")]
        out = [torch.optim.SparseAdam(tables, lr=lr)]
        if dense:
            out.append(torch.optim.Adam(dense, lr=lr))
        return out
