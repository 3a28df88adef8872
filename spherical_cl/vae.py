"""The spCauchy-VAE head: a spherical Cauchy posterior over a latent on the unit sphere.

The encoder maps a unit backbone embedding x̂ (B, D) to the location μ (B, k), a unit
vector, and the concentration ρ (B,) of a :class:`~spherical_cl.distributions.SphericalCauchy`
posterior on S^{k−1}. The decoder maps a latent back to a unit vector in ℝ^D. The loss
terms are the reconstruction error 1 − cos(decoder(z), x̂) and KL(posterior ‖ uniform on
S^{k−1}), both averaged over the batch (Sablica and Hornik, arXiv:2506.21278, 2025, use the
same prior).

ρ is computed from x̂ detached from the backbone. So the backbone gets its gradient only
through μ, where :class:`~spherical_cl.methods.drs_sphere.HypersphericalDRS` projects it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import kl_divergence

from spherical_cl.distributions import HypersphericalUniform, SphericalCauchy

logger = logging.getLogger(__name__)

# ρ = RHO_MAX · sigmoid(h) stays below 1 in float32, where sigmoid(h) rounds to 1 for h > 17.
RHO_MAX = 1.0 - 1e-6


@dataclass
class VAELosses:
    """The batch means of the VAE's loss terms, as 0-dim tensors."""

    reconstruction: torch.Tensor
    kl: torch.Tensor


class SphericalCauchyVAE(nn.Module):
    """Encoder to a spherical Cauchy posterior on S^{k−1}, and decoder back to the embedding sphere.

    Both are one-hidden-layer MLPs with GELU. The ρ output is ``RHO_MAX · sigmoid(h)``.

    Args:
        input_dim: Size D of the unit embeddings.
        latent_dim: Size k of the latent vectors, k ≥ 2.
        hidden_dim: Width of the hidden layers.
        initial_rho: Concentration that the encoder outputs at initialisation, in (0, 1), set
            through the bias of the ρ layer (whose weights start at 0). A high value lets the
            first steps see latents close to μ.

    Raises:
        ValueError: ``latent_dim`` < 2 or ``initial_rho`` outside (0, 1).
    """

    def __init__(self, input_dim: int, latent_dim: int, hidden_dim: int, *, initial_rho: float = 0.9) -> None:
        super().__init__()
        if latent_dim < 2:
            raise ValueError(f"latent_dim must be at least 2 for a sphere S^(k-1), got {latent_dim}")
        if not 0.0 < initial_rho < 1.0:
            raise ValueError(f"initial_rho must lie in (0, 1), got {initial_rho}")
        self.input_dim = input_dim
        self.latent_dim = latent_dim
        self.trunk = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.GELU())
        self.loc_layer = nn.Linear(hidden_dim, latent_dim)
        self.rho_layer = nn.Linear(hidden_dim, 1)
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, input_dim))
        nn.init.zeros_(self.rho_layer.weight)
        nn.init.constant_(self.rho_layer.bias, math.log(initial_rho / (RHO_MAX - initial_rho)))

    def encode_location(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Map unit embeddings (B, D) to the posterior locations μ (B, k), unit vectors."""
        hidden = self.loc_layer(self.trunk(embeddings))
        return F.normalize(hidden, dim=-1)

    def encode_concentration(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Map unit embeddings (B, D) to the posterior concentrations ρ (B,) in [0, RHO_MAX].

        The embeddings are detached, so no gradient reaches the backbone through ρ.
        """
        hidden = self.rho_layer(self.trunk(embeddings.detach())).squeeze(-1)
        return RHO_MAX * torch.sigmoid(hidden)

    def posterior(self, embeddings: torch.Tensor) -> SphericalCauchy:
        """Return the posterior q(z | x̂) for unit embeddings (B, D), batch shape (B,), event shape (k,).

        Its parameters satisfy the constraints by construction, so validation is off.
        """
        return SphericalCauchy(self.encode_location(embeddings), self.encode_concentration(embeddings),
                               validate_args=False)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Map latents (B, k) to unit vectors (B, D), the reconstructed embeddings."""
        return F.normalize(self.decoder(latent), dim=-1)

    def losses(self, posterior: SphericalCauchy, latent: torch.Tensor, embeddings: torch.Tensor) -> VAELosses:
        """Return the batch means of the reconstruction error and of the KL to the uniform prior.

        Args:
            posterior: q(z | x̂) from :meth:`posterior`, batch shape (B,).
            latent: The latents (B, k) drawn from ``posterior`` with ``rsample``.
            embeddings: The unit embeddings x̂ (B, D) to reconstruct. They are detached, so the
                reconstruction trains the encoder and decoder but does not move the target.

        Returns:
            Reconstruction 1 − cos(decode(z), x̂) and KL(q ‖ uniform on S^{k−1}) in nats.
        """
        reconstruction = 1.0 - (self.decode(latent) * embeddings.detach()).sum(dim=-1)
        prior = HypersphericalUniform(self.latent_dim, dtype=latent.dtype, device=latent.device)
        kl = kl_divergence(posterior, prior)
        return VAELosses(reconstruction=reconstruction.mean(), kl=kl.mean())
