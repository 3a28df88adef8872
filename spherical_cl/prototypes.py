"""Base points on the sphere: class prototypes, task means, k-means anchors, and their EMA."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from manifolds import Sphere, spherical_kmeans

logger = logging.getLogger(__name__)

_SPHERE = Sphere()


def mean_direction(embeddings: torch.Tensor) -> torch.Tensor:
    """Return the normalised mean (D,) of unit embeddings (N, D), summed in float64."""
    total = embeddings.double().sum(dim=0)
    norm = total.norm()
    if norm == 0:
        raise ValueError(f"the {len(embeddings)} embeddings sum to zero; their mean direction is undefined")
    return (total / norm).to(embeddings.dtype)


def class_means(embeddings: torch.Tensor, labels: torch.Tensor, classes: range) -> torch.Tensor:
    """Return the mean direction of each class in ``classes``, (len(classes), D)."""
    return torch.stack([mean_direction(embeddings[labels == c]) for c in classes])


@dataclass
class BasePoints:
    """The points on the sphere that the embedding gradient is projected at.

    Attributes:
        points: unit vectors (P, D).
        mode: ``per_class`` (one point per class of the task, in class order),
            ``global`` (one point) or ``multi_anchor`` (k-means anchors).
        first_class: model label of the task's first class, for ``per_class``.
    """

    points: torch.Tensor
    mode: str
    first_class: int = 0

    def assign(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the index (B,) of the base point of each sample."""
        if self.mode == "per_class":
            return labels - self.first_class
        if self.mode == "global":
            return torch.zeros_like(labels)
        return (embeddings.detach() @ self.points.t()).argmax(dim=1)

    @torch.no_grad()
    def ema_update(self, embeddings: torch.Tensor, labels: torch.Tensor, momentum: float) -> None:
        """Move each point present in the batch: μ ← normalise(β μ + (1 − β) · batch mean direction)."""
        index = self.assign(embeddings, labels)
        sums = torch.zeros_like(self.points).index_add_(0, index, embeddings.detach().to(self.points.dtype))
        present = torch.unique(index)
        batch_mean = sums[present] / sums[present].norm(dim=1, keepdim=True)
        moved = momentum * self.points[present] + (1.0 - momentum) * batch_mean
        self.points[present] = _SPHERE.projx(moved)


def estimate_base_points(embeddings: torch.Tensor, labels: torch.Tensor, classes: range, *, mode: str,
                         num_anchors: int = 4, min_per_class: int = 20, seed: int = 0) -> BasePoints:
    """Estimate the task's base points from unit embeddings (N, D) of its training data.

    ``auto`` resolves to ``per_class`` when every class has at least ``min_per_class``
    samples, else to ``multi_anchor``.
    """
    if mode == "auto":
        counts = torch.bincount(labels - classes.start, minlength=len(classes))
        mode = "per_class" if int(counts.min()) >= min_per_class else "multi_anchor"
        logger.info("prototype mode auto resolved to %s (fewest samples in a class: %d)", mode, int(counts.min()))
    if mode == "per_class":
        return BasePoints(class_means(embeddings, labels, classes), mode, classes.start)
    if mode == "global":
        return BasePoints(mean_direction(embeddings).unsqueeze(0), mode, classes.start)
    if mode == "multi_anchor":
        anchors = min(num_anchors, len(embeddings))
        result = spherical_kmeans(embeddings, anchors, seed=seed)
        return BasePoints(result.anchors.to(embeddings.dtype), mode, classes.start)
    raise ValueError(f"unknown prototype mode {mode!r}")
