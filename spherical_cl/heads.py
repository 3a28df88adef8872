"""Classifier heads whose class weights are points on the unit sphere."""

from __future__ import annotations

import math

import geoopt
import torch
import torch.nn.functional as F
from torch import nn

from manifolds import Sphere


class ArcFaceHead(nn.Module):
    """A cosine classifier with ArcFace's additive angular margin, grown one task at a time.

    Each task adds a block of class weights (n_t, D), a ``geoopt.ManifoldParameter`` on
    :class:`manifolds.Sphere`, so a Riemannian optimizer keeps every row at unit norm.
    Logits are ``s · cos(θ_y + m)`` for the target class and ``s · cos θ_j`` for the others,
    as in standard ArcFace (Deng et al., CVPR 2019), which scales every logit: scaling only
    the target would let the softmax saturate on the margin alone. ``θ`` is the geodesic
    distance from :class:`manifolds.Sphere`, which stays exact near 0 and π.

    When θ_y + m passes π, cos(θ_y + m) would grow again with θ_y. The target logit then
    uses ArcFace's usual fallback cos θ_y − m · sin m, which keeps it monotone in θ_y.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.sphere = Sphere()
        self.blocks = nn.ParameterList()

    @property
    def num_classes(self) -> int:
        return sum(block.shape[0] for block in self.blocks)

    def add_classes(self, count: int, init: torch.Tensor | None = None, *, generator: torch.Generator | None = None
                    ) -> geoopt.ManifoldParameter:
        """Append ``count`` class weights, from ``init`` (count, D) or random on the sphere, and return them."""
        if init is None:
            init = torch.randn(count, self.embed_dim, generator=generator)
        if init.shape != (count, self.embed_dim):
            raise ValueError(f"init must have shape ({count}, {self.embed_dim}), got {tuple(init.shape)}")
        device = self.blocks[0].device if len(self.blocks) else init.device
        weight = geoopt.ManifoldParameter(self.sphere.projx(init.detach().float()).to(device), manifold=self.sphere)
        for block in self.blocks:
            block.requires_grad_(False)
        self.blocks.append(weight)
        return weight

    @torch.no_grad()
    def load_blocks(self, blocks: list[torch.Tensor]) -> None:
        """Replace every block with saved class weights, bit for bit (no re-normalisation)."""
        self.blocks = nn.ParameterList()
        for block in blocks:
            self.add_classes(block.shape[0], init=block).copy_(block)

    def weight(self) -> torch.Tensor:
        """Return every class weight, (C, D) with C the classes seen so far."""
        return torch.cat(list(self.blocks), dim=0)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Return cos θ between unit embeddings (B, D) and every class weight, (B, C)."""
        return embeddings @ self.weight().t()

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None, *, scale: float,
               margin: float = 0.0) -> torch.Tensor:
        """Return ArcFace logits (B, C); without labels or with margin 0 these are ``s · cos θ``."""
        cosine = self.cosine(embeddings)
        if labels is None or margin == 0.0:
            return scale * cosine
        theta = self.sphere.dist(embeddings, self.weight()[labels])
        margin_cos = torch.where(
            theta + margin <= math.pi,
            torch.cos(theta + margin),
            torch.cos(theta) - margin * math.sin(margin),
        )
        target = F.one_hot(labels, cosine.shape[1]).bool()
        return scale * torch.where(target, margin_cos.unsqueeze(1).to(cosine.dtype), cosine)
