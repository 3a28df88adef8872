"""Contracts of TangentSubspaceProjector, project_tangent and projection_ratio."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from manifolds import Sphere, TangentSubspaceProjector, project_tangent, projection_ratio

SPHERE = Sphere()


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def tangent_basis(point: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
    """Return an orthonormal (D, rank) basis tangent at ``point``, built in float64."""
    point64 = point.double() / point.double().norm()
    raw = torch.randn(point.shape[0], rank, generator=generator, dtype=torch.float64)
    raw = raw - torch.outer(point64, point64 @ raw)
    return torch.linalg.qr(raw)[0].to(point.dtype)


def base_points(kind: str, point: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Return base points of shape (batch, D): random, near p, near -p, or exactly p or -p."""
    dim = point.shape[0]
    if kind == "random":
        return SPHERE.random(batch, dim, dtype=point.dtype, generator=generator)
    if kind in ("p", "minus_p"):
        sign = 1.0 if kind == "p" else -1.0
        return (sign * point).expand(batch, dim).clone()
    sign = 1.0 if kind == "near_p" else -1.0
    offsets = torch.randn(batch, dim, generator=generator, dtype=point.dtype) * 1e-3
    return SPHERE.projx(sign * point + offsets)


@settings(max_examples=40, deadline=None)
@given(
    dim=st.one_of(st.integers(3, 16), st.integers(17, 1024)),
    rank_fraction=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    kind=st.sampled_from(["random", "near_p", "near_minus_p", "p", "minus_p"]),
)
def test_projector_contract(dim, rank_fraction, seed, dtype, kind):
    generator = torch.Generator().manual_seed(seed)
    # Ranks up to 32 keep the float64 QR of the basis fast at D = 1024.
    rank = max(1, min(dim - 1, 32, int(rank_fraction * dim)))
    point = SPHERE.random(dim, dtype=dtype, generator=generator)
    projector = TangentSubspaceProjector(tangent_basis(point, rank, generator), point)
    mu = base_points(kind, point, 6, generator)
    g = torch.randn(6, dim, generator=generator, dtype=dtype) * 3

    projected = projector(g, mu)
    twice = projector(projected, mu)
    g_norm = g.norm(dim=-1)
    # Near μ = -p the float64 transport axis is only known to eps/‖p̂ + μ̂‖.
    axis_norm = (point.double() / point.double().norm() + mu.double() / mu.double().norm(dim=-1, keepdim=True)).norm(dim=-1)
    amplification = 1 / axis_norm.clamp_min(eps(torch.float64) ** 0.5)
    tolerance = 64 * (eps(dtype) + eps(torch.float64) * amplification).to(dtype) * g_norm

    assert projected.shape == g.shape
    assert projected.dtype == dtype
    assert ((twice - projected).norm(dim=-1) <= tolerance).all()
    assert (projected.norm(dim=-1) <= g_norm + tolerance).all()
    assert ((projected * mu).sum(-1).abs() <= tolerance).all()
    # The residual is orthogonal to the range, which makes the projector orthogonal.
    residual = g - projected
    assert ((residual * projected).sum(-1).abs() <= tolerance * g_norm).all()


@settings(max_examples=15, deadline=None)
@given(dim=st.integers(3, 200), seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fast_path_matches_transported_basis(dim, seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    point = SPHERE.random(dim, dtype=dtype, generator=generator)
    basis = tangent_basis(point, max(1, min(dim // 3, 12)), generator)
    projector = TangentSubspaceProjector(basis, point)
    mu = SPHERE.random(5, dim, dtype=dtype, generator=generator)
    g = torch.randn(5, dim, generator=generator, dtype=dtype)

    moved = projector.transported_basis(mu)
    identity = torch.eye(basis.shape[1], dtype=dtype)
    assert torch.allclose(moved.transpose(-1, -2) @ moved, identity.expand(5, -1, -1), atol=32 * eps(dtype))
    assert ((mu.unsqueeze(-2) @ moved).abs() <= 32 * eps(dtype)).all()

    explicit = (moved @ (moved.transpose(-1, -2) @ g.unsqueeze(-1))).squeeze(-1)
    assert torch.allclose(projector(g, mu), explicit, atol=64 * eps(dtype))

    # Each transported column is Sphere.transp of the original column.
    columns = torch.stack([SPHERE.transp(point, mu, basis[:, j]) for j in range(basis.shape[1])], dim=-1)
    assert torch.allclose(columns, moved, atol=64 * eps(dtype))


def test_identity_transport_at_basis_point():
    generator = torch.Generator().manual_seed(0)
    point = SPHERE.random(40, dtype=torch.float64, generator=generator)
    basis = tangent_basis(point, 7, generator)
    projector = TangentSubspaceProjector(basis, point)
    assert torch.equal(projector.transported_basis(point), projector.basis)
    g = torch.randn(3, 40, generator=generator, dtype=torch.float64)
    expected = (g @ projector.basis) @ projector.basis.T
    assert torch.allclose(projector(g, point), expected, atol=1e-14)


def test_antipodal_base_point_reflects_deterministically():
    generator = torch.Generator().manual_seed(1)
    point = SPHERE.random(30, dtype=torch.float64, generator=generator)
    basis = tangent_basis(point, 5, generator)
    projector = TangentSubspaceProjector(basis, point)
    moved = projector.transported_basis(-point)
    direction = SPHERE.logmap(point, -point) / math.pi
    expected = basis - 2 * torch.outer(direction, direction @ projector.basis)
    assert torch.allclose(moved, expected, atol=1e-13)
    g = torch.randn(4, 30, generator=generator, dtype=torch.float64)
    assert torch.equal(projector(g, -point), projector(g, -point))
    assert torch.isfinite(projector(g, -point)).all()


def test_single_base_point_broadcasts():
    generator = torch.Generator().manual_seed(2)
    point = SPHERE.random(20, generator=generator)
    projector = TangentSubspaceProjector(tangent_basis(point, 4, generator), point)
    mu = SPHERE.random(20, generator=generator)
    g = torch.randn(6, 20, generator=generator)
    assert torch.allclose(projector(g, mu), projector(g, mu.expand(6, 20)), atol=1e-6)
    assert projector(g[0], mu).shape == (20,)


def test_without_basis_matches_project_tangent():
    generator = torch.Generator().manual_seed(3)
    mu = SPHERE.random(5, 12, dtype=torch.float64, generator=generator)
    g = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    projector = TangentSubspaceProjector()
    assert torch.allclose(projector(g, mu), project_tangent(g, mu), atol=1e-15)
    assert torch.allclose(project_tangent(g, mu), g - (g * mu).sum(-1, keepdim=True) * mu, atol=1e-15)
    # Base points are normalised by the projector.
    assert torch.allclose(projector(g, 3 * mu), project_tangent(g, mu), atol=1e-14)


def test_half_precision_gradient_keeps_dtype():
    generator = torch.Generator().manual_seed(4)
    point = SPHERE.random(16, generator=generator)
    projector = TangentSubspaceProjector(tangent_basis(point, 3, generator), point)
    g = torch.randn(4, 16, generator=generator).to(torch.bfloat16)
    mu = SPHERE.random(4, 16, generator=generator)
    projected = projector(g, mu)
    assert projected.dtype == torch.bfloat16
    reference = projector(g.float(), mu)
    assert torch.allclose(projected.float(), reference, atol=2e-2 * g.float().norm(dim=-1).max().item())


def test_hook_projects_gradient_and_records_ratio():
    generator = torch.Generator().manual_seed(5)
    point = SPHERE.random(10, generator=generator)
    projector = TangentSubspaceProjector(tangent_basis(point, 3, generator), point)
    mu = SPHERE.random(4, 10, generator=generator)
    weights = torch.randn(4, 10, generator=generator)
    embedding = torch.randn(4, 10, generator=generator, requires_grad=True)
    output = embedding * 1.0
    output.register_hook(projector.hook(mu))
    (output * weights).sum().backward()

    expected = projector(weights, mu)
    assert torch.allclose(embedding.grad, expected, atol=1e-6)
    ratio = (expected.norm(dim=-1) / weights.norm(dim=-1)).mean()
    assert projector.last_ratio is not None
    assert torch.allclose(projector.last_ratio, ratio, atol=1e-6)
    assert 0 < projector.last_ratio.item() < 1


def test_projection_ratio_skips_zero_rows():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    projected = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    assert projection_ratio(g, projected).item() == pytest.approx(0.6)
    assert math.isnan(projection_ratio(torch.zeros(2, 2), torch.zeros(2, 2)).item())


def test_invalid_basis_raises():
    generator = torch.Generator().manual_seed(6)
    point = SPHERE.random(8, dtype=torch.float64, generator=generator)
    basis = tangent_basis(point, 3, generator)
    with pytest.raises(ValueError, match="orthonormal"):
        TangentSubspaceProjector(2 * basis, point)
    not_tangent = torch.linalg.qr(torch.cat([point[:, None], basis[:, :2]], dim=1))[0]
    with pytest.raises(ValueError, match="tangent at basis_point"):
        TangentSubspaceProjector(not_tangent, point)
    with pytest.raises(ValueError, match="needs basis_point"):
        TangentSubspaceProjector(basis)
    with pytest.raises(ValueError, match="shape"):
        TangentSubspaceProjector(basis, point[:5])
    with pytest.raises(ValueError, match="k ≤ D - 1"):
        TangentSubspaceProjector(torch.eye(8, dtype=torch.float64), point)
    projector = TangentSubspaceProjector(basis, point)
    with pytest.raises(ValueError, match="does not broadcast"):
        projector(torch.randn(4, 8, dtype=torch.float64), SPHERE.random(3, 8, dtype=torch.float64))
