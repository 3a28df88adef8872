import pytest
import torch

from spherical_cl.backbones import build_backbone
from spherical_cl.lora import TaskAdapters


def _adapted_micro_vit(seed: int = 0) -> tuple[torch.nn.Module, TaskAdapters]:
    torch.manual_seed(seed)
    backbone = build_backbone("vit_micro", pretrained=False)
    return backbone, TaskAdapters(backbone.model, ["qkv"], rank=4, alpha=8)


def _train_like(adapters: TaskAdapters, task: int, seed: int) -> None:
    """Give the task's adapter non-zero random weights, as if it had been trained."""
    generator = torch.Generator().manual_seed(seed)
    adapters.add_task(task)
    with torch.no_grad():
        for parameter in adapters.parameters(adapters.active):
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def test_only_current_adapter_trains():
    backbone, adapters = _adapted_micro_vit()
    _train_like(adapters, 0, seed=1)
    adapters.fold_active()
    parameters = adapters.add_task(1)
    trainable = {id(p) for p in backbone.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in parameters}
    assert len(parameters) == 2 * len(adapters.layers())


def test_fold_preserves_forward():
    backbone, adapters = _adapted_micro_vit()
    _train_like(adapters, 0, seed=1)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = backbone(images)
        adapters.fold_active()
        after = backbone(images)
    assert adapters.active is None
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_subtracted_view_weights_and_restore():
    """The LoRA-minus view is W0 minus the folded deltas, and leaving it restores every weight."""
    backbone, adapters = _adapted_micro_vit()
    layers = adapters.layers()
    w0 = {key: layer.get_base_layer().weight.detach().clone() for key, layer in layers.items()}
    for task in range(3):
        _train_like(adapters, task, seed=task + 1)
        adapters.fold_active()
    _train_like(adapters, 3, seed=10)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        training_output = backbone(images)
    saved = {key: layer.get_base_layer().weight.detach().clone() for key, layer in layers.items()}

    with adapters.subtracted_view():
        for key, layer in layers.items():
            expected = w0[key] - sum(layer.get_delta_weight(f"task_{t + 1}") for t in range(3))
            torch.testing.assert_close(layer.get_base_layer().weight, expected, atol=1e-6, rtol=0)
            assert layer.active_adapters == []

    for key, layer in layers.items():
        assert torch.equal(layer.get_base_layer().weight, saved[key])
        assert layer.active_adapters == ["task_4"]
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), training_output, atol=1e-6, rtol=0)
    assert all(p.requires_grad for p in adapters.parameters("task_4"))


def test_subtracted_view_first_task_is_w0():
    backbone, adapters = _adapted_micro_vit()
    _train_like(adapters, 0, seed=3)
    layer = next(iter(adapters.layers().values()))
    w0 = layer.get_base_layer().weight.detach().clone()
    images = torch.randn(2, 3, 32, 32)
    with adapters.subtracted_view(), torch.no_grad():
        assert torch.equal(layer.get_base_layer().weight, w0)
        viewed = backbone(images)
    for parameter in adapters.parameters("task_1"):
        parameter.data.zero_()
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), viewed, atol=1e-6, rtol=0)


def test_step_cost_does_not_grow_with_tasks():
    backbone, adapters = _adapted_micro_vit()
    for task in range(5):
        _train_like(adapters, task, seed=task)
        layer = next(iter(adapters.layers().values()))
        assert layer.active_adapters == [f"task_{task + 1}"]
        adapters.fold_active()
    assert adapters.folded == [f"task_{t + 1}" for t in range(5)]


def test_fold_rejects_non_finite_delta():
    backbone, adapters = _adapted_micro_vit()
    _train_like(adapters, 0, seed=1)
    layer = next(iter(adapters.layers().values()))
    before = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["task_1"].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        adapters.fold_active()
    assert torch.equal(layer.get_base_layer().weight, before)


def test_add_task_requires_fold():
    _, adapters = _adapted_micro_vit()
    adapters.add_task(0)
    with pytest.raises(RuntimeError, match="fold_active"):
        adapters.add_task(1)
