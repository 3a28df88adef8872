"""Losses on unit embeddings and the schedules of their hyper-parameters."""

from __future__ import annotations

import math

import torch

from manifolds import Sphere

_SPHERE = Sphere()


def anneal(start: float, end: float, progress: float, schedule: str = "linear") -> float:
    """Interpolate from ``start`` to ``end`` as ``progress`` goes from 0 to 1.

    ``schedule`` is ``linear``, ``cosine`` (slow at both ends) or ``none`` (always ``end``).
    """
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "none":
        return end
    if schedule == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    elif schedule != "linear":
        raise ValueError(f"unknown schedule {schedule!r}; use linear, cosine or none")
    return start + (end - start) * progress


def pairwise_distance(x: torch.Tensor, y: torch.Tensor, kind: str = "geodesic") -> torch.Tensor:
    """Return distances (N, M) between unit vectors x (N, D) and y (M, D).

    ``geodesic`` is the great-circle angle from :class:`manifolds.Sphere`, exact and with
    finite gradients at 0 and π; ``chordal`` is the Euclidean distance ‖x − y‖.
    """
    return paired_distance(x.unsqueeze(1), y.unsqueeze(0), kind)


def paired_distance(x: torch.Tensor, y: torch.Tensor, kind: str = "geodesic") -> torch.Tensor:
    """Return the distance of each pair of unit vectors x[i], y[i] (broadcast over leading dims)."""
    if kind == "geodesic":
        return _SPHERE.dist(x, y)
    if kind == "chordal":
        # Through the exact difference, as the geodesic, so the gradient at 0 is finite.
        difference = x - y
        squared = (difference * difference).sum(-1)
        return torch.where(squared > 0, squared.clamp_min(torch.finfo(squared.dtype).tiny).sqrt(),
                           torch.zeros_like(squared))
    raise ValueError(f"unknown distance {kind!r}; use geodesic or chordal")


def angular_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float,
                         old_prototypes: torch.Tensor | None = None, distance: str = "geodesic") -> torch.Tensor:
    """Batch-hard triplet loss on the sphere, with old-class prototypes as extra negatives.

    For each anchor a, the hardest positive is the farthest other sample of its class in
    the batch. The hardest negative is the nearest of the batch's samples of other classes
    and the stored old-class prototypes. The loss is the mean over anchors that have a
    positive and a negative of max(0, d(a, p) − d(a, n) + margin). Returns 0 (with a
    gradient path) when no anchor qualifies.

    Both distances fall as the cosine rises, so the hardest pairs are chosen from one
    (B, B) cosine matrix. Only the chosen pairs go through the exact distance, which costs
    O(B·D) instead of the O(B²·D) of exact distances for every pair. Where two candidates
    are within float rounding of the cosine (about 1e-7), either may be chosen.

    Args:
        embeddings: unit embeddings (B, D).
        labels: class labels (B,).
        margin: margin in the units of ``distance`` (radians for geodesic).
        old_prototypes: unit prototypes (C_old, D) of classes learned in earlier tasks.
        distance: ``geodesic`` or ``chordal``.
    """
    if distance not in ("geodesic", "chordal"):
        raise ValueError(f"unknown distance {distance!r}; use geodesic or chordal")
    with torch.no_grad():
        cosine = embeddings @ embeddings.t()
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        not_self = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        positive_mask = same & not_self
        has_positive = positive_mask.any(dim=1)
        positive_index = torch.where(positive_mask, cosine, math.inf).argmin(dim=1)
        negative_cosine, negative_index = torch.where(~same, cosine, -math.inf).max(dim=1)
        use_prototype = torch.zeros_like(has_positive)
        has_prototypes = old_prototypes is not None and len(old_prototypes) > 0
        if has_prototypes:
            prototypes = old_prototypes.to(embeddings.dtype)
            prototype_cosine, prototype_index = (embeddings @ prototypes.t()).max(dim=1)
            use_prototype = prototype_cosine > negative_cosine
        has_negative = torch.isfinite(negative_cosine) | use_prototype
        valid = has_positive & has_negative
    if not valid.any():
        return embeddings.sum() * 0.0

    anchors = embeddings[valid]
    positives = embeddings[positive_index[valid]]
    negatives = embeddings[negative_index[valid]]
    if has_prototypes:
        negatives = torch.where(use_prototype[valid].unsqueeze(1), prototypes[prototype_index[valid]], negatives)
    hinge = torch.relu(paired_distance(anchors, positives, distance) - paired_distance(anchors, negatives, distance)
                       + margin)
    return hinge.mean()
