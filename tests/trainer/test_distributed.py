"""The data-parallel gradient sync, in two real gloo processes (torch.multiprocessing)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from recserve.trainer.distributed import average_gradients, broadcast_parameters, check_ranks_in_sync

WORLD = 2


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.users = nn.EmbeddingBag(50, 4, mode="sum", sparse=True)
        self.words = nn.EmbeddingBag(30, 3, mode="sum", sparse=True)
        self.unused = nn.EmbeddingBag(10, 2, mode="sum", sparse=True)  # no gradient on any rank
        self.tower = nn.Linear(4, 2)
        self.bias_only_on_rank_0 = nn.Parameter(torch.zeros(3))


def rank_gradients(rank: int, model: Model) -> None:
    """Different rows, counts and duplicates per rank; `words` has no rows at all on rank 1."""
    g = torch.Generator().manual_seed(rank)
    users = torch.tensor([[3, 7, 7, 49], [0, 7, 12, 3]][rank])
    model.users.weight.grad = torch.sparse_coo_tensor(users[None], torch.randn(4, 4, generator=g), (50, 4),
                                                       check_invariants=True)
    words = torch.tensor([1, 29]) if rank == 0 else torch.zeros(0, dtype=torch.int64)
    model.words.weight.grad = torch.sparse_coo_tensor(words[None], torch.randn(len(words), 3, generator=g), (30, 3),
                                                       check_invariants=True)
    model.tower.weight.grad = torch.randn(2, 4, generator=g)
    model.tower.bias.grad = torch.randn(2, generator=g)
    if rank == 0:
        model.bias_only_on_rank_0.grad = torch.randn(3, generator=g)


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    torch.manual_seed(100 + rank)  # different initial weights per rank
    model = Model()
    broadcast_parameters(model)
    rank_gradients(rank, model)
    average_gradients(model, WORLD)
    grads = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad) for n, p in model.named_parameters()}
    sparse = {n: p.grad.is_sparse and p.grad.is_coalesced() for n, p in model.named_parameters()}
    check_ranks_in_sync(model)  # same weights after the broadcast
    with torch.no_grad():
        model.tower.bias.add_(rank)
    try:
        check_ranks_in_sync(model)
        diverged = None
    except RuntimeError as e:
        diverged = str(e)
    torch.save({"weights": model.state_dict(), "grads": grads, "sparse": sparse, "diverged": diverged},
               f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(f"file://{tmp / 'store'}", str(tmp / "out")), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"out.{r}", weights_only=True) for r in range(WORLD)]


def test_gradients_are_the_mean_over_ranks_dense_and_sparse(results):
    expected = {}
    for rank in range(WORLD):
        model = Model()
        rank_gradients(rank, model)
        for name, p in model.named_parameters():
            g = torch.zeros_like(p) if p.grad is None else (p.grad.to_dense() if p.grad.is_sparse else p.grad)
            expected[name] = expected.get(name, 0) + g / WORLD
    for rank, got in enumerate(results):
        assert got["grads"].keys() == expected.keys()
        for name, want in expected.items():
            torch.testing.assert_close(got["grads"][name], want, rtol=0, atol=1e-6, msg=f"rank {rank}: {name}")
        # tables keep sparse, coalesced gradients (SparseAdam needs them)
        assert got["sparse"] == {"users.weight": True, "words.weight": True, "unused.weight": True,
                                 "tower.weight": False, "tower.bias": False, "bias_only_on_rank_0": False}
    assert expected["users.weight"][7].abs().sum() > 0 and expected["unused.weight"].abs().sum() == 0
    for name in expected:  # every rank ends with bit-identical gradients
        assert torch.equal(results[0]["grads"][name], results[1]["grads"][name]), name


def test_broadcast_makes_every_rank_start_from_rank_0_and_divergence_is_caught(results):
    for name, w in results[0]["weights"].items():
        other = results[1]["weights"][name]
        assert torch.equal(w, other) if name != "tower.bias" else torch.equal(w + 1, other), name
    assert results[0]["diverged"] == results[1]["diverged"] == \
        "distributed training ended with different weights on different ranks"
