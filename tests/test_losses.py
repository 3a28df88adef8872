import math

import pytest
import torch

from spherical_cl.losses import anneal, angular_triplet_loss, pairwise_distance


def unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def test_anneal_schedules():
    assert anneal(10.0, 30.0, 0.0) == 10.0
    assert anneal(10.0, 30.0, 0.5) == 20.0
    assert anneal(10.0, 30.0, 1.0) == 30.0
    assert anneal(10.0, 30.0, 0.5, "cosine") == pytest.approx(20.0)
    assert anneal(10.0, 30.0, 0.25, "cosine") < anneal(10.0, 30.0, 0.25)
    assert anneal(10.0, 30.0, 0.0, "none") == 30.0
    with pytest.raises(ValueError, match="unknown schedule"):
        anneal(0.0, 1.0, 0.5, "step")


def test_pairwise_distance_exact_at_zero_with_finite_gradient():
    x = torch.tensor([unit(0.0), unit(1e-3)], dtype=torch.float64, requires_grad=True)
    for kind in ("geodesic", "chordal"):
        distances = pairwise_distance(x, x, kind)
        assert distances[0, 0].item() == 0.0
        assert distances[0, 1].item() == pytest.approx(1e-3 if kind == "geodesic" else 2 * math.sin(5e-4), rel=1e-9)
        (gradient,) = torch.autograd.grad(distances.sum(), x)
        assert torch.isfinite(gradient).all()


def test_triplet_hand_computed():
    # Class 0 at angles 0 and 0.4, class 1 at 1.0; an old prototype at 0.5.
    embeddings = torch.tensor([unit(0.0), unit(0.4), unit(1.0)], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    without_old = angular_triplet_loss(embeddings, labels, margin=0.2)
    # Anchor 0: d(a,p)=0.4, d(a,n)=1.0 -> 0; anchor 1: 0.4 - 0.6 + 0.2 = 0; anchor 2 has no positive.
    assert without_old.item() == pytest.approx(0.0, abs=1e-12)
    old = torch.tensor([unit(0.5)], dtype=torch.float64)
    with_old = angular_triplet_loss(embeddings, labels, margin=0.2, old_prototypes=old)
    # Anchor 0: 0.4 - 0.5 + 0.2 = 0.1; anchor 1: 0.4 - 0.1 + 0.2 = 0.5; mean 0.3.
    assert with_old.item() == pytest.approx(0.3, abs=1e-9)


def test_triplet_without_valid_anchor_is_zero_with_gradient():
    embeddings = torch.tensor([unit(0.0), unit(1.0)], requires_grad=True)
    loss = angular_triplet_loss(embeddings, torch.tensor([0, 1]), margin=0.2)
    assert loss.item() == 0.0
    loss.backward()
    assert embeddings.grad is not None


def reference_triplet(embeddings, labels, margin, old_prototypes, distance):
    """The batch-hard triplet from exact distances of every pair, in float64."""
    distances = pairwise_distance(embeddings, embeddings, distance)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    positive_mask = same & ~torch.eye(len(labels), dtype=torch.bool)
    hardest_positive = torch.where(positive_mask, distances, torch.zeros_like(distances)).amax(dim=1)
    negative = torch.where(~same, distances, torch.full_like(distances, math.inf)).amin(dim=1)
    if old_prototypes is not None:
        negative = torch.minimum(negative, pairwise_distance(embeddings, old_prototypes, distance).amin(dim=1))
    valid = positive_mask.any(dim=1) & torch.isfinite(negative)
    return torch.relu(hardest_positive[valid] - negative[valid] + margin).mean()


@pytest.mark.parametrize("distance", ["geodesic", "chordal"])
@pytest.mark.parametrize("seed", range(5))
def test_triplet_matches_all_pairs_reference(distance, seed):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 4, (24,), generator=generator)
    embeddings = torch.nn.functional.normalize(centres[labels] + 0.4 * torch.randn(24, 16, generator=generator,
                                                                                  dtype=torch.float64), dim=1)
    prototypes = torch.nn.functional.normalize(torch.randn(6, 16, generator=generator, dtype=torch.float64), dim=1)
    for old in (None, prototypes):
        leaf = embeddings.clone().requires_grad_(True)
        loss = angular_triplet_loss(leaf, labels, margin=0.3, old_prototypes=old, distance=distance)
        (gradient,) = torch.autograd.grad(loss, leaf)
        reference_leaf = embeddings.clone().requires_grad_(True)
        expected = reference_triplet(reference_leaf, labels, 0.3, old, distance)
        (expected_gradient,) = torch.autograd.grad(expected, reference_leaf)
        torch.testing.assert_close(loss, expected, atol=1e-12, rtol=0)
        torch.testing.assert_close(gradient, expected_gradient, atol=1e-12, rtol=0)


def test_triplet_exact_for_nearly_identical_positives():
    # Positives 1e-6 rad apart: a cosine is 1 - 5e-13 there, the distance is still exact.
    embeddings = torch.tensor([unit(0.0), unit(1e-6), unit(2.0)], dtype=torch.float64, requires_grad=True)
    loss = angular_triplet_loss(embeddings, torch.tensor([0, 0, 1]), margin=2.5)
    # Anchor 0: 1e-6 - 2.0 + 2.5; anchor 1: 1e-6 - (2.0 - 1e-6) + 2.5.
    assert loss.item() == pytest.approx(((1e-6 - 2.0 + 2.5) + (1e-6 - (2.0 - 1e-6) + 2.5)) / 2, rel=0, abs=1e-15)
    loss.backward()
    assert torch.isfinite(embeddings.grad).all()
