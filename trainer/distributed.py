"""Data-parallel training over torchrun ranks (gloo): one process group, gradients averaged.

    world = init_distributed()                # World(rank, size); size 1 outside torchrun
    broadcast_parameters(model)               # every rank starts from rank 0's weights
    loss.backward(); average_gradients(model, world.size); optimizer.step()
    check_ranks_in_sync(model)                # at the end: the same weights everywhere

Why not DistributedDataParallel: its reducer all-reduces each gradient bucket on gloo's worker
thread while autograd is still running, and with the tables' sparse gradients the process
heap was corrupted now and then (2 of 76 runs of a stress loop on 2 cores, and in CI:
"malloc(): unaligned tcache chunk detected" inside backward, or SIGSEGV inside gloo's
allreduce reading a garbage buffer pointer, from a core dump; 0 of 140 runs since). Here
the gradients are reduced after backward returns, by blocking collectives on dense tensors
only, so one thread at a time touches them; a sparse gradient travels as its (row, value)
pairs, gathered from every rank and summed by coalesce. The sums run in rank order on every
rank, so a seed and world size reproduce a run bit for bit. Four collectives a step in all;
on Online Retail it trains as fast as DDP did.

The trainer trains on CPU, so the backend is gloo even where CUDA is present (NCCL would
need the model on the GPU, and cannot carry sparse gradients).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> World:
    """Join torchrun's process group (from its environment); a World of one outside torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return World(dist.get_rank(), dist.get_world_size())


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers to every rank (as DistributedDataParallel does at wrap)."""
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)


def average_gradients(model: torch.nn.Module, world_size: int) -> None:
    """Replace every parameter's gradient by its mean over the ranks; call after backward.

    Dense gradients go in one flat all-reduce; the sparse ones (embedding tables') as their
    rows and values, all-gathered and coalesced (a table is sparse when its Embedding or
    EmbeddingBag module says so). A parameter without a gradient counts as zero, so every
    rank runs the same collectives in the same order.
    """
    sparse_weights = {id(m.weight) for m in model.modules()
                      if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse}
    params = [p for p in model.parameters() if p.requires_grad]
    dense = [p for p in params if id(p) not in sparse_weights]
    sparse = [p for p in params if id(p) in sparse_weights]
    if dense:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in dense])
        dist.all_reduce(flat)
        flat /= world_size
        for p, grad in zip(dense, flat.split([p.numel() for p in dense])):
            p.grad = grad.view_as(p)
    if not sparse:
        return
    grads = [(p.grad if p.grad is not None else torch.sparse_coo_tensor(
        torch.zeros((1, 0), dtype=torch.int64), p.new_zeros((0, *p.shape[1:])), p.shape)).coalesce() for p in sparse]
    # All tables in one gather of rows and one of values: a collective costs more than the bytes.
    widths = torch.tensor([p[0].numel() for p in sparse])
    counts = torch.stack(_all_gather(torch.tensor([g._nnz() for g in grads])))  # [rank, table]
    row_totals, value_totals = counts.sum(1).tolist(), (counts * widths).sum(1).tolist()
    rows = _all_gather(_pad(torch.cat([g.indices()[0] for g in grads]), max(row_totals)))
    values = _all_gather(_pad(torch.cat([g.values().reshape(-1) for g in grads]), max(value_totals)))
    table_rows, table_values = [[] for _ in sparse], [[] for _ in sparse]
    for rank in range(world_size):
        by_table = zip(rows[rank][:row_totals[rank]].split(counts[rank].tolist()),
                       values[rank][:value_totals[rank]].split((counts[rank] * widths).tolist()))
        for k, (r, v) in enumerate(by_table):
            table_rows[k].append(r)
            table_values[k].append(v)
    for p, r, v in zip(sparse, table_rows, table_values):
        # check_invariants: a row out of the table's range fails here, not as a segfault later.
        p.grad = torch.sparse_coo_tensor(torch.cat(r)[None], torch.cat(v).view(-1, *p.shape[1:]) / world_size,
                                         p.shape, check_invariants=True).coalesce()


def check_ranks_in_sync(model: torch.nn.Module) -> None:
    """Every rank must end with the same weights (every gradient was averaged)."""
    mine = torch.stack([p.detach().double().sum() for p in model.parameters()])
    if any(not torch.equal(mine, other) for other in _all_gather(mine)):
        raise RuntimeError("distributed training ended with different weights on different ranks")


def _all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out


def _pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """``tensor`` with zero rows appended up to ``length`` rows (all_gather needs equal shapes)."""
    return torch.cat([tensor, tensor.new_zeros((length - len(tensor), *tensor.shape[1:]))])
