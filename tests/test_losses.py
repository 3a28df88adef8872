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
