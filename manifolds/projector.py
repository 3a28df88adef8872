"""Orthogonal projection of gradients onto tangent spaces and transported subspaces.

For base points μ on the sphere and an orthonormal basis U of a subspace of
the tangent space at a point p, the projector maps a gradient g to its
component in Ũ = T(U), the subspace U carried from p to μ by parallel
transport along the geodesic. The transport is the reflection
H = I − 2wwᵀ across the axis w from :func:`manifolds.sphere.reflection_axis`,
which is symmetric and orthogonal, so Ũ = HU stays orthonormal and ⟂ μ, and

    P g = Ũ Ũᵀ g = H U Uᵀ H g

is an orthogonal projector. Applying H to g and to the result costs O(B·D)
and the projection onto U costs O(B·D·k), so the (B, D, k) tensor Ũ is never
built. A final g − <g, μ̂> μ̂ removes the rounding error along μ̂.
"""

from typing import Callable, Optional

import torch

from ._numerics import compute_dtype
from .sphere import reflection_axis

__all__ = ["TangentSubspaceProjector", "project_tangent", "projection_ratio"]


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(dim=-1, keepdim=True)


def project_tangent(g: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Project vectors onto the tangent space of the sphere at μ: g − <g, μ> μ.

    Args:
        g: Vectors of shape (..., D), for example a gradient of shape (B, D).
        mu: Unit base points of shape (..., D) broadcastable with ``g``, for
            example (D,) or (B, D). They are not normalised here.

    Returns:
        The projection, in the promoted input dtype. float16 and bfloat16 are
        computed in float32.
    """
    dtype = compute_dtype(g.dtype, mu.dtype)
    g_wide, mu_wide = g.to(dtype), mu.to(dtype)
    out_dtype = torch.promote_types(g.dtype, mu.dtype)
    return (g_wide - _dot(g_wide, mu_wide) * mu_wide).to(out_dtype)


def projection_ratio(g: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
    """Compute the mean over rows of ‖Pg‖ / ‖g‖.

    Rows where g is zero have no ratio and are left out of the mean. The result
    is NaN when every row is zero. It stays on the device, so reading it with
    ``.item()`` is the only synchronisation.

    Args:
        g: Vectors of shape (..., D).
        projected: Their projections, same shape.

    Returns:
        A 0-dim float tensor (float32 or wider), detached from autograd.
    """
    dtype = compute_dtype(g.dtype, projected.dtype)
    g_norm = torch.linalg.vector_norm(g.detach().to(dtype), dim=-1).flatten()
    projected_norm = torch.linalg.vector_norm(projected.detach().to(dtype), dim=-1).flatten()
    nonzero = g_norm > 0
    ratios = projected_norm / torch.where(nonzero, g_norm, torch.ones_like(g_norm))
    ratios = torch.where(nonzero, ratios, torch.full_like(ratios, float("nan")))
    return torch.nanmean(ratios)


class TangentSubspaceProjector:
    """Orthogonal projector onto the tangent space at μ, or onto a subspace of it.

    Without a basis, ``project(g, mu)`` returns the tangent component
    g − <g, μ̂> μ̂. With a basis U tangent at ``basis_point`` p, it returns the
    component of g in Ũ, U transported from p to μ̂ along the geodesic, which
    is a subspace of the tangent space at μ̂. Base points are normalised, so
    μ̂ = μ/‖μ‖. They must be nonzero.

    Transport special cases:
      * μ̂ == p̂ exactly: the transport is the identity, Ũ = U.
      * μ̂ = -p̂ (to within sqrt(eps) of float64): U is transported along the
        geodesic that ``Sphere.logmap(p, -p)`` follows, the one in direction
        e₀ made orthogonal to p (e₁ when ``|p₀| > 1/√2``). Then Ũ = U − 2d(dᵀU)
        with d that direction.

    The projection is idempotent, does not increase norms and its result is
    orthogonal to μ̂, up to rounding in the compute dtype. NOTE: near μ̂ = -p̂
    the transport axis is only known to about 1e-16/‖p̂ + μ̂‖ (float64), and
    these properties are only that accurate. Memory is O(B·D) beyond the inputs. :meth:`transported_basis` builds the (B, D, k) tensor Ũ
    for inspection only.

    Args:
        basis: Optional orthonormal basis U of shape (D, k), 1 ≤ k ≤ D − 1,
            tangent at ``basis_point``.
        basis_point: The point p of shape (D,) that U is tangent at. Required
            with ``basis``.

    Raises:
        ValueError: If U or p has the wrong shape, is not finite, U is not
            orthonormal or not orthogonal to p (tolerance sqrt(eps) of U's
            compute dtype), or p is zero.
    """

    def __init__(self, basis: Optional[torch.Tensor] = None, basis_point: Optional[torch.Tensor] = None) -> None:
        self.basis: Optional[torch.Tensor] = None
        self.basis_point: Optional[torch.Tensor] = None
        self.last_ratio: Optional[torch.Tensor] = None
        if basis is None:
            if basis_point is not None:
                raise ValueError("basis_point was given without basis; pass both or neither")
            return
        if basis_point is None:
            raise ValueError("basis needs basis_point, the point of shape (D,) that the basis is tangent at")
        self.basis, self.basis_point = self._clean_basis(basis.detach(), basis_point.detach())

    @staticmethod
    def _clean_basis(basis: torch.Tensor, point: torch.Tensor):
        if basis.ndim != 2:
            raise ValueError(f"basis must have shape (D, k), got {tuple(basis.shape)}")
        dim, rank = basis.shape
        if not 1 <= rank <= dim - 1:
            raise ValueError(f"basis must have 1 ≤ k ≤ D - 1 = {dim - 1} columns, got k={rank}")
        if point.shape != (dim,):
            raise ValueError(f"basis_point must have shape ({dim},) to match the basis, got {tuple(point.shape)}")
        if not (torch.isfinite(basis).all() and torch.isfinite(point).all()):
            raise ValueError("basis and basis_point must be finite")
        dtype = compute_dtype(basis.dtype, point.dtype)
        tolerance = torch.finfo(dtype).eps ** 0.5

        point64 = point.to(torch.float64)
        point_norm = torch.linalg.vector_norm(point64)
        if point_norm == 0:
            raise ValueError("basis_point must be nonzero")
        point64 = point64 / point_norm
        basis64 = basis.to(torch.float64)

        gram_error = (basis64.T @ basis64 - torch.eye(rank, dtype=torch.float64, device=basis.device)).abs().max()
        if gram_error > tolerance:
            raise ValueError(
                f"basis columns must be orthonormal, but max |UᵀU − I| is {gram_error.item():.3g} "
                f"(tolerance {tolerance:.3g}); orthonormalise with torch.linalg.qr"
            )
        normal_error = (point64 @ basis64).abs().max()
        if normal_error > tolerance:
            raise ValueError(
                f"basis must be tangent at basis_point, but max |Uᵀp̂| is {normal_error.item():.3g} "
                f"(tolerance {tolerance:.3g}); project it with U − p̂(p̂ᵀU)"
            )

        # Remove the residual normal part and re-orthonormalise in float64.
        # The signs of R's diagonal are folded back so that columns keep their direction.
        basis64 = basis64 - torch.outer(point64, point64 @ basis64)
        q, r = torch.linalg.qr(basis64)
        signs = torch.sign(torch.diagonal(r))
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)
        # p is kept as given (upcast exactly), so that mu == basis_point gives the exact identity.
        return (q * signs).to(dtype), point.to(dtype)

    @property
    def rank(self) -> Optional[int]:
        """Number of basis columns k, or None without a basis."""
        return None if self.basis is None else self.basis.shape[1]

    def _check_shapes(self, g: torch.Tensor, mu: torch.Tensor) -> None:
        if g.ndim < 1 or mu.ndim < 1 or g.shape[-1] != mu.shape[-1]:
            raise ValueError(
                f"g and mu must have the same last dimension D, got shapes {tuple(g.shape)} and {tuple(mu.shape)}"
            )
        if self.basis is not None and g.shape[-1] != self.basis.shape[0]:
            raise ValueError(f"g has dimension {g.shape[-1]}, but the basis has D={self.basis.shape[0]}")
        try:
            torch.broadcast_shapes(g.shape, mu.shape)
        except RuntimeError as error:
            raise ValueError(
                f"mu of shape {tuple(mu.shape)} does not broadcast with g of shape {tuple(g.shape)}; "
                "pass one point of shape (D,) or one per row of shape (B, D)"
            ) from error

    def _axis(self, mu: torch.Tensor) -> torch.Tensor:
        point = self.basis_point.to(device=mu.device)
        return reflection_axis(point, mu).to(mu.dtype)

    def project(self, g: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """Project g onto the transported subspace at μ, or onto the tangent space at μ.

        Args:
            g: Vectors of shape (..., D), for example a gradient of shape (B, D).
            mu: Nonzero base points of shape (D,) or (..., D) broadcastable with ``g``.

        Returns:
            The projection, with the shape of ``g`` broadcast against ``mu`` and
            the dtype of ``g``. float16 and bfloat16 are computed in float32.
        """
        self._check_shapes(g, mu)
        dtype = compute_dtype(g.dtype, mu.dtype, *(() if self.basis is None else (self.basis.dtype,)))
        g_wide = g.to(dtype)
        mu_wide = mu.detach().to(dtype)
        mu_unit = mu_wide / torch.linalg.vector_norm(mu_wide, dim=-1, keepdim=True)
        if self.basis is None:
            return project_tangent(g_wide, mu_unit).to(g.dtype)

        basis = self.basis.to(device=g.device, dtype=dtype)
        axis = self._axis(mu_wide)
        reflected = g_wide - 2.0 * _dot(axis, g_wide) * axis
        in_subspace = (reflected @ basis) @ basis.T
        projected = in_subspace - 2.0 * _dot(axis, in_subspace) * axis
        return project_tangent(projected, mu_unit).to(g.dtype)

    __call__ = project

    def transported_basis(self, mu: torch.Tensor) -> torch.Tensor:
        """Build Ũ, the basis U transported to each base point.

        This materialises a tensor of shape (..., D, k), so use it for
        inspection and tests. :meth:`project` never builds it.

        Args:
            mu: Nonzero base points of shape (..., D).

        Returns:
            Orthonormal bases of shape (..., D, k), orthogonal to μ̂.

        Raises:
            ValueError: If the projector has no basis.
        """
        if self.basis is None:
            raise ValueError("transported_basis needs a projector built with a basis")
        dtype = compute_dtype(mu.dtype, self.basis.dtype)
        mu_wide = mu.detach().to(dtype)
        basis = self.basis.to(device=mu.device, dtype=dtype)
        axis = self._axis(mu_wide)
        return basis - 2.0 * axis.unsqueeze(-1) * (axis @ basis).unsqueeze(-2)

    def hook(self, mu: torch.Tensor, *, record_ratio: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        """Return a tensor hook that projects the gradient of an embedding.

        Use it as ``embedding.register_hook(projector.hook(mu))`` with an
        embedding of shape (B, D). With ``record_ratio``, each call stores the
        mean of ‖Pg‖/‖g‖ over the batch in :attr:`last_ratio`, a detached 0-dim
        tensor (see :func:`projection_ratio`).

        Args:
            mu: Base points of shape (D,) or (B, D). They are detached.
            record_ratio: Whether to store the ratio on the projector.

        Returns:
            A callable that maps the gradient to its projection.
        """
        mu = mu.detach()

        def project_gradient(grad: torch.Tensor) -> torch.Tensor:
            projected = self.project(grad, mu)
            if record_ratio:
                self.last_ratio = projection_ratio(grad, projected)
            return projected

        return project_gradient

    def __repr__(self) -> str:
        if self.basis is None:
            return "TangentSubspaceProjector(tangent space only)"
        return f"TangentSubspaceProjector(D={self.basis.shape[0]}, k={self.basis.shape[1]}, dtype={self.basis.dtype})"
