"""No file of a run contains images or per-sample features, and task t trains on task t's classes only.

The audit runs each learner twice, with 27 and with 43 training images per class, and
reads every file both runs write. A file that stored images, embeddings or anything else
per sample would change shape with the number of samples. Parameters, prototypes, bases,
statistics and metrics do not. The bases are fixed in size here, so that their shape
depends on the config alone: ``pca_energy=1`` fills ``k_max``, and a linear-DRS energy of
0.01 keeps one direction per layer.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DEMO, SHORT_DEMO
from PIL import Image

PER_CLASS = (27, 43)
AUDITED = {
    "drs_sphere": ["method=drs_sphere", "train.epochs_warm=1", "projection.pca_energy=1.0", "projection.k_max=4"],
    "drs_sphere_vae": ["method=drs_sphere", "vae.enabled=true", "vae.latent_dim=16", "projection.k_max=4",
                       "projection.pca_energy=1.0"],
    "linear_drs": ["method=linear_drs", "linear_drs.energy=0.01"],
}


def signature(value, where: str = ""):
    """Return the structure of a loaded file: key paths with tensor shapes and dtypes, list lengths."""
    if isinstance(value, torch.Tensor):
        return {where: (tuple(value.shape), str(value.dtype))}
    if isinstance(value, dict):
        found = {where: ("dict", tuple(sorted(map(str, value))))}
        for key, item in value.items():
            found.update(signature(item, f"{where}/{key}"))
        return found
    if isinstance(value, (list, tuple)):
        found = {where: ("list", len(value))}
        for index, item in enumerate(value):
            found.update(signature(item, f"{where}[{index}]"))
        return found
    return {where: type(value).__name__}


def load_any(path):
    from safetensors.torch import load_file

    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if path.suffix == ".yaml":
        return path.read_text().splitlines()
    if path.suffix == ".png":
        with Image.open(path) as image:
            return {"size": list(image.size)}
    raise AssertionError(f"the run wrote {path.name}, which the audit does not know; add it here")


def tensors_of(value, where: str = ""):
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from tensors_of(item, f"{where}/{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from tensors_of(item, f"{where}[{index}]")


@pytest.mark.parametrize("learner", list(AUDITED))
def test_run_files_have_no_sample_data(tmp_path, learner):
    from spherical_cl.config import load_config
    from trainers.experiment import run_experiment

    signatures = []
    for per_class in PER_CLASS:
        run_dir = tmp_path / f"run_{per_class}"
        overrides = [*SHORT_DEMO, "train.epochs_main=1", f"data.max_train_per_class={per_class}", *AUDITED[learner]]
        run_experiment(load_config(DEMO, overrides), run_dir)
        files = sorted(p for p in run_dir.rglob("*") if p.is_file())
        assert {p.relative_to(run_dir).parts[0] for p in files} == {
            "checkpoints", "exports", "plots", "config.yaml", "log.jsonl", "metrics.json", "run_info.json"}
        found = {}
        for path in files:
            loaded = load_any(path)
            found[str(path.relative_to(run_dir))] = signature(loaded)
            for where, tensor in tensors_of(loaded):
                # Images are uint8; the only uint8 tensor is torch's generator state.
                assert tensor.dtype != torch.uint8 or where == "/rng/torch", (path.name, where)
                assert per_class not in tensor.shape, (path.name, where)
                assert per_class * 4 not in tensor.shape, (path.name, where)
        signatures.append(found)
    assert signatures[0].keys() == signatures[1].keys()
    for name in signatures[0]:
        assert signatures[0][name] == signatures[1][name], name


def test_training_loader_yields_only_the_task_classes(tmp_path, monkeypatch):
    from spherical_cl.config import load_config
    from spherical_cl.methods.seq_lora import SequentialLoRA
    from trainers.experiment import run_experiment

    seen: dict[int, set[int]] = {}
    training_loss = SequentialLoRA.training_loss

    def recording(self, images, labels, step):
        seen.setdefault(step.task, set()).update(labels.tolist())
        return training_loss(self, images, labels, step)

    monkeypatch.setattr(SequentialLoRA, "training_loss", recording)
    metrics = run_experiment(load_config(DEMO, [*SHORT_DEMO, "train.epochs_main=1"]), tmp_path / "run")
    assert seen == {0: {0, 1, 2, 3}, 1: {4, 5, 6}, 2: {7, 8, 9}}
    assert metrics["classes_per_task"] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
