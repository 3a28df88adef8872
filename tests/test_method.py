"""The hyperspherical DRS and linear DRS learners on the micro ViT and the digits data."""

import math

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import build_digits_learner, digits_batch

from spherical_cl.backbones import build_backbone
from spherical_cl.config import load_config
from spherical_cl.data import IncrementalData, build_class_split, load_source
from spherical_cl.errors import ConfigError
from spherical_cl.methods import HypersphericalDRS, LinearDRS, StepInfo, TaskContext, build_learner
from spherical_cl.prototypes import BasePoints, estimate_base_points


def _setup(method: str, *overrides: str):
    return build_digits_learner(f"method={method}", "projection.k_max=16", *overrides)


def _batch(data: IncrementalData, task: int, size: int = 24):
    return digits_batch(data, task, size)


def _train_task(learner, data, context, task: int, steps: int = 3, phase: str = "main") -> None:
    optimizer = learner.start_task(context(task))
    learner.train()
    for _ in range(steps):
        images, labels = _batch(data, task)
        output = learner.training_loss(images, labels, StepInfo(task, 0, 2, phase))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        learner.after_step(images, labels, StepInfo(task, 0, 2, phase))
    learner.end_task(context(task))


@pytest.mark.parametrize("phase", ["warmup", "main"])
def test_adapter_receives_exactly_the_projected_gradient(phase):
    config, learner, data, context = _setup("drs_sphere")
    _train_task(learner, data, context, 0)
    learner.start_task(context(1))
    learner.train()
    images, labels = _batch(data, 1)
    step = StepInfo(1, 0, 2, phase)
    parameters = learner.adapters.parameters(learner.adapters.active)

    captured = {}
    embed = learner.embed

    def capturing_embed(batch):
        captured["z"] = embed(batch)
        return captured["z"]

    learner.embed = capturing_embed
    output = learner.training_loss(images, labels, step)
    output.loss.backward()
    projected_grads = [p.grad.clone() for p in parameters]

    config.projection.enabled = False
    reference = learner.training_loss(images, labels, step)
    z = captured["z"]
    g = torch.autograd.grad(reference.loss, z, retain_graph=True)[0]
    mu = learner.base_points.points[learner.base_points.assign(z, labels)]
    projector = learner.subspace_projector if phase == "main" else learner.tangent_projector
    expected = torch.autograd.grad(z, parameters, grad_outputs=projector.project(g, mu), retain_graph=True)
    unprojected = torch.autograd.grad(z, parameters, grad_outputs=g)

    for actual, expected_grad in zip(projected_grads, expected):
        torch.testing.assert_close(actual, expected_grad, atol=1e-6, rtol=1e-5)
    difference = sum((a - r).abs().sum() for a, r in zip(projected_grads, unprojected))
    assert difference > 1e-6, "the projection must change the adapter gradient"
    # At the first step B = 0, so only the B factors (odd positions) receive a gradient.
    assert all(p.grad.abs().sum() > 0 for p in parameters[1::2])


def test_tangent_basis_is_orthonormal_and_tangent():
    config, learner, data, context = _setup("drs_sphere", "projection.pca_energy=0.8")
    learner.start_task(context(0))
    projector = learner.subspace_projector
    basis, center = projector.basis.double(), projector.basis_point.double()
    k = basis.shape[1]
    assert 1 <= k <= 16
    torch.testing.assert_close(basis.t() @ basis, torch.eye(k, dtype=torch.float64), atol=1e-5, rtol=0)
    assert (center @ basis).abs().max() < 1e-5
    assert learner.bases[-1]["energy"] >= 0.8 or k == 16


def test_k_max_must_fit_embedding():
    with pytest.raises(ConfigError, match="projection.k_max=64 must be smaller than the embedding size 64"):
        _setup("drs_sphere", "projection.k_max=64")


def test_prototypes_reestimated_under_final_weights():
    config, learner, data, context = _setup("drs_sphere")
    _train_task(learner, data, context, 0)
    assert learner.prototypes.shape == (2, 64)
    learner.eval()
    with torch.no_grad():
        embeddings = torch.cat([learner.embed(images) for images, _ in context(0).feature_loader()])
    labels = torch.as_tensor(data.train_labels[data.train_indices_of(0)])
    for row, label in enumerate((0, 1)):
        mean = embeddings[labels == label].double().mean(0)
        torch.testing.assert_close(learner.prototypes[row].double(), mean / mean.norm(), atol=1e-5, rtol=0)
    torch.testing.assert_close(learner.prototypes.norm(dim=1), torch.ones(2), atol=1e-6, rtol=0)


def test_ema_update_hand_computed():
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    base = BasePoints(points.clone(), "per_class", first_class=4)
    embeddings = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    base.ema_update(embeddings, torch.tensor([4, 4]), momentum=0.5)
    batch_mean = torch.tensor([0.6, 1.8]) / torch.tensor([0.6, 1.8]).norm()
    moved = 0.5 * torch.tensor([1.0, 0.0]) + 0.5 * batch_mean
    torch.testing.assert_close(base.points[0], moved / moved.norm())
    torch.testing.assert_close(base.points[1], torch.tensor([0.0, 1.0]))


def test_base_point_modes():
    torch.manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    labels = torch.arange(3).repeat_interleave(30) + 6
    embeddings = torch.nn.functional.normalize(centers[labels - 6] + 0.05 * torch.randn(90, 8), dim=1)
    per_class = estimate_base_points(embeddings, labels, range(6, 9), mode="per_class")
    assert per_class.points.shape == (3, 8)
    assert per_class.assign(embeddings, labels).tolist() == (labels - 6).tolist()
    one = estimate_base_points(embeddings, labels, range(6, 9), mode="global")
    assert one.points.shape == (1, 8)
    anchors = estimate_base_points(embeddings, labels, range(6, 9), mode="multi_anchor", num_anchors=3)
    assignment = anchors.assign(embeddings, labels)
    for c in range(3):
        assert len(set(assignment[labels == c + 6].tolist())) == 1
    auto = estimate_base_points(embeddings[::10], labels[::10], range(6, 9), mode="auto", num_anchors=2,
                                min_per_class=20)
    assert auto.mode == "multi_anchor"
    assert estimate_base_points(embeddings, labels, range(6, 9), mode="auto", min_per_class=20).mode == "per_class"


def test_linear_drs_nullspace_step():
    """A null-space step of A leaves the principal input directions unchanged."""
    config, learner, data, context = _setup("linear_drs", "linear_drs.energy=0.9")
    _train_task(learner, data, context, 0)
    projectors = learner.layer_projectors(context(1))
    optimizer = learner.start_task(context(1))
    name = learner.adapters.active
    before = {key: a.detach().clone() for key, (a, _) in learner.adapters.named_factors(name).items()}
    images, labels = _batch(data, 1)
    learner.train()
    output = learner.training_loss(images, labels, StepInfo(1, 0, 1))
    optimizer.zero_grad()
    output.loss.backward()
    optimizer.step()
    for key, (factor_a, _) in learner.adapters.named_factors(name).items():
        projector = projectors[key]
        # P = (I - U Uᵀ)/‖I - U Uᵀ‖_F has eigenvalue 0 on the principal inputs U, so ΔA U = 0.
        eigenvalues, eigenvectors = torch.linalg.eigh(projector)
        principal_basis = eigenvectors[:, eigenvalues < eigenvalues.max() / 2]
        assert principal_basis.shape[1] >= 1
        change = factor_a.detach() - before[key]
        assert change.abs().max() > 0
        assert (change @ principal_basis).abs().max() < 1e-6 * max(1.0, change.abs().max().item())
    assert 0 < learner.task_log()["layer_rank_mean"] < 64


def test_ncm_learner_has_zero_drift(tmp_path):
    from spherical_cl.results import RunWriter
    from trainers.incremental import IncrementalTrainer

    config, learner, data, context = _setup("ncm", "logging.progress=false", "eval.drift_samples_per_class=10")
    trainer = IncrementalTrainer(config, learner, data, RunWriter(tmp_path), torch.device("cpu"))
    metrics = trainer.run()
    assert metrics["geodesic_drift"][0] is None
    assert all(d == 0.0 for d in metrics["geodesic_drift"][1:])
    assert set(metrics["predictors"]) == {"ncm"}
    assert metrics["acc_per_task"][0] > 50.0
    assert len(list((tmp_path / "exports").glob("task_*_prototypes.safetensors"))) == 5


def test_arcface_logits_hand_computed():
    from spherical_cl.heads import ArcFaceHead

    head = ArcFaceHead(2)
    head.add_classes(2, init=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    embedding = torch.tensor([[math.cos(0.3), math.sin(0.3)]])
    logits = head.logits(embedding, torch.tensor([0]), scale=10.0, margin=0.2)
    torch.testing.assert_close(logits[0, 0], torch.tensor(10 * math.cos(0.5)))
    torch.testing.assert_close(logits[0, 1], torch.tensor(10 * math.sin(0.3)))
    far = torch.tensor([[math.cos(3.0), math.sin(3.0)]])
    fallback = head.logits(far, torch.tensor([0]), scale=10.0, margin=0.2)
    torch.testing.assert_close(fallback[0, 0], torch.tensor(10 * (math.cos(3.0) - 0.2 * math.sin(0.2))), atol=1e-5,
                               rtol=0)


def test_non_finite_loss_stops_with_diagnosis(tmp_path):
    from spherical_cl.methods.base import LossOutput
    from spherical_cl.results import RunWriter
    from trainers.incremental import IncrementalTrainer, NonFiniteLossError

    config, learner, data, context = _setup("drs_sphere", "logging.progress=false", "train.epochs_main=1")

    def exploding_loss(images, labels, step):
        value = learner.embed(images).sum() * float("nan")
        return LossOutput(value, {"ce": float("nan"), "triplet": 0.25})

    learner.training_loss = exploding_loss
    trainer = IncrementalTrainer(config, learner, data, RunWriter(tmp_path), torch.device("cpu"))
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.run()
    message = str(caught.value)
    assert "task 1, epoch 1, step 1" in message
    assert "ce=nan" in message
    assert "triplet=0.25" in message
    assert "train.lr" in message
    assert "loss.m_end" in message
    assert not (tmp_path / "metrics.json").exists()
