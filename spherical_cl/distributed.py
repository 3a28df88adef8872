"""Data-parallel runs over ``torch.distributed``: the process group, shards and reductions.

Launched with ``torchrun``, every rank keeps the whole model and a shard of each batch.
DistributedDataParallel averages the gradients. What the method estimates from data is
made identical on every rank, so all ranks end each task with the same U_t and prototypes:

- sums and counts (class means, covariance sums, evaluation counts) are all-reduced;
- the embeddings the drift-resistant space is built from, at most
  ``projection.max_vectors`` of them, and each step's embeddings for the EMA update are
  all-gathered in global sample order;
- losses over the whole batch (the batch-hard triplet) see the gathered batch, through a
  differentiable all-gather.

With one process every method of :class:`DistributedContext` returns its input unchanged.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from spherical_cl.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """This process's place among the ranks of a run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this rank writes files, logs and progress bars (rank 0)."""
        return self.rank == 0

    def shard(self, count: int) -> range:
        """Return this rank's contiguous share of ``range(count)``; shares differ in size by at most 1."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place; return it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """Return whether ``flag`` holds on every rank, so all ranks take the same branch."""
        if not self.enabled:
            return flag
        value = torch.tensor([1 if flag else 0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's rows (N_r, ...) in rank order; shares may differ in size. No gradient."""
        if not self.enabled:
            return tensor
        padded, sizes = self._padded(tensor.detach())
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def gather_rows_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """Like :meth:`gather_rows`, but gradients flow back to this rank's rows.

        The backward pass sums each rank's gradient for these rows, so a loss computed
        identically on every rank from the gathered batch, then averaged over ranks by
        DistributedDataParallel, gives the gradient of that loss on one process.
        """
        if not self.enabled:
            return tensor
        padded, sizes = self._padded(tensor)
        offset = sum(sizes[:self.rank])
        gathered = _GatherRows.apply(padded, sizes, offset)
        return gathered

    def _padded(self, tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        # all_gather needs equal shapes, so shorter shares are padded with zero rows.
        size = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        sizes = [int(s.item()) for s in sizes]
        longest = max(sizes)
        if tensor.shape[0] < longest:
            filler = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
            tensor = torch.cat([tensor, filler])
        return tensor, sizes

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


class _GatherRows(torch.autograd.Function):
    """All-gather of padded shares whose backward returns this rank's rows of the summed gradient.

    Backward all-reduces the gradient of the whole gathered batch, which works on gloo and
    NCCL alike, and keeps the rows that came from this rank.
    """

    @staticmethod
    def forward(ctx, padded: torch.Tensor, sizes: list[int], offset: int) -> torch.Tensor:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.rows = (offset, sizes[dist.get_rank()], padded.shape[0])
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        offset, size, padded_rows = ctx.rows
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        local = grad[offset:offset + size]
        if padded_rows > size:
            local = torch.cat([local, local.new_zeros((padded_rows - size, *local.shape[1:]))])
        return local, None, None


def init_distributed(device_type: str) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Without ``WORLD_SIZE`` (or with 1) this returns the single-process context and starts
    nothing. Otherwise it initialises the default group: NCCL for ``device_type`` 'cuda',
    else gloo, with the rendezvous from ``MASTER_ADDR`` and ``MASTER_PORT``.

    Raises:
        ConfigError: the environment is incomplete or inconsistent.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError):
        raise ConfigError(f"WORLD_SIZE={world_size} but RANK or LOCAL_RANK is missing or not an integer; launch "
                          "distributed runs with torchrun --nproc_per_node N -m spherical_cl.train ...") from None
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    logger.info("rank %d of %d (local rank %d), backend %s", rank, world_size, local_rank, backend)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown_distributed() -> None:
    """Destroy the default process group if this process started one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ShardedBatchSampler(Sampler[list[int]]):
    """Batches of a seeded permutation, each split into contiguous shares, one per rank.

    With one rank this is a shuffled batch sampler. With N ranks, rank r yields its share
    of the same global batches, so together the N ranks train on exactly the batches of one process.
    A last batch with fewer samples than ranks is dropped, because some rank would get none.
    Call :meth:`set_epoch` before each epoch for a new permutation.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int,
                 context: DistributedContext = DistributedContext(), shuffle: bool = True) -> None:
        if batch_size < context.world_size:
            raise ConfigError(f"train.batch_size={batch_size} is smaller than the {context.world_size} ranks; "
                              f"use a global batch of at least {context.world_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.context = context
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[torch.Tensor]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        batches = list(order.split(self.batch_size))
        if batches and len(batches[-1]) < self.context.world_size:
            batches.pop()
        return batches

    def __iter__(self):
        for batch in self._global_batches():
            share = self.context.shard(len(batch))
            yield batch[share.start:share.stop].tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest >= max(self.context.world_size, 1) else 0)

    def global_batch_size(self, index: int) -> int:
        """Return the size of global batch ``index`` of an epoch, summed over all ranks' shares."""
        return min(self.batch_size, self.num_samples - index * self.batch_size)
