"""Properties and accuracy targets of manifolds.Sphere."""

import math

import geoopt
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from manifolds import Sphere
from manifolds.sphere import antipodal_direction, reflection_axis

SPHERE = Sphere()
DTYPES = [torch.float32, torch.float64]
# Pair kinds: random angles, near-identical, near-antipodal, identical, exactly antipodal.
KINDS = ["random", "near", "antipodal", "same", "opposite"]

dims = st.one_of(st.integers(2, 16), st.integers(17, 1024))
seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from(DTYPES)
kinds = st.sampled_from(KINDS)


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def make_pairs(thetas: np.ndarray, dim: int, rng: np.random.Generator):
    """Build float64 unit vectors x, y with angle θ between them, shape (N, dim)."""
    x = rng.standard_normal((len(thetas), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    v = rng.standard_normal((len(thetas), dim))
    v -= np.sum(v * x, axis=1, keepdims=True) * x
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    y = np.cos(thetas)[:, None] * x + np.sin(thetas)[:, None] * v
    return x, y


def draw_thetas(kind: str, count: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "random":
        return rng.uniform(0.0, math.pi, count)
    if kind == "near":
        return np.exp(rng.uniform(math.log(1e-7), math.log(1e-2), count))
    if kind == "antipodal":
        return math.pi - np.exp(rng.uniform(math.log(1e-6), math.log(1e-2), count))
    return np.zeros(count)


def pair_batch(kind: str, dim: int, seed: int, dtype: torch.dtype, count: int = 8):
    """Return x, y of shape (count, dim) in ``dtype``, projected onto the sphere in that dtype."""
    rng = np.random.default_rng(seed)
    x, y = make_pairs(draw_thetas(kind, count, rng), dim, rng)
    x_t = SPHERE.projx(torch.from_numpy(x).to(dtype))
    if kind == "same":
        return x_t, x_t.clone()
    if kind == "opposite":
        return x_t, -x_t
    return x_t, SPHERE.projx(torch.from_numpy(y).to(dtype))


def reference_angle(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Angle between the directions of x and y in numpy long double (64-bit mantissa on x86-64)."""
    x_ld = x.double().numpy().astype(np.longdouble)
    y_ld = y.double().numpy().astype(np.longdouble)
    x_ld /= np.sqrt(np.sum(x_ld * x_ld, axis=-1, keepdims=True))
    y_ld /= np.sqrt(np.sum(y_ld * y_ld, axis=-1, keepdims=True))
    difference = np.sqrt(np.sum((x_ld - y_ld) ** 2, axis=-1))
    total = np.sqrt(np.sum((x_ld + y_ld) ** 2, axis=-1))
    return 2 * np.arctan2(difference, total)


# Properties over dimensions, seeds, dtypes and pair kinds.


@settings(max_examples=40, deadline=None)
@given(dim=dims, seed=seeds, dtype=dtypes)
def test_projx_idempotent(dim, seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randn(4, dim, generator=generator, dtype=dtype) * 10
    once = SPHERE.projx(raw)
    twice = SPHERE.projx(once)
    assert torch.allclose(twice, once, rtol=0, atol=4 * eps(dtype))
    norms = once.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), rtol=0, atol=4 * eps(dtype))


@settings(max_examples=40, deadline=None)
@given(dim=dims, seed=seeds, dtype=dtypes)
def test_proju_tangent_and_idempotent(dim, seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    x = SPHERE.random(4, dim, dtype=dtype, generator=generator)
    vectors = torch.randn(4, dim, generator=generator, dtype=dtype)
    tangent = SPHERE.proju(x, vectors)
    scale = vectors.norm(dim=-1)
    assert ((tangent * x).sum(-1).abs() <= 8 * eps(dtype) * scale).all()
    again = SPHERE.proju(x, tangent)
    assert ((again - tangent).norm(dim=-1) <= 8 * eps(dtype) * scale).all()


@settings(max_examples=60, deadline=None)
@given(dim=dims, seed=seeds, dtype=dtypes, kind=kinds)
def test_logmap_norm_equals_dist(dim, seed, dtype, kind):
    x, y = pair_batch(kind, dim, seed, dtype)
    log = SPHERE.logmap(x, y)
    distance = SPHERE.dist(x, y)
    assert torch.isfinite(log).all()
    assert torch.allclose(log.norm(dim=-1), distance, rtol=16 * eps(dtype), atol=16 * eps(dtype))


@settings(max_examples=60, deadline=None)
@given(dim=dims, seed=seeds, dtype=dtypes, kind=kinds)
def test_logmap_tangent(dim, seed, dtype, kind):
    x, y = pair_batch(kind, dim, seed, dtype)
    log = SPHERE.logmap(x, y)
    inner = (log * x).sum(-1).abs()
    assert (inner <= 16 * eps(dtype) * math.pi).all()


@settings(max_examples=60, deadline=None)
@given(dim=dims, seed=seeds, dtype=dtypes, kind=st.sampled_from(["random", "near", "antipodal", "same"]))
def test_exp_log_round_trip(dim, seed, dtype, kind):
    x, y = pair_batch(kind, dim, seed, dtype)
    recovered = SPHERE.expmap(x, SPHERE.logmap(x, y))
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert ((recovered - y).norm(dim=-1) <= tolerance).all()


@settings(max_examples=40, deadline=None)
@given(dim=dims, seed=seeds, dtype=dtypes, kind=kinds)
def test_dist_symmetric(dim, seed, dtype, kind):
    x, y = pair_batch(kind, dim, seed, dtype)
    assert torch.equal(SPHERE.dist(x, y), SPHERE.dist(y, x))


@settings(max_examples=40, deadline=None)
@given(dim=dims, seed=seeds, dtype=dtypes, kind=kinds)
def test_dist_triangle_inequality(dim, seed, dtype, kind):
    x, y = pair_batch(kind, dim, seed, dtype)
    generator = torch.Generator().manual_seed(seed)
    # z near the geodesic between x and y makes the inequality nearly tight.
    z_near_geodesic = SPHERE.expmap(x, 0.3 * SPHERE.logmap(x, y))
    z_random = SPHERE.random(x.shape[0], dim, dtype=dtype, generator=generator)
    slack = 16 * eps(dtype) * math.pi
    for z in (z_near_geodesic, z_random):
        assert (SPHERE.dist(x, y) <= SPHERE.dist(x, z) + SPHERE.dist(z, y) + slack).all()


@settings(max_examples=30, deadline=None)
@given(dim=dims, seed=seeds, dtype=dtypes, kind=kinds)
def test_batched_equals_looped(dim, seed, dtype, kind):
    x, y = pair_batch(kind, dim, seed, dtype, count=5)
    v = SPHERE.proju(x, torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype))
    batched = {
        "dist": SPHERE.dist(x, y),
        "logmap": SPHERE.logmap(x, y),
        "expmap": SPHERE.expmap(x, v),
        "transp": SPHERE.transp(x, y, v),
    }
    for row in range(x.shape[0]):
        looped = {
            "dist": SPHERE.dist(x[row], y[row]),
            "logmap": SPHERE.logmap(x[row], y[row]),
            "expmap": SPHERE.expmap(x[row], v[row]),
            "transp": SPHERE.transp(x[row], y[row], v[row]),
        }
        for name, value in looped.items():
            assert torch.allclose(batched[name][row], value, rtol=8 * eps(dtype), atol=8 * eps(dtype)), name


def test_broadcasting_over_leading_dimensions():
    generator = torch.Generator().manual_seed(0)
    x = SPHERE.random(3, 1, 6, dtype=torch.float64, generator=generator)
    y = SPHERE.random(4, 6, dtype=torch.float64, generator=generator)
    assert SPHERE.dist(x, y).shape == (3, 4)
    assert SPHERE.logmap(x, y).shape == (3, 4, 6)
    expected = SPHERE.dist(x[2, 0], y[1])
    assert torch.equal(SPHERE.dist(x, y)[2, 1], expected)


@settings(max_examples=40, deadline=None)
@given(dim=dims, seed=seeds, dtype=dtypes, kind=kinds)
def test_gradients_finite(dim, seed, dtype, kind):
    x, y = pair_batch(kind, dim, seed, dtype, count=4)
    for function in (SPHERE.dist, SPHERE.logmap):
        x_leaf = x.clone().requires_grad_()
        y_leaf = y.clone().requires_grad_()
        function(x_leaf, y_leaf).sum().backward()
        assert torch.isfinite(x_leaf.grad).all(), function.__name__
        assert torch.isfinite(y_leaf.grad).all(), function.__name__
    u = torch.zeros_like(x).requires_grad_()
    SPHERE.expmap(x, u).sum().backward()
    assert torch.isfinite(u.grad).all()


@settings(max_examples=30, deadline=None)
@given(dim=dims, seed=seeds, dtype=dtypes, kind=st.sampled_from(["random", "near", "antipodal"]))
def test_transp_isometry_onto_tangent_space(dim, seed, dtype, kind):
    x, y = pair_batch(kind, dim, seed, dtype, count=4)
    generator = torch.Generator().manual_seed(seed)
    u = SPHERE.proju(x, torch.randn(x.shape, generator=generator, dtype=dtype))
    v = SPHERE.proju(x, torch.randn(x.shape, generator=generator, dtype=dtype))
    moved_u = SPHERE.transp(x, y, u)
    moved_v = SPHERE.transp(x, y, v)
    scale = u.norm(dim=-1) * v.norm(dim=-1)
    assert (((moved_u * y).sum(-1)).abs() <= 32 * eps(dtype) * u.norm(dim=-1)).all()
    inner_error = ((moved_u * moved_v).sum(-1) - (u * v).sum(-1)).abs()
    assert (inner_error <= 64 * eps(dtype) * scale).all()
    # Parallel transport along the geodesic maps the initial direction to the final one.
    direction = SPHERE.logmap(x, y)
    moved_direction = SPHERE.transp(x, y, direction)
    expected = -SPHERE.logmap(y, x)
    assert torch.allclose(moved_direction, expected, rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-9)


# Hand-computed cases.


@pytest.mark.parametrize("dtype", DTYPES)
def test_dist_orthogonal_basis_vectors(dtype):
    e1 = torch.tensor([1.0, 0.0, 0.0], dtype=dtype)
    e2 = torch.tensor([0.0, 1.0, 0.0], dtype=dtype)
    assert SPHERE.dist(e1, e2).item() == torch.tensor(math.pi / 2, dtype=dtype).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("angle", [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.1])
def test_dist_tiny_angle_in_plane(dtype, angle):
    x = torch.tensor([1.0, 0.0], dtype=dtype)
    y = torch.tensor([math.cos(angle), math.sin(angle)], dtype=dtype)
    reference = float(reference_angle(x, y))
    assert abs(reference - angle) / angle < 1e-6  # the rounded inputs still have angle ≈ t
    assert abs(SPHERE.dist(x, y).item() - reference) / reference < 4 * eps(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_identical_points_exact_zero(dtype):
    x = SPHERE.random(16, 33, dtype=dtype, generator=torch.Generator().manual_seed(1))
    assert (SPHERE.dist(x, x) == 0).all()
    assert (SPHERE.logmap(x, x) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_half_inputs_return_input_dtype(dtype):
    x, y = pair_batch("random", 24, 3, torch.float64)
    x, y = x.to(dtype), y.to(dtype)
    assert SPHERE.dist(x, y).dtype == dtype
    assert SPHERE.logmap(x, y).dtype == dtype
    assert SPHERE.expmap(x, SPHERE.logmap(x, y)).dtype == dtype
    reference = torch.from_numpy(reference_angle(x, y).astype(np.float64))
    # float16 and bfloat16 results are rounded once, to 2^-11 and 2^-8 relative.
    tolerance = 2 * eps(dtype)
    assert torch.allclose(SPHERE.dist(x, y).double(), reference, rtol=tolerance, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [2, 3, 100])
def test_antipodal_logmap_deterministic_length_pi(dtype, dim):
    x = SPHERE.random(32, dim, dtype=dtype, generator=torch.Generator().manual_seed(dim))
    # Include points where the fallback coordinate e₁ is used.
    x[0] = torch.nn.functional.one_hot(torch.tensor(0), dim).to(dtype)
    log = SPHERE.logmap(x, -x)
    assert torch.isfinite(log).all()
    assert torch.allclose(log.norm(dim=-1), torch.full((32,), math.pi, dtype=dtype), rtol=4 * eps(dtype), atol=0)
    assert ((log * x).sum(-1).abs() <= 8 * eps(dtype)).all()
    assert torch.equal(log, SPHERE.logmap(x, -x))
    assert torch.allclose(log, math.pi * antipodal_direction(x), rtol=0, atol=8 * eps(dtype))
    # x = e₀ uses the fallback direction e₁.
    assert log[0, 0] == 0
    assert log[0, 1] > 0
    assert torch.allclose(SPHERE.expmap(x, log), -x, rtol=0, atol=16 * eps(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_finite_at_zero_and_pi(dtype):
    x = SPHERE.random(6, 10, dtype=dtype, generator=torch.Generator().manual_seed(2))
    y = torch.cat([x[:3], -x[3:]])
    for function in (SPHERE.dist, SPHERE.logmap):
        x_leaf = x.clone().requires_grad_()
        y_leaf = y.clone().requires_grad_()
        function(x_leaf, y_leaf).square().sum().backward()
        assert torch.isfinite(x_leaf.grad).all()
        assert torch.isfinite(y_leaf.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_dist_gradient_matches_logmap(dtype):
    # The Riemannian gradient of dist(x, ·) at y is -logmap(y, x) / dist(x, y).
    x, y = pair_batch("random", 20, 4, dtype, count=6)
    x_small, y_small = pair_batch("near", 20, 5, dtype, count=6)
    x, y = torch.cat([x, x_small]), torch.cat([y, y_small])
    y_leaf = y.clone().requires_grad_()
    SPHERE.dist(x, y_leaf).sum().backward()
    riemannian = SPHERE.proju(y, y_leaf.grad)
    expected = -SPHERE.logmap(y, x) / SPHERE.dist(x, y).unsqueeze(-1)
    assert torch.allclose(riemannian, expected, rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-9)


def test_logmap_jacobian_at_zero_angle():
    x = SPHERE.random(5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    jacobian = torch.autograd.functional.jacobian(lambda y: SPHERE.logmap(x, y), x.clone())
    expected = torch.eye(5, dtype=torch.float64) - torch.outer(x, x)
    assert torch.allclose(jacobian, expected, atol=1e-12)


# Accuracy targets against the long-double reference.


def accuracy_pairs(low: float, high: float, dtype: torch.dtype, near_pi: bool):
    rng = np.random.default_rng(11)
    for dim in (2, 3, 64, 1024):
        logs = rng.uniform(math.log(low), math.log(high), 200)
        thetas = math.pi - np.exp(logs) if near_pi else np.exp(logs)
        x, y = make_pairs(thetas, dim, rng)
        yield SPHERE.projx(torch.from_numpy(x).to(dtype)), SPHERE.projx(torch.from_numpy(y).to(dtype))


@pytest.mark.parametrize(
    "dtype, low, high, near_pi, tolerance",
    [
        (torch.float32, 1e-4, 1.0, False, 1e-5),
        (torch.float32, 1.0, math.pi - 1e-3, False, 1e-5),
        (torch.float32, 1e-3, 1.0, True, 1e-5),
        (torch.float64, 1e-7, 1.0, False, 1e-10),
        (torch.float64, 1.0, math.pi - 1e-6, False, 1e-10),
        (torch.float64, 1e-6, 1.0, True, 1e-10),
    ],
)
def test_dist_relative_error_target(dtype, low, high, near_pi, tolerance):
    for x, y in accuracy_pairs(low, high, dtype, near_pi):
        reference = reference_angle(x, y)
        distance = SPHERE.dist(x, y).double().numpy().astype(np.longdouble)
        relative = np.abs(distance - reference) / reference
        assert relative.max() <= tolerance, float(relative.max())


def test_round_trip_target_float32():
    for x, y in accuracy_pairs(1e-3, 1.0, torch.float32, near_pi=True):
        recovered = SPHERE.expmap(x, SPHERE.logmap(x, y))
        assert (recovered - y).norm(dim=-1).max() <= 1e-5


def test_geoopt_sphere_clamps_distance():
    # Guards the premise of this module: geoopt 0.5.1 clamps the cosine.
    x = SPHERE.random(4, 8, generator=torch.Generator().manual_seed(5))
    assert (geoopt.Sphere().dist(x, x) > 1e-2).all()
    assert (SPHERE.dist(x, x) == 0).all()


# geoopt integration.


def test_manifold_parameter_with_riemannian_sgd():
    target = SPHERE.random(12, generator=torch.Generator().manual_seed(6))
    point = geoopt.ManifoldParameter(SPHERE.random(12, generator=torch.Generator().manual_seed(7)), manifold=SPHERE)
    optimizer = geoopt.optim.RiemannianSGD([point], lr=0.2)
    for _ in range(200):
        optimizer.zero_grad()
        SPHERE.dist(point, target).square().backward()
        optimizer.step()
    assert SPHERE.dist(point.detach(), target).item() < 1e-3
    assert abs(point.detach().norm().item() - 1) < 1e-6


def test_manifold_tensor_methods_and_checks():
    point = SPHERE.random(3, 5, generator=torch.Generator().manual_seed(8))
    assert isinstance(point, geoopt.ManifoldTensor)
    SPHERE.assert_check_point_on_manifold(point)
    tangent = point.proju(torch.randn(3, 5))
    SPHERE.assert_check_vector_on_tangent(point, tangent)
    moved = point.retr(tangent)
    SPHERE.assert_check_point_on_manifold(moved)
    with pytest.raises(ValueError, match="norm"):
        SPHERE.assert_check_point_on_manifold(2 * point)
    with pytest.raises(ValueError, match="at least 2 coordinates"):
        SPHERE.random(4, 1)


def test_reflection_axis_special_cases():
    x = SPHERE.random(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    assert torch.equal(reflection_axis(x, x), torch.zeros_like(x))
    assert torch.allclose(reflection_axis(x, -x), antipodal_direction(x), atol=1e-15)
    y = SPHERE.random(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    axis = reflection_axis(x, y)
    reflected = x - 2 * (axis * x).sum(-1, keepdim=True) * axis
    assert torch.allclose(reflected, -y, atol=1e-14)
