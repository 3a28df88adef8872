"""Shared fixtures: a tiny backbone config, paths to the shared data, small datasets on disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Set before any test imports huggingface_hub, which reads it once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR100_NPZ = SHARED / "data" / "cifar100"
TORCH_HUB = SHARED / "torch-hub"


DEMO = REPO / "configs" / "demo.yaml"
# The demo on identity-ordered classes, short enough for a test run: 3 tasks of 4, 3 and 3 classes.
SHORT_DEMO = ["logging.progress=false", "data.class_order=identity", "data.class_list=null", "data.num_tasks=3",
              "data.remainder=first"]


def run_cli(*args: str, module: str = "spherical_cl.train", script: Path | None = None,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``python -m module`` (or ``python script``) with ``args`` and capture its output."""
    command = [sys.executable, str(script)] if script is not None else [sys.executable, "-m", module]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=environment)


def assert_close_tree(actual, expected, where: str = "metrics", atol: float = 1e-6) -> None:
    """Assert equal structure and values of parsed JSON, with floats within ``atol``."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            assert_close_tree(actual[key], expected[key], f"{where}.{key}", atol)
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_close_tree(a, e, f"{where}[{index}]", atol)
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=0, abs=atol), where
    else:
        assert actual == expected, where


def error_line(result: subprocess.CompletedProcess) -> str:
    """Return the last non-empty line of stderr after checking it is a one-line input error."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: "), lines[-1]
    return lines[-1]


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


def build_digits_learner(*overrides: str):
    """Return (config, learner, data, context) for a micro ViT learner on digits in 5 tasks.

    ``context(task)`` builds the TaskContext of that task on the CPU.
    """
    import torch
    from torch.utils.data import DataLoader

    from spherical_cl.backbones import build_backbone
    from spherical_cl.config import load_config
    from spherical_cl.data import IncrementalData, build_class_split, load_source
    from spherical_cl.methods import TaskContext, build_learner

    torch.manual_seed(0)
    config = load_config(None, ["model.lora_rank=4", "model.lora_alpha=4", "data.num_tasks=5",
                                "data.class_order=identity", *overrides])
    backbone = build_backbone("vit_micro", pretrained=False)
    data = IncrementalData(load_source("digits", None), build_class_split(10, num_tasks=5, class_order="identity"),
                           input_size=32)
    learner = build_learner(config, backbone)

    def context(task: int) -> TaskContext:
        return TaskContext(task=task, num_tasks=5, classes=data.class_split.task_classes(task),
                           seen=data.class_split.seen_classes(task),
                           feature_loader=lambda: DataLoader(data.train_set(task, augment=False), batch_size=64),
                           device=torch.device("cpu"))

    return config, learner, data, context


def digits_batch(data, task: int, size: int = 24):
    """Return one seeded batch (images, labels) of task ``task``'s training images."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(data.train_set(task, augment=False), batch_size=size, shuffle=True,
                        generator=torch.Generator().manual_seed(1))
    return next(iter(loader))
