"""The unit sphere as a geoopt manifold, with distance and log map that stay accurate near 0 and π.

geoopt 0.5.1's ``Sphere`` computes the distance as acos of a cosine that is
clamped to [-1 + 1e-4, 1 - 1e-4] in float32. So ``dist(x, x)`` is 0.0141,
angles below about 0.014 rad are wrong and the log map collapses near the
antipode. This module uses forms that keep full precision instead:

* the angle is θ = 2·atan2(‖x − y‖, ‖x + y‖), which has no cancellation at
  either end, because x − y (near 0) and x + y (near π) are computed exactly
  for close coordinates;
* θ/sin θ and sin θ/θ switch to Taylor series below a dtype-aware threshold,
  and the unselected branch of every ``torch.where`` gets a safe input
  ("double where"), so no NaN reaches the gradient;
* float16 and bfloat16 inputs are computed in float32 and the result is cast
  back to the input dtype. ``dist`` and ``logmap`` also normalise such inputs
  in float32, because their norm error of up to 2^-8 would dominate.

All methods take points and vectors with the vector along the last dimension
and broadcast over the leading dimensions. Points are assumed to have unit
norm, as on the manifold. For points off the sphere by δ in norm, the angle
error grows like δ²/θ.
"""

from typing import Optional, Tuple, Union

import torch
from geoopt import ManifoldTensor
from geoopt.manifolds.base import Manifold
from geoopt.utils import size2shape

from ._numerics import compute_dtype, result_dtype, taylor_threshold, wide_dtype

__all__ = ["Sphere", "antipodal_direction", "reflection_axis"]


def _norm(x: torch.Tensor) -> torch.Tensor:
    # torch's norm backward returns 0, not NaN, for a zero vector.
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(dim=-1, keepdim=True)


def _upcast_point(point: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Half-precision points are off the sphere by up to about 2^-8 in norm,
    # which would dominate the angle error, and normalising in float32 costs
    # only float32 rounding. Wider inputs are left alone, because normalising
    # them in their own precision would move their direction by about eps.
    wide = point.to(dtype)
    if torch.finfo(point.dtype).bits < 32:
        wide = wide / _norm(wide)
    return wide


def _angle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # (..., 1). Exact 0 for x == y and exact π for y == -x.
    return 2.0 * torch.atan2(_norm(x - y), _norm(x + y))


def antipodal_direction(x: torch.Tensor) -> torch.Tensor:
    """Return the unit tangent direction at x that the log map uses for y = -x.

    Every tangent direction at x leads to -x, so a fixed rule picks one: the
    first standard basis vector e₀ made orthogonal to x and normalised, or e₁
    instead when ``|x₀| > 1/√2``. The chosen e_j has ``|x_j| ≤ 1/√2``, so the vector
    before normalisation has norm at least 1/√2 and the division is safe.

    Args:
        x: Points of shape (..., D) with D ≥ 2, in float32 or float64.

    Returns:
        Unit tangent vectors at x, of shape (..., D).
    """
    first = x[..., :1]
    use_first = first.abs() <= 0.5**0.5
    coordinate = torch.where(use_first, first, x[..., 1:2])
    rest = torch.zeros_like(x[..., 2:])
    basis_vector = torch.cat([use_first.to(x.dtype), (~use_first).to(x.dtype), rest], dim=-1)
    direction = basis_vector - coordinate * x
    return direction / _norm(direction)


def reflection_axis(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Compute the unit axis w whose reflection I - 2wwᵀ transports T_x onto T_y.

    The reflection across w = (x̂ + ŷ)/‖x̂ + ŷ‖ maps x̂ to -ŷ and fixes every
    vector orthogonal to x and y. On the tangent space at x it therefore equals
    the parallel transport along the minimising geodesic from x to y, and it is
    an exact isometry of the whole space.

    The axis is computed in float64 (float32 on Apple MPS) and cast back.
    Inputs have unit norm only to within their precision ε, and an axis
    computed in that precision would map T_x to a subspace that is off T_y by
    about ε/‖x̂ + ŷ‖, which is large near the antipode.

    Special cases:
      * x̂ == ŷ exactly: w = 0, so the reflection is the identity.
      * ‖x̂ + ŷ‖ ≤ sqrt(eps) of the wide dtype, including y = -x: w is
        :func:`antipodal_direction` of x̂, which transports along the same
        geodesic that :meth:`Sphere.logmap` picks for y = -x.

    Args:
        x: Start points of shape (..., D), nonzero.
        y: End points of shape (..., D), nonzero, broadcastable with ``x``.

    Returns:
        Axes of the broadcast shape (..., D), unit or zero, in the compute dtype
        of the inputs (float32 or float64).
    """
    out_dtype = compute_dtype(x.dtype, y.dtype)
    wide = wide_dtype(x.device)
    x, y = torch.broadcast_tensors(x.to(wide), y.to(wide))
    x_unit = x / _norm(x)
    y_unit = y / _norm(y)

    axis_sum = x_unit + y_unit
    axis_norm = _norm(axis_sum)
    degenerate = axis_norm <= torch.finfo(wide).eps ** 0.5
    safe_norm = torch.where(degenerate, torch.ones_like(axis_norm), axis_norm)
    axis = torch.where(degenerate, antipodal_direction(x_unit), axis_sum / safe_norm)

    same = (x_unit == y_unit).all(dim=-1, keepdim=True)
    axis = torch.where(same, torch.zeros_like(axis), axis)
    return axis.to(out_dtype)


def _theta_over_sin(theta: torch.Tensor) -> torch.Tensor:
    # θ/sin θ for θ in [0, π/2]. The series also keeps the gradient exact at 0.
    threshold = taylor_threshold(theta.dtype)
    small = theta < threshold
    safe = torch.where(small, torch.full_like(theta, threshold), theta)
    theta2 = theta * theta
    series = 1.0 + theta2 / 6.0 + 7.0 * theta2 * theta2 / 360.0
    return torch.where(small, series, safe / torch.sin(safe))


def _sin_over_theta(theta: torch.Tensor) -> torch.Tensor:
    # sin θ / θ for θ ≥ 0.
    threshold = taylor_threshold(theta.dtype)
    small = theta < threshold
    safe = torch.where(small, torch.full_like(theta, threshold), theta)
    theta2 = theta * theta
    series = 1.0 - theta2 / 6.0 + theta2 * theta2 / 120.0
    return torch.where(small, series, torch.sin(safe) / safe)


class Sphere(Manifold):
    """Unit sphere {x ∈ R^D : ‖x‖ = 1} along the last dimension, D ≥ 2.

    A drop-in replacement for ``geoopt.Sphere`` (without its subspace options)
    for ``geoopt.ManifoldParameter``, ``geoopt.ManifoldTensor`` and geoopt's
    Riemannian optimizers, with distances and log maps that stay accurate for
    angles near 0 and π. Errors measured against a long-double reference are in
    docs/sphere_accuracy.md.

    Float16 and bfloat16 inputs are computed in float32 and the results are
    cast back to the promoted input dtype. ``retr`` is the projection retraction
    ``projx(x + u)``, as in geoopt, and ``transp`` is the parallel transport
    along the minimising geodesic, followed by a projection onto T_y.
    """

    ndim = 1
    name = "Sphere"
    reversible = False

    def __init__(self) -> None:
        super().__init__()

    def _check_shape(self, shape: Tuple[int], name: str) -> Tuple[bool, Optional[str]]:
        ok, reason = super()._check_shape(shape, name)
        if ok and shape[-1] < 2:
            return False, f"`{name}` has last dimension {shape[-1]}, but the sphere needs at least 2 coordinates"
        return ok, reason

    def _check_point_on_manifold(
        self, x: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> Tuple[bool, Optional[str]]:
        norm = torch.linalg.vector_norm(x.to(compute_dtype(x.dtype)), dim=-1)
        if not torch.allclose(norm, torch.ones_like(norm), atol=atol, rtol=rtol):
            worst = (norm - 1).abs().max().item()
            return False, f"`norm(x) != 1` with atol={atol}, rtol={rtol}: max |norm - 1| is {worst:.3g}"
        return True, None

    def _check_vector_on_tangent(
        self, x: torch.Tensor, u: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> Tuple[bool, Optional[str]]:
        inner = self.inner(x, x, u, keepdim=True)
        if not torch.allclose(inner, torch.zeros_like(inner), atol=atol, rtol=rtol):
            worst = inner.abs().max().item()
            return False, f"`<x, u> != 0` with atol={atol}, rtol={rtol}: max |<x, u>| is {worst:.3g}"
        return True, None

    def inner(
        self, x: torch.Tensor, u: torch.Tensor, v: Optional[torch.Tensor] = None, *, keepdim: bool = False
    ) -> torch.Tensor:
        """Compute the Euclidean inner product of tangent vectors at x.

        Args:
            x: Points of shape (..., D). Only their shape is used, for broadcasting.
            u: Tangent vectors of shape (..., D).
            v: Tangent vectors of shape (..., D). Defaults to ``u``.
            keepdim: Keep the last dimension with size 1.

        Returns:
            Inner products broadcast to x's leading shape.
        """
        if v is None:
            v = u
        out_dtype = result_dtype(u.dtype, v.dtype)
        dtype = compute_dtype(u.dtype, v.dtype)
        inner = (u.to(dtype) * v.to(dtype)).sum(dim=-1, keepdim=keepdim)
        target_shape = torch.broadcast_shapes(x.shape[:-1] + (1,) * keepdim, inner.shape)
        return inner.expand(target_shape).to(out_dtype)

    def norm(self, x: torch.Tensor, u: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        """Compute the norm of tangent vectors at x.

        Args:
            x: Points of shape (..., D). Only their shape is used, for broadcasting.
            u: Tangent vectors of shape (..., D).
            keepdim: Keep the last dimension with size 1.

        Returns:
            Norms broadcast to x's leading shape.
        """
        norm = torch.linalg.vector_norm(u.to(compute_dtype(u.dtype)), dim=-1, keepdim=keepdim)
        target_shape = torch.broadcast_shapes(x.shape[:-1] + (1,) * keepdim, norm.shape)
        return norm.expand(target_shape).to(u.dtype)

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """Project nonzero vectors onto the sphere by normalising them.

        Args:
            x: Vectors of shape (..., D). A zero vector gives NaN, because it has
                no nearest point on the sphere.

        Returns:
            Unit vectors of shape (..., D).
        """
        work = x.to(compute_dtype(x.dtype))
        return (work / _norm(work)).to(x.dtype)

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Project vectors onto the tangent space at x: u - <x, u> x.

        Args:
            x: Points of shape (..., D).
            u: Vectors of shape (..., D), broadcastable with ``x``.

        Returns:
            Tangent vectors at x of the broadcast shape.
        """
        out_dtype = result_dtype(x.dtype, u.dtype)
        dtype = compute_dtype(x.dtype, u.dtype)
        x, u = x.to(dtype), u.to(dtype)
        return (u - _dot(x, u) * x).to(out_dtype)

    egrad2rgrad = proju

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Follow the geodesic from x in direction u for length ‖u‖.

        Computes cos(‖u‖)·x + (sin(‖u‖)/‖u‖)·u, with a Taylor series for small
        ‖u‖, so ``expmap(x, 0)`` is exactly x and gradients are finite at u = 0.

        Args:
            x: Points of shape (..., D).
            u: Tangent vectors at x of shape (..., D), broadcastable with ``x``.

        Returns:
            Points of the broadcast shape. They are not renormalised, so their
            norm equals ‖x‖ up to rounding.
        """
        out_dtype = result_dtype(x.dtype, u.dtype)
        dtype = compute_dtype(x.dtype, u.dtype)
        x, u = x.to(dtype), u.to(dtype)
        length = _norm(u)
        return (torch.cos(length) * x + _sin_over_theta(length) * u).to(out_dtype)

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Retract x + u onto the sphere: projx(x + u).

        Args:
            x: Points of shape (..., D).
            u: Tangent vectors at x of shape (..., D), broadcastable with ``x``.

        Returns:
            Unit vectors of the broadcast shape.
        """
        out_dtype = result_dtype(x.dtype, u.dtype)
        dtype = compute_dtype(x.dtype, u.dtype)
        return self.projx(x.to(dtype) + u.to(dtype)).to(out_dtype)

    def dist(self, x: torch.Tensor, y: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        """Compute the geodesic distance θ = 2·atan2(‖x − y‖, ‖x + y‖).

        The result is exactly 0 for x == y and exactly π for y == -x, and is
        exactly symmetric in x and y. Gradients are finite everywhere. At x == y
        and y == -x, where the distance is not differentiable, they are 0 with
        respect to the norm that vanishes.

        Args:
            x: Points of shape (..., D).
            y: Points of shape (..., D), broadcastable with ``x``.
            keepdim: Keep the last dimension with size 1.

        Returns:
            Distances in radians, in [0, π], of the broadcast leading shape.
        """
        out_dtype = result_dtype(x.dtype, y.dtype)
        dtype = compute_dtype(x.dtype, y.dtype)
        theta = _angle(_upcast_point(x, dtype), _upcast_point(y, dtype))
        if not keepdim:
            theta = theta.squeeze(-1)
        return theta.to(out_dtype)

    def logmap(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Compute the tangent vector at x that points to y, with length dist(x, y).

        The direction comes from the tangent part u of y - x when <x, y> ≥ 0 and
        of y + x otherwise. Both have the same tangent part, but the chosen one is
        free of cancellation. For <x, y> ≥ 0 the result is u·θ/sin θ, with a series
        for small θ, so ``logmap(x, x)`` is exactly 0 and its gradient is finite.
        Otherwise the result is θ·u/‖u‖.

        At the antipode y = -x every direction is a shortest path. When ‖u‖ ≤ eps
        of the compute dtype, the result is π (the computed θ) times
        :func:`antipodal_direction` of x: e₀ made orthogonal to x, or e₁ when
        ``|x₀| > 1/√2``. It is deterministic and never NaN.

        Args:
            x: Points of shape (..., D).
            y: Points of shape (..., D), broadcastable with ``x``.

        Returns:
            Tangent vectors at x of the broadcast shape.
        """
        out_dtype = result_dtype(x.dtype, y.dtype)
        dtype = compute_dtype(x.dtype, y.dtype)
        x, y = torch.broadcast_tensors(_upcast_point(x, dtype), _upcast_point(y, dtype))

        near = _dot(x, y) >= 0
        difference = torch.where(near, y - x, y + x)
        tangent = difference - _dot(x, difference) * x
        theta = _angle(x, y)

        # The closer half: u·θ/sin θ, evaluated at θ = 0 on the far half.
        near_theta = torch.where(near, theta, torch.zeros_like(theta))
        near_log = tangent * _theta_over_sin(near_theta)

        # The farther half: θ·u/‖u‖, with the fixed direction when u vanishes.
        tangent_norm = _norm(tangent)
        degenerate = tangent_norm <= torch.finfo(dtype).eps
        safe_norm = torch.where(degenerate, torch.ones_like(tangent_norm), tangent_norm)
        direction = torch.where(degenerate, antipodal_direction(x), tangent / safe_norm)
        far_log = theta * direction

        return torch.where(near, near_log, far_log).to(out_dtype)

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Transport tangent vectors from x to y along the minimising geodesic.

        For v in T_x this is the parallel transport, an isometry, computed as the
        reflection across :func:`reflection_axis` (x, y). The result is then
        projected onto T_y, so a normal component of v is dropped, as in geoopt's
        ``Sphere.transp``. For y == x the transport is the identity. For y == -x
        it follows the geodesic that :meth:`logmap` picks.

        Args:
            x: Start points of shape (..., D).
            y: End points of shape (..., D).
            v: Tangent vectors at x of shape (..., D).

        Returns:
            Tangent vectors at y of the broadcast shape.
        """
        out_dtype = result_dtype(x.dtype, y.dtype, v.dtype)
        dtype = compute_dtype(x.dtype, y.dtype, v.dtype)
        y, v = y.to(dtype), v.to(dtype)
        axis = reflection_axis(x, y)
        reflected = v - 2.0 * _dot(axis, v) * axis
        return self.proju(y, reflected).to(out_dtype)

    def random_uniform(
        self,
        *size: Union[int, Tuple[int, ...]],
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
        generator: Optional[torch.Generator] = None,
    ) -> ManifoldTensor:
        """Sample points uniformly on the sphere by normalising Gaussian vectors.

        Args:
            *size: Shape of the result, with the point dimension last.
            dtype: Dtype of the result.
            device: Device of the result.
            generator: Random generator, for reproducible samples.

        Returns:
            A ``geoopt.ManifoldTensor`` on this manifold.
        """
        shape = size2shape(*size)
        self._assert_check_shape(shape, "x")
        gaussian = torch.randn(shape, dtype=dtype, device=device, generator=generator)
        return ManifoldTensor(self.projx(gaussian), manifold=self)

    random = random_uniform
