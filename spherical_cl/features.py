"""Forward passes that collect embedding statistics without keeping per-sample features."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch


@torch.no_grad()
def iterate_embeddings(embed: Callable[[torch.Tensor], torch.Tensor], batches: Iterable,
                       device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(unit embeddings (B, D) float32, labels (B,))`` on ``device`` for each batch."""
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        yield embed(images).float(), labels.to(device, non_blocking=True)


@torch.no_grad()
def class_mean_directions(embed: Callable[[torch.Tensor], torch.Tensor], batches: Iterable,
                          classes: range, device: torch.device,
                          reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Return the normalised mean embedding of each class in ``classes``, (len(classes), D).

    Sums are accumulated per class in float64 over one pass. ``reduce`` sums the per-class
    sums and counts over ranks in place (for example
    :meth:`~spherical_cl.distributed.DistributedContext.all_reduce_sum`) when each rank
    passes a shard of the data.

    Raises:
        ValueError: some class in ``classes`` has no sample in ``batches``.
    """
    sums: torch.Tensor | None = None
    counts = torch.zeros(len(classes), dtype=torch.float64, device=device)
    for embeddings, labels in iterate_embeddings(embed, batches, device):
        if sums is None:
            sums = torch.zeros(len(classes), embeddings.shape[1], dtype=torch.float64, device=device)
        index = labels - classes.start
        sums.index_add_(0, index, embeddings.double())
        counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
    if reduce is not None:
        if sums is None:
            raise ValueError("this rank's shard of the data is empty; use fewer ranks than samples")
        reduce(sums)
        reduce(counts)
    if sums is None or (counts == 0).any():
        empty = [classes.start + i for i in torch.nonzero(counts == 0).flatten().tolist()]
        raise ValueError(f"classes {empty} have no samples; cannot estimate their mean direction")
    means = sums / counts.unsqueeze(1)
    return (means / means.norm(dim=1, keepdim=True)).float()
