"""The few collectives the budgeted DataModule needs; each is the identity when no process group is running."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _running() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if _running() else (0, 1)


def barrier() -> None:
    if _running():
        dist.barrier()


def all_sum(n: int, device: torch.device | None) -> int:
    """The sum of ``n`` over ranks (``device``: where NCCL wants the tensor; CPU for gloo)."""
    if not _running():
        return n
    t = torch.tensor([n], device=device or "cpu")
    dist.all_reduce(t)
    return int(t.item())


def any_rank(flag: bool, device: torch.device | None) -> bool:
    """A collective OR of ``flag`` over ranks (every rank must call it: it also serves as a barrier)."""
    return all_sum(int(flag), device) > 0


def gather_strided(rows: torch.Tensor, total: int, device: torch.device | None) -> torch.Tensor:
    """Rows computed by each rank for positions ``rank::world`` of ``total``, assembled in position order.

    Every rank gets the whole ``(total, ...)`` tensor (on the CPU). Shards are padded to one length for the
    all-gather, so ranks holding one row fewer take part like the others.
    """
    rank, world = rank_world()
    if world == 1:
        return rows
    per_rank = -(-total // world)
    pad = rows.new_zeros((per_rank - len(rows), *rows.shape[1:]))
    mine = torch.cat([rows, pad]).to(device or "cpu")
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    out = rows.new_empty((total, *rows.shape[1:]))
    for r, part in enumerate(parts):
        n_r = len(range(r, total, world))
        out[r::world] = part[:n_r].cpu()
    return out
