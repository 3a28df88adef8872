"""The spherical Cauchy distribution: density, Möbius sampler, KL to the uniform, mean, gradients.

References are hand-derived closed forms, float64 quadrature (scipy) and Monte Carlo with a
tolerance of five standard errors. Seeds are fixed, so each statistical check is deterministic.
"""

import math
from decimal import Decimal, getcontext

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch.distributions import kl_divergence

from spherical_cl.distributions import (
    HypersphericalUniform,
    SphericalCauchy,
    log_sphere_area,
    spherical_cauchy_kl_to_uniform,
    spherical_cauchy_mean_resultant_length,
)

RHO_NEAR_ONE = 1.0 - 1e-6


def _unit(vector) -> torch.Tensor:
    vector = torch.as_tensor(vector, dtype=torch.float64)
    return vector / vector.norm()


def _random_unit(dim: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return _unit(torch.randn(dim, generator=generator, dtype=torch.float64)).to(dtype)


def _sphere_s2_grid(nodes: int = 600):
    """Return points (N, 3) and weights (N,) of a product quadrature on S² (Gauss-Legendre × trapezoid)."""
    cosines, weights = np.polynomial.legendre.leggauss(nodes)
    angles = np.arange(2 * nodes) * (np.pi / nodes)
    t, phi = np.meshgrid(cosines, angles, indexing="ij")
    radius = np.sqrt(1.0 - t * t)
    points = np.stack([radius * np.cos(phi), radius * np.sin(phi), t], axis=-1).reshape(-1, 3)
    grid_weights = (weights[:, None] * np.full(2 * nodes, np.pi / nodes)[None, :]).reshape(-1)
    return torch.from_numpy(points), torch.from_numpy(grid_weights)


def _cosine_density(t: np.ndarray, rho: float, dim: int) -> np.ndarray:
    """Density of t = μᵀy from the spherical Cauchy density and the area of the (d−2)-sphere slices."""
    log_constant = math.lgamma(dim / 2) - 0.5 * math.log(math.pi) - math.lgamma((dim - 1) / 2)
    log_ratio = np.log1p(-rho) + np.log1p(rho) - np.log((1 - rho) ** 2 + 2 * rho * (1 - t))
    log_slice = 0.0
    if dim > 3:
        with np.errstate(divide="ignore"):
            log_slice = 0.5 * (dim - 3) * np.log1p(-t * t)
    return np.exp(log_constant + log_slice + (dim - 1) * log_ratio)


def _quadrature_kl(rho: float, dim: int) -> float:
    """KL = (d − 1)(E_s log‖u + ρμ‖² − log(1 − ρ²)) with s = μᵀu under the uniform, by scipy quad."""
    log_constant = math.lgamma(dim / 2) - 0.5 * math.log(math.pi) - math.lgamma((dim - 1) / 2)

    def integrand(s):
        log_weight = log_constant + 0.5 * (dim - 3) * math.log1p(-s * s)
        return math.exp(log_weight) * math.log((1 - rho) ** 2 + 2 * rho * (1 + s))

    # Break points where the integrand changes fast: near s = −1 and over the weight's width 1/√d.
    width = 1 / math.sqrt(dim)
    points = sorted(p for p in {-0.999999, -8 * width, 0.0, 8 * width} if -1 < p < 1)
    value, error = integrate.quad(integrand, -1, 1, points=points, limit=400, epsabs=1e-14, epsrel=1e-13)
    assert error < 1e-9
    return (dim - 1) * (value - math.log1p(-rho) - math.log1p(rho))


# log_prob ----------------------------------------------------------------------------------


def test_log_prob_hand_computed():
    mu = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    distribution = SphericalCauchy(mu, 0.5)
    points = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    # f = (1/4π) · ((1 − ρ²)/(1 + ρ² − 2ρt))² at t = 1, −1, 0 with ρ = 1/2.
    expected = torch.tensor([9 / (4 * math.pi), 1 / (36 * math.pi), 0.36 / (4 * math.pi)], dtype=torch.float64)
    torch.testing.assert_close(distribution.log_prob(points).exp(), expected, rtol=1e-14, atol=0)

    # d = 2 is the wrapped Cauchy density (1 − ρ²) / (2π (1 + ρ² − 2ρ cos θ)).
    circle = SphericalCauchy(torch.tensor([1.0, 0.0], dtype=torch.float64), 0.3)
    for theta in (0.0, 0.7, 2.0, math.pi):
        point = torch.tensor([math.cos(theta), math.sin(theta)], dtype=torch.float64)
        wrapped = (1 - 0.09) / (2 * math.pi * (1 + 0.09 - 0.6 * math.cos(theta)))
        assert circle.log_prob(point).exp().item() == pytest.approx(wrapped, rel=1e-13)


def test_log_prob_exact_at_large_dim():
    getcontext().prec = 60
    dim = 1024
    rho32 = torch.tensor(RHO_NEAR_ONE, dtype=torch.float32)
    rho = Decimal(rho32.item())
    mu = torch.zeros(dim)
    mu[0] = 1.0
    points = torch.zeros(3, dim)
    points[0, 0], points[1, 0], points[2, 1] = 1.0, -1.0, 1.0
    # x = μ, x = −μ and x ⟂ μ, all exact in float32: ratio (1 − ρ²)/(1 + ρ² − 2ρt) with t = 1, −1, 0.
    ratios = [(1 - rho * rho) / (1 - rho) ** 2, (1 - rho * rho) / (1 + rho) ** 2, (1 - rho * rho) / (1 + rho * rho)]
    log_area = Decimal(log_sphere_area(dim))
    expected = torch.tensor([float((dim - 1) * r.ln() - log_area) for r in ratios], dtype=torch.float64)

    actual32 = SphericalCauchy(mu, rho32).log_prob(points)
    assert actual32.dtype == torch.float32
    torch.testing.assert_close(actual32.double(), expected, rtol=2e-6, atol=0)
    actual64 = SphericalCauchy(mu.double(), rho32.double()).log_prob(points.double())
    torch.testing.assert_close(actual64, expected, rtol=1e-12, atol=0)
    assert expected[0] > 14000, "the test point must exercise the large-d, rho -> 1 regime"


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.7, 0.9])
def test_log_prob_integrates_to_one_on_s2(rho):
    points, weights = _sphere_s2_grid()
    mu = _random_unit(3, seed=1)
    density = SphericalCauchy(mu, rho).log_prob(points).exp()
    assert (weights * density).sum().item() == pytest.approx(1.0, abs=1e-3)


def test_log_prob_of_rho_zero_is_uniform():
    for dim in (2, 3, 17, 256):
        points = torch.nn.functional.normalize(torch.randn(50, dim, dtype=torch.float64), dim=-1)
        log_prob = SphericalCauchy(_random_unit(dim, seed=dim), 0.0).log_prob(points)
        torch.testing.assert_close(log_prob, torch.full((50,), -log_sphere_area(dim), dtype=torch.float64),
                                   rtol=0, atol=1e-12)


# Sampling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dim, rho", [(3, 0.3), (3, 0.9), (10, 0.6), (64, 0.9)])
def test_rsample_cosine_follows_log_prob(dim, rho):
    torch.manual_seed(10 + dim)
    mu = _random_unit(dim, seed=dim)
    samples = SphericalCauchy(mu, rho).rsample((20_000,))
    angles = (2 * torch.atan2((samples - mu).norm(dim=-1), (samples + mu).norm(dim=-1))).numpy()

    # The reference CDF integrates the density of t = cos θ from log_prob's formula, not the sampler.
    grid = np.linspace(0.0, np.pi, 400_001)
    angle_density = _cosine_density(np.cos(grid), rho, dim) * np.sin(grid)
    cdf = integrate.cumulative_trapezoid(angle_density, grid, initial=0.0)
    assert cdf[-1] == pytest.approx(1.0, abs=1e-6)
    result = stats.kstest(angles, lambda a: np.interp(a, grid, cdf / cdf[-1]))
    assert result.pvalue > 1e-3, f"KS statistic {result.statistic:.4f}"


def test_rsample_expectation_on_s2():
    torch.manual_seed(3)
    mu = _random_unit(3, seed=5)
    distribution = SphericalCauchy(mu, 0.7)

    def observable(y):
        # Not symmetric about μ, so it checks the whole distribution, not only the cosine to μ.
        return y[..., 0] ** 2 + y[..., 0] * y[..., 2] + 0.5 * y[..., 1]

    points, weights = _sphere_s2_grid()
    expected = (weights * distribution.log_prob(points).exp() * observable(points)).sum().item()
    values = observable(distribution.rsample((100_000,)))
    standard_error = values.std().item() / math.sqrt(len(values))
    assert abs(values.mean().item() - expected) < 5 * standard_error


@pytest.mark.parametrize("dim", [2, 3, 16, 64])
@pytest.mark.parametrize("rho", [0.2, 0.7, 0.95])
def test_sample_mean_resultant_length(dim, rho):
    torch.manual_seed(dim)
    mu = _random_unit(dim, seed=7)
    distribution = SphericalCauchy(mu, rho)
    samples = distribution.rsample((100_000,))
    cosines = samples @ mu
    standard_error = cosines.std().item() / math.sqrt(len(samples))
    # ‖ȳ‖ exceeds E[μᵀy] by about (1 − E[(μᵀy)²]) / (2 N m), below 3e-5 for these ρ and d.
    resultant = samples.mean(dim=0).norm().item()
    analytic = distribution.mean_resultant_length.item()
    assert abs(resultant - analytic) < 5 * standard_error + 1e-4
    torch.testing.assert_close(distribution.mean, analytic * mu)


def test_rho_zero_samples_are_uniform():
    torch.manual_seed(0)
    samples = SphericalCauchy(_random_unit(8, seed=2), 0.0).rsample((100_000,))
    # Uniform on S^7: each coordinate has mean 0 and variance 1/8.
    assert samples.mean(dim=0).abs().max() < 5 * math.sqrt(1 / 8 / 100_000)
    torch.testing.assert_close(samples.norm(dim=-1), torch.ones(100_000, dtype=torch.float64))


def test_samples_have_unit_norm_near_rho_one():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        distribution = SphericalCauchy(_random_unit(64, seed=4, dtype=dtype), torch.tensor(RHO_NEAR_ONE, dtype=dtype))
        samples = distribution.rsample((10_000,))
        assert samples.dtype == dtype
        assert (samples.norm(dim=-1) - 1).abs().max() < 4 * torch.finfo(dtype).eps
        assert (samples @ distribution.loc).min() > 0.99


def test_batch_shapes_and_expand():
    torch.manual_seed(0)
    loc = torch.nn.functional.normalize(torch.randn(3, 5), dim=-1)
    distribution = SphericalCauchy(loc, torch.tensor([0.1, 0.5, 0.9]))
    assert distribution.batch_shape == (3,)
    assert distribution.event_shape == (5,)
    assert distribution.rsample((4,)).shape == (4, 3, 5)
    expanded = distribution.expand((2, 3))
    assert expanded.rsample().shape == (2, 3, 5)
    assert expanded.log_prob(loc).shape == (2, 3)
    scalar_rho = SphericalCauchy(loc, 0.5)
    assert scalar_rho.rho.shape == (3,)


# Mean --------------------------------------------------------------------------------------


def test_mean_resultant_length_closed_forms():
    rho = torch.tensor([0.0, 1e-3, 0.2, 0.5, 0.9, 0.999, RHO_NEAR_ONE], dtype=torch.float64)
    # d = 2: m = ρ. d = 4: r_1 = −1/2 is the only term, so m = ρ + ρ(1 − ρ²)/2.
    torch.testing.assert_close(spherical_cauchy_mean_resultant_length(rho, 2), rho, rtol=1e-15, atol=0)
    torch.testing.assert_close(spherical_cauchy_mean_resultant_length(rho, 4), rho + rho * (1 - rho**2) / 2,
                               rtol=1e-14, atol=0)
    # d = 3: r_n = −1/((2n−1)(2n+1)), so Σ −r_n ρ^{2n−1} = (artanh ρ · (1 − 1/ρ²) + 1/ρ)/2.
    nonzero = rho[1:]
    series = 0.5 * (torch.atanh(nonzero) * (1 - 1 / nonzero**2) + 1 / nonzero)
    expected = nonzero + (1 - nonzero**2) * series
    torch.testing.assert_close(spherical_cauchy_mean_resultant_length(nonzero, 3), expected, rtol=1e-7, atol=1e-12)
    assert spherical_cauchy_mean_resultant_length(rho[:1], 3).item() == 0.0


@pytest.mark.parametrize("dim", [5, 16, 63, 256, 1024])
def test_mean_resultant_length_matches_quadrature(dim):
    for rho in (0.1, 0.5, 0.9, 0.99):
        expected, error = integrate.quad(lambda t: t * _cosine_density(np.array(t), rho, dim), -1, 1,
                                         points=[0.0, 0.9, 0.99, 0.999], limit=400, epsabs=1e-13)
        actual = spherical_cauchy_mean_resultant_length(torch.tensor(rho, dtype=torch.float64), dim).item()
        assert actual == pytest.approx(expected, abs=1e-9), (dim, rho)


# KL divergence -----------------------------------------------------------------------------


def test_kl_closed_forms_in_small_dims():
    # From ρ = 1e-2 on, the d = 3 closed form loses at most eps/ρ² to cancellation.
    rho = torch.tensor([1e-2, 0.1, 0.5, 0.9, 0.99, 0.999999, RHO_NEAR_ONE], dtype=torch.float64)
    log_one_minus_rho2 = torch.log1p(-rho) + torch.log1p(rho)
    # d = 2 (wrapped Cauchy): −log(1 − ρ²). d = 4: r_1 = −1/2 only, so 3(ρ²/2 − log(1 − ρ²)).
    # d = 3: Σ ρ^{2n}/(n(2n−1)(2n+1)) = log(1 − ρ²) + (ρ + 1/ρ) artanh ρ − 1, so KL = 2((ρ + 1/ρ) artanh ρ − 1).
    expected = {2: -log_one_minus_rho2,
                3: 2 * ((rho + 1 / rho) * torch.atanh(rho) - 1),
                4: 3 * (rho**2 / 2 - log_one_minus_rho2)}
    for dim, values in expected.items():
        torch.testing.assert_close(spherical_cauchy_kl_to_uniform(rho, dim), values, rtol=2e-9, atol=1e-15,
                                   msg=f"d={dim}")


@pytest.mark.parametrize("dim", [5, 16, 63, 64, 255, 1023, 1024])
def test_kl_matches_quadrature(dim):
    for rho in (1e-3, 0.3, 0.7, 0.9, 0.99, 0.999, RHO_NEAR_ONE):
        expected = _quadrature_kl(rho, dim)
        actual = spherical_cauchy_kl_to_uniform(torch.tensor(rho, dtype=torch.float64), dim).item()
        assert abs(actual - expected) < 1e-4, (dim, rho, actual, expected)
        assert actual == pytest.approx(expected, rel=1e-8), (dim, rho)


@pytest.mark.parametrize("dim, rho", [(3, 0.3), (3, 0.999), (16, 0.9), (64, 0.5), (64, 0.99), (1024, 0.9)])
def test_kl_matches_monte_carlo(dim, rho):
    torch.manual_seed(dim)
    distribution = SphericalCauchy(_random_unit(dim, seed=dim), rho)
    uniform = HypersphericalUniform(dim, dtype=torch.float64)
    count = 5_000 if dim > 256 else 40_000
    samples = distribution.rsample((count,))
    log_ratios = distribution.log_prob(samples) - uniform.log_prob(samples)
    kl = kl_divergence(distribution, uniform).item()
    standard_error = log_ratios.std().item() / math.sqrt(count)
    assert abs(log_ratios.mean().item() - kl) < 5 * standard_error

    # KL(U ‖ SC) has the same value, checked with uniform samples.
    uniform_samples = uniform.sample((count,))
    reverse_ratios = uniform.log_prob(uniform_samples) - distribution.log_prob(uniform_samples)
    reverse = kl_divergence(uniform, distribution).item()
    reverse_error = reverse_ratios.std().item() / math.sqrt(count)
    assert reverse == pytest.approx(kl, rel=1e-12)
    assert abs(reverse_ratios.mean().item() - reverse) < 5 * reverse_error


@pytest.mark.parametrize("dim", [2, 3, 5, 64, 1024])
def test_kl_zero_then_increasing(dim):
    rho = torch.cat([torch.linspace(0.0, 0.999, 300, dtype=torch.float64),
                     torch.tensor([0.9999, 0.99999, RHO_NEAR_ONE], dtype=torch.float64)])
    kl = spherical_cauchy_kl_to_uniform(rho, dim)
    assert kl[0].item() == 0.0
    assert (kl[1:] > 0).all()
    assert (kl.diff() > 0).all()
    assert torch.isfinite(kl).all()


def test_kl_registered_for_uniform_prior():
    loc = torch.nn.functional.normalize(torch.randn(4, 6), dim=-1)
    distribution = SphericalCauchy(loc, torch.tensor([0.0, 0.2, 0.6, 0.9]))
    kl = kl_divergence(distribution, HypersphericalUniform(6))
    assert kl.shape == (4,)
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, spherical_cauchy_kl_to_uniform(distribution.rho, 6))
    assert kl_divergence(HypersphericalUniform(6), HypersphericalUniform(6)).item() == 0.0
    with pytest.raises(ValueError, match="different spheres"):
        kl_divergence(distribution, HypersphericalUniform(5))


def test_entropy_matches_monte_carlo():
    torch.manual_seed(1)
    for dim, rho in ((3, 0.0), (3, 0.8), (32, 0.9)):
        distribution = SphericalCauchy(_random_unit(dim, seed=3), rho)
        log_prob = distribution.log_prob(distribution.sample((40_000,)))
        standard_error = log_prob.std().item() / math.sqrt(len(log_prob)) + 1e-12
        assert abs(-log_prob.mean().item() - distribution.entropy().item()) < 5 * standard_error
    assert SphericalCauchy(_random_unit(3, seed=3), 0.0).entropy().item() == pytest.approx(math.log(4 * math.pi))


# Gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [3, 64, 1024])
def test_rsample_gradients_finite_near_one(dim):
    torch.manual_seed(dim)
    for rho_value in (0.0, 0.5, 0.999, RHO_NEAR_ONE):
        loc = torch.nn.functional.normalize(torch.randn(8, dim), dim=-1).requires_grad_(True)
        rho = torch.full((8,), rho_value, dtype=torch.float32, requires_grad=True)
        distribution = SphericalCauchy(loc, rho)
        samples = distribution.rsample((64,))
        weights = torch.randn(dim)
        loss = (samples @ weights).sum() + kl_divergence(distribution, HypersphericalUniform(dim)).sum()
        loss.backward()
        assert torch.isfinite(loc.grad).all(), rho_value
        assert torch.isfinite(rho.grad).all(), rho_value
        assert rho.grad.abs().sum() > 0 or rho_value == 0.0


def test_reparameterised_gradients_match_mean():
    torch.manual_seed(0)
    dim, rho_value, count = 8, 0.6, 200_000
    mu = _random_unit(dim, seed=9)
    weights = _random_unit(dim, seed=10)
    loc = mu.expand(count, dim).clone().requires_grad_(True)
    rho = torch.full((count,), rho_value, dtype=torch.float64, requires_grad=True)
    samples = SphericalCauchy(loc, rho).rsample()
    # E[wᵀy] = m(ρ) wᵀμ, so its ρ-derivative is m′(ρ) wᵀμ and its tangent μ-derivative is m(ρ)(w − (wᵀμ)μ).
    (samples @ weights).sum().backward()

    step = 1e-6
    plus, minus = (spherical_cauchy_mean_resultant_length(torch.tensor(rho_value + sign * step, dtype=torch.float64),
                                                          dim).item() for sign in (1, -1))
    length = spherical_cauchy_mean_resultant_length(torch.tensor(rho_value, dtype=torch.float64), dim).item()
    expected_rho = (plus - minus) / (2 * step) * (weights @ mu).item()
    rho_error = rho.grad.std().item() / math.sqrt(count)
    assert abs(rho.grad.mean().item() - expected_rho) < 5 * rho_error

    tangent = loc.grad - (loc.grad @ mu).unsqueeze(1) * mu
    expected_loc = length * (weights - (weights @ mu) * mu)
    loc_error = tangent.std(dim=0) / math.sqrt(count)
    assert ((tangent.mean(dim=0) - expected_loc).abs() < 5 * loc_error + 1e-12).all()


# Validation --------------------------------------------------------------------------------


def test_invalid_arguments_name_the_value():
    loc = torch.tensor([0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"rho must lie in \[0, 1\), got 1\.0 at index \(\)"):
        SphericalCauchy(loc, 1.0)
    with pytest.raises(ValueError, match=r"got -0\.1.* at index \(1,\)"):
        SphericalCauchy(loc.expand(2, 3), torch.tensor([0.5, -0.1]))
    with pytest.raises(ValueError, match=r"rho must lie in \[0, 1\), got nan"):
        SphericalCauchy(loc, float("nan"))
    with pytest.raises(ValueError, match=r"loc must have unit norm .* got norm 2\.0 at index \(\)"):
        SphericalCauchy(2 * loc, 0.5)
    with pytest.raises(ValueError, match=r"loc of shape \(4, 3\) and rho of shape \(5,\) do not broadcast"):
        SphericalCauchy(loc.expand(4, 3), torch.full((5,), 0.5))
    with pytest.raises(ValueError, match=r"d >= 2, got shape \(1,\)"):
        SphericalCauchy(torch.ones(1), 0.5)
    with pytest.raises(ValueError, match="floating-point"):
        SphericalCauchy(torch.tensor([0, 0, 1]), 0.5)
    distribution = SphericalCauchy(loc, 0.5)
    with pytest.raises(ValueError, match=r"value must contain unit vectors .* got norm 3\.0"):
        distribution.log_prob(torch.tensor([0.0, 3.0, 0.0]))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\) .* got shape \(4,\)"):
        distribution.log_prob(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="dim must be an integer >= 2"):
        HypersphericalUniform(1)
    with pytest.raises(ValueError, match=r"rho must lie in \[0, 1\), got 1\.5"):
        spherical_cauchy_kl_to_uniform(torch.tensor([0.2, 1.5]), 4)
    # Validation can be switched off, as for every torch distribution.
    SphericalCauchy(2 * loc, 0.5, validate_args=False)


def test_uniform_distribution():
    torch.manual_seed(0)
    uniform = HypersphericalUniform(5, batch_shape=(2,), dtype=torch.float64)
    samples = uniform.sample((3,))
    assert samples.shape == (3, 2, 5)
    assert samples.dtype == torch.float64
    torch.testing.assert_close(samples.norm(dim=-1), torch.ones(3, 2, dtype=torch.float64))
    # Area of S⁴ is 8π²/3.
    torch.testing.assert_close(uniform.entropy(), torch.full((2,), math.log(8 * math.pi**2 / 3), dtype=torch.float64))
    assert uniform.log_prob(samples).shape == (3, 2)
