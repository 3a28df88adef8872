"""spherical_kmeans: cluster recovery, determinism, empty clusters and validation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import adjusted_rand_score

from manifolds import Sphere, spherical_kmeans
from manifolds.kmeans import _reseed_empty

SPHERE = Sphere()


def separated_clusters(k: int, dim: int, per_cluster: int, seed: int, spread: float = 0.05):
    """Return unit points (k·per_cluster, dim) around k orthonormal centres, and their labels."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(dim, k, generator=generator, dtype=torch.float64))[0].T
    labels = torch.arange(k).repeat_interleave(per_cluster)
    noise = torch.randn(k * per_cluster, dim, generator=generator, dtype=torch.float64) * spread / dim**0.5
    points = SPHERE.projx(centres[labels] + noise)
    permutation = torch.randperm(points.shape[0], generator=generator)
    return points[permutation].float(), labels[permutation]


@settings(max_examples=15, deadline=None)
@given(
    k=st.integers(2, 8),
    dim=st.one_of(st.integers(8, 32), st.integers(33, 1024)),
    seed=st.integers(0, 2**31 - 1),
)
def test_recovers_separated_clusters(k, dim, seed):
    points, labels = separated_clusters(k, dim, 20, seed)
    result = spherical_kmeans(points, k, seed=seed)
    assert adjusted_rand_score(labels.numpy(), result.assignments.numpy()) == 1.0
    assert result.anchors.shape == (k, dim)
    norms = result.anchors.norm(dim=1)
    assert torch.allclose(norms, torch.ones(k), atol=1e-6)
    assert result.assignments.dtype == torch.int64
    assert result.converged


def test_inertia_is_sum_of_squared_geodesic_distances():
    points, _ = separated_clusters(3, 10, 15, 1, spread=0.3)
    result = spherical_kmeans(points, 3, seed=0)
    distances = SPHERE.dist(points, result.anchors[result.assignments])
    assert result.inertia == pytest.approx(float((distances**2).sum()), rel=1e-6)
    # Assignments are nearest anchors.
    all_distances = SPHERE.dist(points[:, None, :], result.anchors[None, :, :])
    assert torch.equal(all_distances.argmin(dim=1), result.assignments)


def test_same_seed_same_result_and_seed_matters():
    points, _ = separated_clusters(4, 16, 30, 2, spread=1.5)
    first = spherical_kmeans(points, 6, seed=3)
    second = spherical_kmeans(points, 6, seed=3)
    assert torch.equal(first.anchors, second.anchors)
    assert torch.equal(first.assignments, second.assignments)
    results = [spherical_kmeans(points, 6, seed=seed).anchors for seed in range(4, 8)]
    assert any(not torch.equal(results[0], other) for other in results[1:])


def test_duplicate_points_give_finite_anchors():
    # Only two distinct points for three clusters, so seeding repeats a point and a cluster empties.
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([0.0, 1.0, 0.0])
    points = torch.stack([a, a, a, b])
    for seed in range(5):
        result = spherical_kmeans(points, 3, seed=seed)
        assert torch.isfinite(result.anchors).all()
        assert torch.allclose(result.anchors.norm(dim=1), torch.ones(3))
        assert result.assignments.max() < 3
        assert result.inertia == pytest.approx(0.0, abs=1e-10)


def test_reseed_moves_farthest_point_into_empty_cluster():
    points = SPHERE.projx(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]))
    anchors = SPHERE.projx(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assignments = torch.tensor([0, 0, 0])
    counts = torch.tensor([3, 0])
    sums = torch.stack([points.sum(0), torch.zeros(2)])
    _reseed_empty(points, anchors, assignments, sums, counts, torch.tensor([False, True]))
    assert assignments.tolist() == [0, 0, 1]
    assert torch.equal(sums[1], points[2])
    assert torch.allclose(sums[0], points[0] + points[1])
    assert counts.tolist() == [2, 1]


def test_half_precision_input():
    points, labels = separated_clusters(3, 24, 10, 4)
    result = spherical_kmeans(points.to(torch.bfloat16), 3, seed=0)
    assert result.anchors.dtype == torch.float32
    assert adjusted_rand_score(labels.numpy(), result.assignments.numpy()) == 1.0


@pytest.mark.parametrize(
    "points, k, kwargs, message",
    [
        (SPHERE.projx(torch.randn(5, 3)), 6, {}, r"k must be an int in \[1, N=5\], got 6"),
        (SPHERE.projx(torch.randn(5, 3)), 0, {}, "got 0"),
        (torch.randn(5, 3) * 3, 2, {}, "unit vectors.*projx"),
        (torch.randn(5), 2, {}, r"shape \(N, D\)"),
        (SPHERE.projx(torch.randn(5, 3)), 2, {"max_iter": 0}, "max_iter"),
        (SPHERE.projx(torch.randn(5, 3)), 2, {"tol": -1.0}, "tol"),
        (torch.full((5, 3), float("nan")), 2, {}, "NaN"),
    ],
)
def test_rejects_invalid_arguments(points, k, kwargs, message):
    with pytest.raises(ValueError, match=message):
        spherical_kmeans(points, k, seed=0, **kwargs)
