"""Sharding an expensive pass (embeddings, text-tower heads, evaluation) over processes, and gathering it in order.

The pattern, for a map-style dataset of N rows and W processes:

    local = shard_dataset(dataset)            # this rank's contiguous block of rows (shard_range)
    rows = [f(batch) for batch in DataLoader(local, ...)]
    full = gather_rows(torch.cat(rows))       # every rank: [N, ...] in dataset order

Rank r takes the contiguous block `shard_range(N, r, W)` (blocks differ by at most one row, the first N % W ranks
take one more), so concatenating the blocks in rank order is the dataset order: no padding rows, no duplicates. A
rank may return fewer rows than its block (e.g. a skipped corrupt image) or none at all (more ranks than rows):
`gather_rows` sends each rank's row count first. Streams (`datasets.IterableDataset`) are split with
`datasets.distributed.split_dataset_by_node` instead; their gathered order is rank-major (see `shard_dataset`).

Every function here is a no-op on one process and needs no distributed initialisation then. With an initialised
`torch.distributed` group of W > 1 processes, the gathering functions are collective: every rank must call them, in
the same order. The library never initialises a process group itself (the Trainer / accelerate / the recipes do).
"""

from __future__ import annotations

from typing import Any

import datasets
import torch
import torch.distributed as dist
from datasets.distributed import split_dataset_by_node
from torch.utils.data import Subset


def rank_and_world_size() -> tuple[int, int]:
    """(this process's global rank, number of processes); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on global rank 0 (and on a single process)."""
    return rank_and_world_size()[0] == 0


def shard_range(n: int, rank: int | None = None, world_size: int | None = None, *, unit: int = 1) -> range:
    """The contiguous block of `range(n)` that `rank` of `world_size` processes takes (default: this process).

    The rows are dealt in whole `unit`s (the last one may be short): the first `u % world_size` ranks take
    `u // world_size + 1` units, the others `u // world_size`, where `u = ceil(n / unit)`; the blocks partition
    `range(n)` in rank order. With `unit` = the batch size of the pass, every rank's batches are exactly the batches a
    single process would form, so the results do not depend on the number of processes, bit for bit (batch shapes
    change floating-point kernels' summation order otherwise).
    """
    if rank is None or world_size is None:
        rank, world_size = rank_and_world_size()
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_range needs 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
    if unit < 1:
        raise ValueError(f"shard_range needs unit >= 1, got {unit}.")
    size, extra = divmod(-(-n // unit), world_size)
    start = (rank * size + min(rank, extra)) * unit
    stop = start + (size + (1 if rank < extra else 0)) * unit
    return range(min(start, n), min(stop, n))


def shard_dataset(dataset: Any, rank: int | None = None, world_size: int | None = None, *, unit: int = 1) -> Any:
    """This rank's share of `dataset` (default: this process's rank in the initialised group).

    Map-style (anything with `__len__` and `__getitem__`, e.g. a `datasets.Dataset` with a transform): a
    `torch.utils.data.Subset` of the contiguous block `shard_range(len(dataset), unit=unit)`; the transform runs on
    this rank's rows only, and `Subset` forwards batched `__getitems__` to a `datasets.Dataset`.

    Stream (`datasets.IterableDataset`): `datasets.distributed.split_dataset_by_node`: whole shards per rank when the
    shard count divides by `world_size`, otherwise one example in `world_size` (every rank then reads, but only
    keeps, the others). The gathered order of a stream is rank-major: rank 0's examples, then rank 1's, ...; that is
    the stream's order on one process only when `world_size` is 1.
    """
    if rank is None or world_size is None:
        rank, world_size = rank_and_world_size()
    if world_size == 1:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    if not hasattr(dataset, "__len__"):
        raise TypeError(f"Cannot shard a {type(dataset).__name__} over processes: it has no length. Pass a map-style "
                        "dataset or a datasets.IterableDataset.")
    return Subset(dataset, shard_range(len(dataset), rank, world_size, unit=unit))  # a range: no index list held


def _collective_device() -> torch.device:
    """Where collective tensors must live: the CPU when the group has gloo (also accelerate's "cuda:nccl,cpu:gloo"),
    the current CUDA / XPU device for NCCL / XCCL alone, the CPU otherwise (MPI)."""
    backend = str(dist.get_backend())
    if "gloo" in backend:
        return torch.device("cpu")
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if "xccl" in backend:
        return torch.device("xpu", torch.xpu.current_device())
    return torch.device("cpu")


def gather_rows(local: torch.Tensor | None, *, chunk_rows: int = 65_536) -> torch.Tensor:
    """Concatenate every rank's `local` [n_r, ...] along dim 0 in rank order; every rank gets the result (CPU).

    Ranks may hold different row counts, including none (`None` or an empty tensor: its trailing shape is taken
    from the other ranks); the trailing shape and dtype must agree. Rows travel in chunks of `chunk_rows` so the
    accelerator never holds more than `world_size * chunk_rows` rows at once. One process: `local` on the CPU.
    """
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        if local is None:
            raise ValueError("gather_rows got no rows on the only process.")
        return local.cpu()
    meta = None if local is None or local.shape[0] == 0 else (local.shape[0], tuple(local.shape[1:]), local.dtype)
    metas: list[Any] = [None] * world_size
    dist.all_gather_object(metas, meta)
    present = [m for m in metas if m is not None]
    if not present:
        raise ValueError("gather_rows: no process has any rows (the dataset is empty).")
    _, trailing, dtype = present[0]
    if any(m[1] != trailing or m[2] != dtype for m in present):
        raise ValueError(f"gather_rows: the ranks' rows disagree in shape or dtype: {metas}.")
    counts = [m[0] if m is not None else 0 for m in metas]
    device = _collective_device()
    if local is None or local.shape[0] == 0:
        local = torch.empty((0, *trailing), dtype=dtype)
    parts: list[list[torch.Tensor]] = [[] for _ in range(world_size)]
    for start in range(0, max(counts), chunk_rows):
        width = min(chunk_rows, max(counts) - start)
        send = torch.zeros((width, *trailing), dtype=dtype, device=device)
        mine = local[start:start + width]
        send[: mine.shape[0]] = mine.to(device)
        received = [torch.empty_like(send) for _ in range(world_size)]
        dist.all_gather(received, send)
        for r, block in enumerate(received):
            real = max(0, min(width, counts[r] - start))  # drop the padding rows
            if real:
                parts[r].append(block[:real].cpu())
    return torch.cat([t for rank_parts in parts for t in rank_parts])


def all_ranks_agree(flag: bool) -> bool:
    """True only if `flag` is True on every rank (collective). Use it before a branch that skips a collective
    pass, e.g. "the cache is valid here", so that no rank computes while another one loads."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if rank_and_world_size()[1] > 1:
        dist.barrier()
