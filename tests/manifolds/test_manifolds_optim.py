"""ProjectedOptimizer and its projections, on plain and geoopt manifold parameters."""

import geoopt
import pytest
import torch

from manifolds import BasisProjection, MatrixProjection, ProjectedOptimizer, Sphere

SPHERE = Sphere()


def orthonormal(rows: int, columns: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, columns, generator=generator))[0]


def lora_pair(seed: int = 0):
    """Return LoRA-shaped parameters A (r, d_in) and B (d_out, r)."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.nn.Parameter(torch.randn(4, 16, generator=generator))
    b = torch.nn.Parameter(torch.randn(12, 4, generator=generator))
    return a, b


def lora_loss(a: torch.Tensor, b: torch.Tensor, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + step)
    inputs = torch.randn(8, 16, generator=generator)
    targets = torch.randn(8, 12, generator=generator)
    return ((inputs @ a.T @ b.T - targets) ** 2).mean()


def train(optimizer, a, b, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        optimizer.zero_grad()
        lora_loss(a, b, step).backward()
        optimizer.step()


@pytest.mark.parametrize("inner", ["adam", "sgd", "riemannian_adam"])
def test_step_mode_leaves_orthogonal_components_unchanged(inner):
    a, b = lora_pair()
    basis_a = orthonormal(16, 5, 1)  # A's update stays in span(basis_a) on the right.
    basis_b = orthonormal(12, 3, 2)  # B's update avoids span(basis_b) on the left.
    optimizers = {
        "adam": lambda: torch.optim.Adam([a, b], lr=1e-2),
        "sgd": lambda: torch.optim.SGD([a, b], lr=1e-2, momentum=0.9),
        "riemannian_adam": lambda: geoopt.optim.RiemannianAdam([a, b], lr=1e-2),
    }
    optimizer = ProjectedOptimizer(optimizers[inner]())
    optimizer.register(a, BasisProjection(basis_a, side="right"), mode="step")
    null_space = torch.eye(12) - basis_b @ basis_b.T
    optimizer.register(b, MatrixProjection(null_space, side="left"), mode="step")
    a_start, b_start = a.detach().clone(), b.detach().clone()

    train(optimizer, a, b, 100)

    outside_a = (a.detach() - a_start) @ (torch.eye(16) - basis_a @ basis_a.T)
    inside_b = basis_b.T @ (b.detach() - b_start)
    assert outside_a.abs().max() < 1e-5
    assert inside_b.abs().max() < 1e-5
    # The parameters did move within the allowed directions.
    assert (a.detach() - a_start).abs().max() > 1e-2
    assert (b.detach() - b_start).abs().max() > 1e-2


def test_grad_mode_with_sgd_equals_manual_projection():
    a, b = lora_pair()
    a_manual, b_manual = lora_pair()
    basis = orthonormal(16, 6, 3)
    optimizer = ProjectedOptimizer(torch.optim.SGD([a, b], lr=0.05))
    optimizer.register(a, BasisProjection(basis, side="right"), mode="grad")
    manual = torch.optim.SGD([a_manual, b_manual], lr=0.05)
    for step in range(20):
        optimizer.zero_grad()
        lora_loss(a, b, step).backward()
        optimizer.step()
        manual.zero_grad()
        lora_loss(a_manual, b_manual, step).backward()
        a_manual.grad = a_manual.grad @ basis @ basis.T
        manual.step()
    assert torch.allclose(a, a_manual, atol=1e-6)
    assert torch.allclose(b, b_manual, atol=1e-6)


def test_callable_projector_and_left_basis():
    a, b = lora_pair()
    basis_b = orthonormal(12, 2, 4)
    optimizer = ProjectedOptimizer(torch.optim.Adam([a, b], lr=1e-2))
    optimizer.register(a, lambda step: torch.zeros_like(step), mode="step")
    optimizer.register(b, BasisProjection(basis_b, side="left"), mode="step")
    a_start, b_start = a.detach().clone(), b.detach().clone()
    train(optimizer, a, b, 20)
    assert torch.equal(a.detach(), a_start)
    outside_b = (torch.eye(12) - basis_b @ basis_b.T) @ (b.detach() - b_start)
    assert outside_b.abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["grad", "step"])
@pytest.mark.parametrize("inner", ["riemannian_adam", "riemannian_sgd"])
def test_manifold_parameter_stays_on_sphere(mode, inner):
    generator = torch.Generator().manual_seed(5)
    point = geoopt.ManifoldParameter(SPHERE.random(3, 10, generator=generator), manifold=SPHERE)
    target = SPHERE.random(10, generator=generator)
    inner_optimizer = (
        geoopt.optim.RiemannianAdam([point], lr=1e-2)
        if inner == "riemannian_adam"
        else geoopt.optim.RiemannianSGD([point], lr=1e-2, momentum=0.9)
    )
    optimizer = ProjectedOptimizer(inner_optimizer)
    optimizer.register(point, BasisProjection(orthonormal(10, 4, 6), side="right"), mode=mode)
    start = point.detach().clone()
    for _ in range(1000):
        optimizer.zero_grad()
        (-(point @ target).sum()).backward()
        optimizer.step()
    norms = point.detach().norm(dim=-1)
    assert torch.allclose(norms, torch.ones(3), atol=1e-6)
    assert SPHERE.dist(point.detach(), start).min() > 1e-2


def test_manifold_step_mode_moves_within_subspace():
    # With a projector onto span{e0, e1} and a start in that plane, the point stays in the plane.
    start = SPHERE.projx(torch.tensor([1.0, 1.0, 0.0, 0.0]))
    point = geoopt.ManifoldParameter(start.clone(), manifold=SPHERE)
    target = SPHERE.projx(torch.tensor([0.0, 1.0, 1.0, 1.0]))
    optimizer = ProjectedOptimizer(geoopt.optim.RiemannianAdam([point], lr=1e-2))
    plane = torch.eye(4)[:, :2]
    optimizer.register(point, BasisProjection(plane, side="right"), mode="step")
    for _ in range(200):
        optimizer.zero_grad()
        (-(point @ target)).backward()
        optimizer.step()
    assert point.detach()[2:].abs().max() < 1e-6
    assert point.detach()[1] > start[1]


def test_register_replace_unregister_clear():
    a, b = lora_pair()
    optimizer = ProjectedOptimizer(torch.optim.SGD([a, b], lr=0.1))
    first = BasisProjection(orthonormal(16, 2, 7), side="right")
    second = BasisProjection(orthonormal(16, 3, 8), side="right")
    optimizer.register(a, first)
    optimizer.register(a, second, mode="step")
    assert optimizer.registered(a) == (second, "step")
    optimizer.unregister(a)
    assert optimizer.registered(a) is None
    with pytest.raises(ValueError, match="no registered projector"):
        optimizer.unregister(a)
    optimizer.register(a, first)
    optimizer.register(b, MatrixProjection(torch.eye(12), side="left"))
    optimizer.clear()
    assert optimizer.registered(a) is None
    assert optimizer.registered(b) is None


def test_register_rejects_invalid_input():
    a, b = lora_pair()
    stranger = torch.nn.Parameter(torch.zeros(3))
    optimizer = ProjectedOptimizer(torch.optim.SGD([a], lr=0.1))
    projection = BasisProjection(orthonormal(16, 2, 9), side="right")
    with pytest.raises(ValueError, match=r"shape \(3,\) is not in the wrapped optimizer"):
        optimizer.register(stranger, projection)
    with pytest.raises(ValueError, match="mode must be"):
        optimizer.register(a, projection, mode="update")
    with pytest.raises(TypeError, match="MatrixProjection"):
        optimizer.register(a, torch.eye(16))
    with pytest.raises(ValueError, match=r"does not fit a parameter of shape \(4, 16\)"):
        optimizer.register(a, BasisProjection(orthonormal(16, 2, 9), side="left"))
    with pytest.raises(ValueError, match="orthonormal"):
        BasisProjection(2 * orthonormal(16, 2, 9))
    with pytest.raises(ValueError, match="side must be"):
        MatrixProjection(torch.eye(3), side="top")
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        ProjectedOptimizer([a])


@pytest.mark.parametrize("mode", ["grad", "step"])
def test_non_finite_projection_raises(mode):
    a, b = lora_pair()
    optimizer = ProjectedOptimizer(torch.optim.SGD([a, b], lr=0.1))

    def broken(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[0, :3] = float("nan")
        return out

    optimizer.register(b, broken, mode=mode)
    b_start = b.detach().clone()
    lora_loss(a, b, 0).backward()
    kind = "gradient" if mode == "grad" else "step"
    with pytest.raises(FloatingPointError, match=rf"projected {kind} of parameter #1 \(shape \(12, 4\)\) has 3 non-finite"):
        optimizer.step()
    assert torch.equal(b.detach(), b_start)


def test_state_dict_round_trip_resumes_identically():
    basis_a = orthonormal(16, 5, 10)
    null_b = torch.eye(12) - orthonormal(12, 3, 11) @ orthonormal(12, 3, 11).T

    def build(a, b):
        optimizer = ProjectedOptimizer(torch.optim.Adam([a, b], lr=1e-2))
        optimizer.register(a, BasisProjection(basis_a, side="right"), mode="step")
        optimizer.register(b, MatrixProjection(null_b, side="left"), mode="grad")
        return optimizer

    a, b = lora_pair()
    reference = build(a, b)
    train(reference, a, b, 30)

    a_first, b_first = lora_pair()
    first = build(a_first, b_first)
    train(first, a_first, b_first, 15)
    saved = first.state_dict()
    assert set(saved["projectors"]) == {0, 1}
    assert saved["projectors"][0]["mode"] == "step"
    assert saved["projectors"][1]["kind"] == "matrix"

    a_resumed = torch.nn.Parameter(a_first.detach().clone())
    b_resumed = torch.nn.Parameter(b_first.detach().clone())
    resumed = ProjectedOptimizer(torch.optim.Adam([a_resumed, b_resumed], lr=1e-2))
    resumed.load_state_dict(saved)
    assert resumed.registered(a_resumed)[1] == "step"
    assert torch.equal(resumed.registered(b_resumed)[0].tensor, null_b)
    train(resumed, a_resumed, b_resumed, 15, start=15)
    assert torch.allclose(a_resumed, a, atol=1e-6)
    assert torch.allclose(b_resumed, b, atol=1e-6)


def test_load_state_dict_needs_callables_registered():
    a, b = lora_pair()
    optimizer = ProjectedOptimizer(torch.optim.SGD([a, b], lr=0.1))

    def halve(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x

    optimizer.register(a, halve)
    saved = optimizer.state_dict()
    fresh = ProjectedOptimizer(torch.optim.SGD([a, b], lr=0.1))
    with pytest.raises(ValueError, match="register it again"):
        fresh.load_state_dict(saved)
    fresh.register(a, halve)
    fresh.load_state_dict(saved)
    assert fresh.registered(a) == (halve, "grad")


def test_pass_through_and_lr_scheduler():
    a, b = lora_pair()
    inner = torch.optim.SGD([a], lr=0.1)
    optimizer = ProjectedOptimizer(inner)
    assert optimizer.param_groups is inner.param_groups
    assert optimizer.state is inner.state
    optimizer.add_param_group({"params": [b], "lr": 0.01})
    assert len(inner.param_groups) == 2
    optimizer.register(b, MatrixProjection(torch.eye(12), side="left"))

    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    lora_loss(a, b, 0).backward()
    optimizer.step()
    scheduler.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.05)
    optimizer.zero_grad()
    assert a.grad is None
    assert b.grad is None

    calls = []
    optimizer.register_step_post_hook(lambda *args: calls.append(1))
    lora_loss(a, b, 1).backward()
    optimizer.step()
    assert calls == [1]


def test_closure_is_evaluated_before_projection():
    a, b = lora_pair()
    optimizer = ProjectedOptimizer(torch.optim.SGD([a, b], lr=0.1))
    optimizer.register(a, lambda g: torch.zeros_like(g), mode="grad")
    a_start = a.detach().clone()

    def closure():
        optimizer.zero_grad()
        loss = lora_loss(a, b, 0)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss is not None
    assert torch.equal(a.detach(), a_start)


def test_grad_scaler_through_wrapper():
    a, b = lora_pair()
    optimizer = ProjectedOptimizer(torch.optim.SGD([a, b], lr=0.1))
    optimizer.register(a, lambda step: torch.zeros_like(step), mode="step")
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    a_start, b_start = a.detach().clone(), b.detach().clone()

    scaler.scale(lora_loss(a, b, 0)).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(a.detach(), a_start)
    assert not torch.equal(b.detach(), b_start)

    # An inf gradient makes the scaler skip the step and halve its scale.
    b_after = b.detach().clone()
    optimizer.zero_grad()
    scaler.scale(lora_loss(a, b, 1)).backward()
    b.grad[0, 0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(b.detach(), b_after)
    assert scaler.get_scale() == 8.0
