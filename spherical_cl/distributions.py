"""Distributions on the unit sphere S^{d−1} ⊂ ℝ^d: the spherical Cauchy and the uniform.

:class:`SphericalCauchy` is the spherical Cauchy (spCauchy) family that Sablica and Hornik
("Hyperspherical Variational Autoencoders Using Efficient Spherical Cauchy Distribution",
arXiv:2506.21278, 2025) use as a VAE posterior with a uniform prior. With location μ (a unit
vector) and concentration ρ ∈ [0, 1), its density with respect to the surface measure of
S^{d−1} is

    f(x) = Γ(d/2) / (2 π^{d/2}) · ((1 − ρ²) / ‖x − ρμ‖²)^{d−1},
    ‖x − ρμ‖² = 1 + ρ² − 2ρ μᵀx = (1 − ρ)² + ρ ‖x − μ‖².

The last form is a sum of non-negative terms, so it has no cancellation as ρ → 1.

**Sampling.** For a = ρμ, the map T_a(x) = (1 − ρ²)(x − a)/‖x − a‖² − a is a Möbius
transformation of the sphere onto itself (an inversion in the sphere of radius √(1 − ρ²)
about a, then a shift), with inverse T_{−a} and conformal factor (1 − ρ²)/‖x − a‖² on the
sphere. So for u uniform on S^{d−1}, y = T_{−a}(u) has density (1/A) · ((1 − ρ²)/‖y − a‖²)^{d−1}
with A = 2π^{d/2}/Γ(d/2) the area of the sphere, which is f above:

    y = (1 − ρ²)(u + ρμ) / ‖u + ρμ‖² + ρμ,   ‖u + ρμ‖² = (1 − ρ)² + ρ‖u + μ‖².

**Series.** With s = μᵀu for u uniform (density ∝ (1 − s²)^{(d−3)/2} on [−1, 1]) and
r_n = (1 − d/2)_n / (d/2)_n (Pochhammer symbols), the mean over the sphere of
‖u + ρμ‖^{−2λ} is ₂F₁(λ, λ + 1 − d/2; d/2; ρ²). Its derivative in λ at 0 gives

    g(ρ) = E_u log ‖u + ρμ‖² = −Σ_{n≥1} r_n ρ^{2n} / n.

Every abs(r_n) < 1, and abs(r_n) decreases in n. For even d the series ends at n = d/2 − 1. For
odd d it is cut where abs(r_n) < 1e-20 or after 4096 terms, and the cut changes the KL by less
than 2e-8 (worst at d = 3, ρ → 1, where r_n ≈ −1/(4n²)). The series is summed in float64.

**KL to the uniform.** Because T_a(y) = u, the log-density ratio at y = T_{−a}(u) is
(d − 1) log(‖u + ρμ‖²/(1 − ρ²)), so

    KL(SC(μ, ρ) ‖ U) = (d − 1) · (g(ρ) − log(1 − ρ²)) = (d − 1) · Σ_{n≥1} (1 − r_n) ρ^{2n} / n.

The right-hand sum has positive terms, so the KL is 0 at ρ = 0 and increases with ρ. It is
evaluated as the left-hand form, whose series converges at ρ = 1, with log(1 − ρ²) as
log1p(−ρ) + log1p(ρ). By the symmetry s ↦ −s, KL(U ‖ SC) has the same value. For d = 2 the
KL is −log(1 − ρ²), that of the wrapped Cauchy distribution. Sablica and Hornik (2025)
also compute this KL by a power series. The series here is derived as above and checked
against quadrature in float64 in ``tests/test_spherical_cauchy.py``.

**Mean.** μᵀy = ρ + (1 − ρ²)(s + ρ)/‖u + ρμ‖², and E[(s + ρ)/‖u + ρμ‖²] = g′(ρ)/2, so
E[y] = m(ρ) μ with the mean resultant length

    m(ρ) = ρ − (1 − ρ²) · Σ_{n≥1} r_n ρ^{2n−1}.

The entropy is log A − KL(SC ‖ U).
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from torch.distributions import Distribution, constraints
from torch.distributions.kl import register_kl

logger = logging.getLogger(__name__)

__all__ = [
    "HypersphericalUniform",
    "SphericalCauchy",
    "log_sphere_area",
    "spherical_cauchy_kl_to_uniform",
    "spherical_cauchy_mean_resultant_length",
    "unit_sphere",
]

# Terms of the odd-d series after this many are dropped (see the module docstring for the error).
_MAX_TERMS = 4096
# |r_n| decreases in n, so the terms after the first coefficient below this bound are dropped.
_COEFFICIENT_CUTOFF = 1e-20


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    # float16 and bfloat16 keep too few bits for (1 − ρ)² near ρ = 1, so they run in float32.
    result = torch.float32
    for dtype in dtypes:
        if dtype.is_floating_point:
            result = torch.promote_types(result, dtype)
    return result


def _series_dtype(device: torch.device) -> torch.dtype:
    # Apple MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _norm_tolerance(dtype: torch.dtype) -> float:
    # sqrt(eps) of the input's own dtype, so normalised float16 vectors pass too.
    return torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps ** 0.5


def _first_index(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.nonzero(mask)[0].tolist())


class _UnitSphere(constraints.Constraint):
    """Vectors along the last dimension whose norm is 1 to within sqrt(eps) of their dtype."""

    is_discrete = False
    event_dim = 1

    def check(self, value: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(value.to(_compute_dtype(value.dtype)), dim=-1)
        return (norm - 1).abs() <= _norm_tolerance(value.dtype)

    def __repr__(self) -> str:
        return "UnitSphere()"


unit_sphere = _UnitSphere()


def log_sphere_area(dim: int) -> float:
    """Return log A, A = 2 π^{d/2} / Γ(d/2) the surface area of S^{d−1} ⊂ ℝ^d (d = ``dim``)."""
    return math.log(2.0) + 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim)


def _check_dim(dim: int) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an integer >= 2 (points of S^(dim-1) in R^dim), got {dim!r}")


@functools.lru_cache(maxsize=None)
def _pochhammer_ratios(dim: int) -> torch.Tensor:
    """Return r_n = (1 − d/2)_n / (d/2)_n for n = 1 … N in float64 on the CPU, (N,).

    N is d/2 − 1 for even d, where r_n = 0 from n = d/2 on. For odd d the table stops
    before the first abs(r_n) below 1e-20, or after 4096 terms.
    """
    half = dim / 2
    count = dim // 2 - 1 if dim % 2 == 0 else _MAX_TERMS
    n = torch.arange(1, count + 1, dtype=torch.float64)
    # |n − d/2| < d/2 + n − 1 for n ≥ 1 and d ≥ 2, so each factor is below 1 in absolute value
    # and the product can only underflow to 0, never overflow.
    ratios = torch.cumprod((n - half) / (half + n - 1), dim=0)
    small = torch.nonzero(ratios.abs() < _COEFFICIENT_CUTOFF)
    if len(small):
        ratios = ratios[: int(small[0])]
    return ratios


def _ratios_like(dim: int, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ratios = _pochhammer_ratios(dim).to(device=reference.device, dtype=reference.dtype)
    n = torch.arange(1, len(ratios) + 1, device=reference.device, dtype=reference.dtype)
    return ratios, n


def _log_mean_distance(rho: torch.Tensor, dim: int) -> torch.Tensor:
    # g(ρ) = −Σ r_n ρ^{2n} / n, in the dtype of rho (float64 from the callers).
    ratios, n = _ratios_like(dim, rho)
    if len(ratios) == 0:
        return torch.zeros_like(rho)
    powers = torch.pow((rho * rho).unsqueeze(-1), n)
    # Negating the coefficients, not the sum, keeps g(0) = +0.0.
    return (powers * (-ratios / n)).sum(dim=-1)


def _check_rho(rho: torch.Tensor, name: str = "rho") -> None:
    invalid = ~((rho >= 0) & (rho < 1))
    if invalid.any():
        index = _first_index(invalid)
        raise ValueError(
            f"{name} must lie in [0, 1), got {rho[index].item()!r} at index {index} "
            f"({int(invalid.sum())} of {rho.numel()} values invalid); map an unbounded output h into the "
            "interval, e.g. rho = (1 - 1e-6) * torch.sigmoid(h)"
        )


def spherical_cauchy_kl_to_uniform(rho: torch.Tensor, dim: int) -> torch.Tensor:
    """Compute KL(SphericalCauchy(μ, ρ) ‖ uniform on S^{d−1}), which does not depend on μ.

    KL = (d − 1) · (g(ρ) − log(1 − ρ²)) with g(ρ) = −Σ_{n≥1} r_n ρ^{2n}/n and
    r_n = (1 − d/2)_n / (d/2)_n. The module docstring derives it. The sum runs in float64
    and is differentiable in ρ.

    Args:
        rho: Concentrations in [0, 1), any shape (...,); a float is taken as a float64 tensor.
        dim: The ambient dimension d ≥ 2 of the sphere S^{d−1}.

    Returns:
        The KL divergence in nats, shape (...,), in the dtype of ``rho`` (at least float32).

    Raises:
        ValueError: ``rho`` is outside [0, 1) or ``dim`` is not an integer ≥ 2.
    """
    _check_dim(dim)
    if not isinstance(rho, torch.Tensor):
        rho = torch.as_tensor(rho, dtype=torch.float64)
    _check_rho(rho)
    out_dtype = _compute_dtype(rho.dtype)
    wide = rho.to(_series_dtype(rho.device))
    log_one_minus_rho2 = torch.log1p(-wide) + torch.log1p(wide)
    kl = (dim - 1) * (_log_mean_distance(wide, dim) - log_one_minus_rho2)
    return kl.to(out_dtype)


def spherical_cauchy_mean_resultant_length(rho: torch.Tensor, dim: int) -> torch.Tensor:
    """Compute m(ρ) = ‖E[y]‖ for y ~ SphericalCauchy(μ, ρ) on S^{d−1}.

    m(ρ) = ρ − (1 − ρ²) Σ_{n≥1} r_n ρ^{2n−1} with r_n = (1 − d/2)_n / (d/2)_n, summed in
    float64. For d = 2 this is ρ (the wrapped Cauchy distribution). It is 0 at ρ = 0 and
    tends to 1 as ρ → 1.

    Args:
        rho: Concentrations in [0, 1), any shape (...,).
        dim: The ambient dimension d ≥ 2.

    Returns:
        m(ρ), shape (...,), in the dtype of ``rho`` (at least float32).

    Raises:
        ValueError: ``rho`` is outside [0, 1) or ``dim`` is not an integer ≥ 2.
    """
    _check_dim(dim)
    if not isinstance(rho, torch.Tensor):
        rho = torch.as_tensor(rho, dtype=torch.float64)
    _check_rho(rho)
    out_dtype = _compute_dtype(rho.dtype)
    wide = rho.to(_series_dtype(rho.device))
    ratios, n = _ratios_like(dim, wide)
    # Σ r_n ρ^{2n−1} = ρ · Σ r_n (ρ²)^{n−1}, which avoids dividing by ρ = 0.
    series = (torch.pow((wide * wide).unsqueeze(-1), n - 1) * ratios).sum(dim=-1) * wide
    one_minus_rho2 = (1 - wide) * (1 + wide)
    return (wide - one_minus_rho2 * series).to(out_dtype)


class HypersphericalUniform(Distribution):
    """The uniform distribution on the unit sphere S^{d−1} ⊂ ℝ^d.

    Args:
        dim: The ambient dimension d ≥ 2; samples have shape (..., d).
        batch_shape: Batch shape, for broadcasting against other distributions.
        dtype: Dtype of samples. Defaults to torch's default dtype.
        device: Device of samples.
        validate_args: Check that values passed to :meth:`log_prob` are unit vectors.

    Raises:
        ValueError: ``dim`` is not an integer ≥ 2.
    """

    arg_constraints: dict = {}
    support = unit_sphere
    # Samples do not depend on any parameter, so rsample is sample with an empty graph.
    has_rsample = True

    def __init__(self, dim: int, batch_shape: torch.Size | tuple[int, ...] = torch.Size(), *,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 validate_args: bool | None = None) -> None:
        _check_dim(dim)
        self._dim = dim
        self._dtype = dtype or torch.get_default_dtype()
        if not self._dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype for points on the sphere, got {self._dtype}")
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        super().__init__(torch.Size(batch_shape), torch.Size([dim]), validate_args=validate_args)

    @property
    def dim(self) -> int:
        """The ambient dimension d."""
        return self._dim

    def expand(self, batch_shape, _instance=None) -> "HypersphericalUniform":
        new = self._get_checked_instance(HypersphericalUniform, _instance)
        new._dim, new._dtype, new._device = self._dim, self._dtype, self._device
        super(HypersphericalUniform, new).__init__(torch.Size(batch_shape), self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        return torch.zeros(self.batch_shape + self.event_shape, dtype=self._dtype, device=self._device)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        """Draw unit vectors, shape sample_shape + batch_shape + (d,), by normalising Gaussian vectors."""
        shape = self._extended_shape(torch.Size(sample_shape))
        gaussian = torch.randn(shape, dtype=_compute_dtype(self._dtype), device=self._device)
        return (gaussian / torch.linalg.vector_norm(gaussian, dim=-1, keepdim=True)).to(self._dtype)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Return −log A for each unit vector in ``value`` (..., d), shape broadcast with the batch shape."""
        if self._validate_args:
            _check_sample(value, self._dim)
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        return torch.full(shape, -log_sphere_area(self._dim), dtype=_compute_dtype(value.dtype), device=value.device)

    def entropy(self) -> torch.Tensor:
        return torch.full(self.batch_shape, log_sphere_area(self._dim), dtype=self._dtype, device=self._device)


def _check_sample(value: torch.Tensor, dim: int) -> None:
    if value.ndim == 0 or value.shape[-1] != dim:
        raise ValueError(f"value must have shape (..., {dim}) for a distribution on S^{dim - 1}, "
                         f"got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"value must be a floating-point tensor, got dtype {value.dtype}")
    invalid = ~unit_sphere.check(value)
    if invalid.any():
        index = _first_index(invalid)
        norm = torch.linalg.vector_norm(value[index].to(_compute_dtype(value.dtype))).item()
        raise ValueError(
            f"value must contain unit vectors along its last dimension, got norm {norm!r} at index {index} "
            f"(tolerance {_norm_tolerance(value.dtype):.1e}); normalise it with x / x.norm(dim=-1, keepdim=True)"
        )


class SphericalCauchy(Distribution):
    """The spherical Cauchy distribution on S^{d−1}, with a reparameterised sampler.

    The module docstring gives the density, the Möbius sampler, the KL divergence to
    :class:`HypersphericalUniform` (registered with ``torch.distributions.kl``), the mean and
    the entropy, with their derivations. ρ = 0 is the uniform distribution, and the
    distribution concentrates at μ as ρ → 1.

    Args:
        loc: Location μ, unit vectors of shape (..., d) with d ≥ 2.
        rho: Concentration ρ in [0, 1), shape broadcastable with ``loc.shape[:-1]``, or a float.
        validate_args: Check the parameters on construction and the values passed to
            :meth:`log_prob`. Defaults to torch's global setting
            (``torch.distributions.Distribution.set_default_validate_args``).

    Raises:
        ValueError: With validation on, ``rho`` outside [0, 1) or ``loc`` not of unit norm
            (tolerance sqrt(eps) of its dtype). Always: ``loc`` without a last dimension of
            size ≥ 2, not floating point, or shapes that do not broadcast. Each message names
            the bad value and how to fix it.
    """

    arg_constraints = {"loc": unit_sphere, "rho": constraints.half_open_interval(0.0, 1.0)}
    support = unit_sphere
    has_rsample = True

    def __init__(self, loc: torch.Tensor, rho: torch.Tensor | float, validate_args: bool | None = None) -> None:
        if not isinstance(loc, torch.Tensor) or not loc.is_floating_point():
            raise ValueError(f"loc must be a floating-point tensor of shape (..., d), got {type(loc).__name__} "
                             f"{getattr(loc, 'dtype', '')}".rstrip())
        if loc.ndim == 0 or loc.shape[-1] < 2:
            raise ValueError(f"loc must have shape (..., d) with d >= 2, got shape {tuple(loc.shape)}")
        rho = torch.as_tensor(rho, dtype=loc.dtype, device=loc.device)
        try:
            batch_shape = torch.broadcast_shapes(loc.shape[:-1], rho.shape)
        except RuntimeError:
            raise ValueError(
                f"loc of shape {tuple(loc.shape)} and rho of shape {tuple(rho.shape)} do not broadcast; rho must "
                f"have the shape of loc without its last dimension, {tuple(loc.shape[:-1])}, or one that broadcasts"
            ) from None
        validate = Distribution._validate_args if validate_args is None else validate_args
        if validate:
            _check_rho(rho)
            _check_location(loc)
        self.loc = loc.expand(batch_shape + loc.shape[-1:])
        self.rho = rho.expand(batch_shape)
        # The checks above give clearer messages than torch's generic ones, so torch's are skipped.
        super().__init__(batch_shape, loc.shape[-1:], validate_args=False)
        self._validate_args = bool(validate)

    @property
    def dim(self) -> int:
        """The ambient dimension d of the sphere S^{d−1}."""
        return self.event_shape[0]

    def expand(self, batch_shape, _instance=None) -> "SphericalCauchy":
        new = self._get_checked_instance(SphericalCauchy, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.rho = self.rho.expand(batch_shape)
        super(SphericalCauchy, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean_resultant_length(self) -> torch.Tensor:
        """m(ρ) = ‖E[y]‖, shape batch_shape."""
        return spherical_cauchy_mean_resultant_length(self.rho, self.dim).to(self.loc.dtype)

    @property
    def mean(self) -> torch.Tensor:
        """E[y] = m(ρ) μ, shape batch_shape + (d,). It lies inside the ball, not on the sphere."""
        return self.mean_resultant_length.unsqueeze(-1) * self.loc

    @property
    def mode(self) -> torch.Tensor:
        """The location μ, where the density is largest (for ρ > 0)."""
        return self.loc

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        """Draw y = T_{−ρμ}(u) for u uniform on the sphere, differentiable in ``loc`` and ``rho``.

        Args:
            sample_shape: Leading shape of the draws.

        Returns:
            Unit vectors of shape sample_shape + batch_shape + (d,), in the dtype of ``loc``.
        """
        shape = self._extended_shape(torch.Size(sample_shape))
        dtype = _compute_dtype(self.loc.dtype)
        gaussian = torch.randn(shape, dtype=dtype, device=self.loc.device)
        uniform = gaussian / torch.linalg.vector_norm(gaussian, dim=-1, keepdim=True)
        mu = self.loc.to(dtype)
        rho = self.rho.to(dtype).unsqueeze(-1)
        # ‖u + ρμ‖² = (1 − ρ)² + ρ‖u + μ‖² ≥ (1 − ρ)² > 0 for ρ < 1, without cancellation.
        squared_norm = (1 - rho) ** 2 + rho * (uniform + mu).pow(2).sum(dim=-1, keepdim=True)
        sample = (1 - rho) * (1 + rho) * (uniform + rho * mu) / squared_norm + rho * mu
        # The map keeps ‖y‖ = 1 exactly in real arithmetic. Normalising removes the rounding
        # and leaves the gradient unchanged, because the exact one is tangent to the sphere.
        sample = sample / torch.linalg.vector_norm(sample, dim=-1, keepdim=True)
        return sample.to(self.loc.dtype)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Return log f(value) for unit vectors ``value`` of shape (..., d).

        log f = log Γ(d/2) − log 2 − (d/2) log π + (d − 1) · (log1p(−ρ) + log1p(ρ)
        − log((1 − ρ)² + ρ‖x − μ‖²)), which stays accurate as ρ → 1 and for large d.

        Returns:
            Log densities with respect to the surface measure, shape broadcast of
            ``value.shape[:-1]`` and the batch shape, in float32 or wider (float16 and
            bfloat16 inputs give float32).
        """
        if self._validate_args:
            _check_sample(value, self.dim)
        dtype = _compute_dtype(value.dtype, self.loc.dtype)
        x, mu, rho = value.to(dtype), self.loc.to(dtype), self.rho.to(dtype)
        squared_distance = (x - mu).pow(2).sum(dim=-1)
        log_ratio = torch.log1p(-rho) + torch.log1p(rho) - torch.log((1 - rho) ** 2 + rho * squared_distance)
        return -log_sphere_area(self.dim) + (self.dim - 1) * log_ratio

    def entropy(self) -> torch.Tensor:
        """Return log A − KL(self ‖ uniform), shape batch_shape."""
        kl = spherical_cauchy_kl_to_uniform(self.rho, self.dim)
        return (log_sphere_area(self.dim) - kl).to(_compute_dtype(self.loc.dtype))


def _check_location(loc: torch.Tensor) -> None:
    invalid = ~unit_sphere.check(loc)
    if invalid.any():
        index = _first_index(invalid)
        norm = torch.linalg.vector_norm(loc[index].to(_compute_dtype(loc.dtype))).item()
        raise ValueError(
            f"loc must have unit norm along its last dimension, got norm {norm!r} at index {index} "
            f"(tolerance {_norm_tolerance(loc.dtype):.1e}); normalise it with loc / loc.norm(dim=-1, keepdim=True)"
        )


def _check_same_sphere(p: Distribution, q: Distribution) -> None:
    if p.event_shape != q.event_shape:
        raise ValueError(f"the distributions live on different spheres: event shapes {tuple(p.event_shape)} "
                         f"and {tuple(q.event_shape)}; use a uniform distribution of dim {p.event_shape[0]}")


@register_kl(SphericalCauchy, HypersphericalUniform)
def _kl_spherical_cauchy_uniform(p: SphericalCauchy, q: HypersphericalUniform) -> torch.Tensor:
    _check_same_sphere(p, q)
    kl = spherical_cauchy_kl_to_uniform(p.rho, p.dim)
    return kl.expand(torch.broadcast_shapes(p.batch_shape, q.batch_shape))


@register_kl(HypersphericalUniform, SphericalCauchy)
def _kl_uniform_spherical_cauchy(p: HypersphericalUniform, q: SphericalCauchy) -> torch.Tensor:
    # E_u[log(1/A) − log f(u)] = (d − 1)(E_u log‖u − ρμ‖² − log(1 − ρ²)), and s ↦ −s makes it equal
    # to KL(SC ‖ U).
    _check_same_sphere(p, q)
    kl = spherical_cauchy_kl_to_uniform(q.rho, q.dim)
    return kl.expand(torch.broadcast_shapes(p.batch_shape, q.batch_shape))


@register_kl(HypersphericalUniform, HypersphericalUniform)
def _kl_uniform_uniform(p: HypersphericalUniform, q: HypersphericalUniform) -> torch.Tensor:
    _check_same_sphere(p, q)
    shape = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    return torch.zeros(shape, dtype=p._dtype, device=p._device)
