"""TangentPCA: subspace properties, agreement with scikit-learn, streaming and validation."""

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.decomposition import PCA

from manifolds import Sphere, TangentPCA

SPHERE = Sphere()


def tangent_data(dim: int, count: int, seed: int, decay: float = 0.8):
    """Return a base point (D,) and centred tangent vectors (N, D) with decaying spectrum."""
    generator = torch.Generator().manual_seed(seed)
    mu = SPHERE.random(dim, dtype=torch.float64, generator=generator)
    scales = decay ** torch.arange(dim, dtype=torch.float64)
    # The spectrum is axis-aligned before μ is projected out, and μ is random.
    raw = torch.randn(count, dim, generator=generator, dtype=torch.float64) * scales
    vectors = SPHERE.proju(mu, raw)
    # Centring keeps the vectors in the tangent space, which is a linear subspace.
    return mu, vectors - vectors.mean(dim=0)


@settings(max_examples=20, deadline=None)
@given(
    dim=st.one_of(st.integers(2, 16), st.integers(17, 160)),
    energy=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_pca_basis_properties(dim, energy, seed):
    mu, vectors = tangent_data(dim, 3 * dim + 5, seed)
    # A component along μ must be ignored.
    vectors = vectors + 5.0 * mu
    pca = TangentPCA(dim).update(vectors)
    result = pca.solve(energy, dim, base_point=mu)

    identity = torch.eye(result.k, dtype=torch.float64)
    assert torch.allclose(result.basis.T @ result.basis, identity, atol=1e-12)
    assert (result.basis.T @ mu).abs().max() <= 1e-12
    assert result.energy >= energy - 1e-9
    assert 1 <= result.k <= dim - 1
    assert result.count == vectors.shape[0]

    # The eigenvalues are those of the second moment restricted to μ⊥.
    projector = torch.eye(dim, dtype=torch.float64) - torch.outer(mu, mu)
    moment = projector @ (vectors.T @ vectors / vectors.shape[0]) @ projector
    expected = torch.linalg.eigvalsh(moment).flip(0)
    assert torch.allclose(result.eigenvalues, expected[: result.k], atol=1e-10)
    shares = expected.cumsum(0) / expected.sum()
    if result.k > 1:
        assert shares[result.k - 2] < energy  # one direction fewer would not reach the energy


@pytest.mark.parametrize("dim, seed", [(5, 0), (40, 1), (256, 2)])
def test_eigenvalues_match_sklearn(dim, seed):
    mu, vectors = tangent_data(dim, 4 * dim, seed)
    count = vectors.shape[0]
    result = TangentPCA(dim).update(vectors).solve(1.0, dim, base_point=mu)

    # The data are centred, so sklearn's centring is a no-op. sklearn divides by N − 1.
    reference = PCA(svd_solver="full").fit(vectors.numpy())
    variances = reference.explained_variance_[: result.k] * (count - 1) / count
    # Both solvers are accurate to about eps times the largest eigenvalue.
    scale = float(result.eigenvalues[0])
    np.testing.assert_allclose(result.eigenvalues.numpy(), variances, rtol=1e-9, atol=1e-13 * scale)
    ratio = reference.explained_variance_ratio_[: result.k]
    shares = (result.eigenvalues / result.eigenvalues.sum() * result.energy).numpy()
    np.testing.assert_allclose(shares, ratio, rtol=1e-9, atol=1e-13)
    # Principal directions agree up to sign.
    for column in range(min(result.k, 5)):
        alignment = abs(float(result.basis[:, column] @ torch.from_numpy(reference.components_[column])))
        assert alignment == pytest.approx(1.0, abs=1e-8)


def test_energy_one_stops_at_rank():
    generator = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(20, 4, generator=generator, dtype=torch.float64))[0]
    vectors = torch.randn(100, 4, generator=generator, dtype=torch.float64) @ basis.T
    result = TangentPCA(20).update(vectors).solve(1.0, 20)
    assert result.k == 4
    assert result.energy == pytest.approx(1.0)
    capped = TangentPCA(20).update(vectors).solve(1.0, 2)
    assert capped.k == 2
    assert capped.energy < 1.0


def test_streaming_and_merge_match_single_pass():
    _, vectors = tangent_data(30, 500, 4)
    whole = TangentPCA(30).update(vectors)
    streamed = TangentPCA(30)
    for batch in vectors.split(37):
        streamed.update(batch)
    left = TangentPCA(30).update(vectors[:123])
    right = TangentPCA(30).update(vectors[123:])
    merged = left.merge(right)
    for other in (streamed, merged):
        assert other.count == whole.count
        assert torch.allclose(other.second_moment_sum, whole.second_moment_sum, atol=1e-12)


def test_sampling_is_seeded_and_independent_of_batch_size():
    _, vectors = tangent_data(10, 1000, 5)
    one_batch = TangentPCA(10, max_samples=200, total=1000, seed=7).update(vectors)
    many_batches = TangentPCA(10, max_samples=200, total=1000, seed=7)
    for batch in vectors.split(64):
        many_batches.update(batch)
    other_seed = TangentPCA(10, max_samples=200, total=1000, seed=8).update(vectors)

    assert one_batch.count == 200
    assert many_batches.count == 200
    # Batching changes only the order of the floating-point additions.
    assert torch.allclose(one_batch.second_moment_sum, many_batches.second_moment_sum, rtol=1e-13, atol=1e-12)
    assert not torch.allclose(one_batch.second_moment_sum, other_seed.second_moment_sum, rtol=1e-3)
    with pytest.raises(ValueError, match="more than total=1000"):
        one_batch.update(vectors[:1])


def test_sampling_cap_above_total_keeps_all_rows():
    _, vectors = tangent_data(6, 50, 6)
    pca = TangentPCA(6, max_samples=500, total=50).update(vectors)
    assert pca.count == 50


def test_float32_accumulation_is_supported():
    _, vectors = tangent_data(8, 64, 7)
    pca = TangentPCA(8, dtype=torch.float32).update(vectors)
    assert pca.second_moment_sum.dtype == torch.float32
    result = pca.solve(0.9, 8)
    assert torch.allclose(result.basis.T @ result.basis, torch.eye(result.k), atol=1e-5)


@pytest.mark.parametrize(
    "energy, k_max, message",
    [
        (0.0, 3, "energy must be a fraction in \\(0, 1\\], got 0.0"),
        (1.5, 3, "got 1.5"),
        (float("nan"), 3, "got nan"),
        (0.5, 0, "k_max must be an int in \\[1, 8\\].*got 0"),
        (0.5, 9, "got 9"),
    ],
)
def test_solve_rejects_invalid_arguments(energy, k_max, message):
    pca = TangentPCA(8).update(torch.randn(10, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=message):
        pca.solve(energy, k_max)


def test_solve_on_empty_accumulator_raises():
    with pytest.raises(ValueError, match="count=0"):
        TangentPCA(4).solve(0.9, 2)


def test_zero_vectors_and_bad_shapes_raise():
    mu = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    along_mu = TangentPCA(3).update(torch.outer(torch.arange(1.0, 5.0, dtype=torch.float64), mu))
    with pytest.raises(ValueError, match="zero after removing the base point"):
        along_mu.solve(0.9, 2, base_point=mu)
    with pytest.raises(ValueError, match=r"shape \(N, 3\), got \(4, 2\)"):
        TangentPCA(3).update(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="needs total"):
        TangentPCA(3, max_samples=10)
    with pytest.raises(ValueError, match="nonzero"):
        TangentPCA(3).update(torch.eye(3)).solve(0.9, 2, base_point=torch.zeros(3))


def test_all_reduce_without_process_group_is_no_op():
    _, vectors = tangent_data(5, 20, 8)
    pca = TangentPCA(5).update(vectors)
    before = pca.second_moment_sum.clone()
    pca.all_reduce()
    assert pca.count == 20
    assert torch.equal(pca.second_moment_sum, before)


def _all_reduce_worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        generator = torch.Generator().manual_seed(rank)
        vectors = torch.randn(10 + rank, 4, generator=generator, dtype=torch.float64)
        pca = TangentPCA(4).update(vectors).all_reduce()
        if rank == 0:
            torch.save({"count": pca.count, "sum": pca.second_moment_sum}, result_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
def test_all_reduce_sums_over_two_ranks():
    # fork starts the two ranks in milliseconds, where spawn re-imports torch in each.
    with tempfile.TemporaryDirectory() as directory:
        init_file = os.path.join(directory, "init")
        result_file = os.path.join(directory, "result.pt")
        mp.start_processes(_all_reduce_worker, args=(2, init_file, result_file), nprocs=2, join=True, start_method="fork")
        reduced = torch.load(result_file)
    expected = TangentPCA(4)
    for rank in range(2):
        generator = torch.Generator().manual_seed(rank)
        expected.update(torch.randn(10 + rank, 4, generator=generator, dtype=torch.float64))
    assert reduced["count"] == 21
    assert torch.allclose(reduced["sum"], expected.second_moment_sum, atol=1e-12)
