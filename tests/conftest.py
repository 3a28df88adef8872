"""Shared fixtures: a tiny backbone config, paths to the shared data, small datasets on disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Set before any test imports huggingface_hub, which reads it once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR100_NPZ = SHARED / "data" / "cifar100"
TORCH_HUB = SHARED / "torch-hub"


@pytest.fixture(scope="session", autouse=True)
def offline_hubs():
    """Point torchvision at the shared weights cache."""
    if TORCH_HUB.is_dir():
        os.environ.setdefault("TORCH_HOME", str(TORCH_HUB))


def write_npz_dataset(root: Path, *, classes: int = 6, per_class: int = 12, test_per_class: int = 4,
                      size: int = 16, seed: int = 0) -> Path:
    """Write a small separable npz dataset: each class is a distinct colour with noise."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    palette = rng.integers(0, 256, size=(classes, 3))
    for name, count in (("train", per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(classes), count)
        noise = rng.integers(-20, 21, size=(len(labels), size, size, 3))
        images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        np.savez(root / f"{name}.npz", x=images, y=labels, classes=np.array([f"c{i}" for i in range(classes)]))
    return root


@pytest.fixture
def npz_dataset(tmp_path) -> Path:
    return write_npz_dataset(tmp_path / "npz")
