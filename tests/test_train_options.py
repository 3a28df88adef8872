"""Training options: bfloat16 autocast with float32 geometry, torch.compile, and the LR schedule."""

from __future__ import annotations

import pytest
import torch
from conftest import build_digits_learner, digits_batch

from trainers.incremental import resolve_precision


def test_precision_resolves_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("fp32", cuda) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16


def test_bf16_autocast_keeps_embeddings_float32():
    config, learner, data, context = build_digits_learner("method=drs_sphere", "projection.k_max=8")
    images, labels = digits_batch(data, 0)
    learner.eval()
    reference = learner.embed(images)

    seen = []
    layer = dict(learner.backbone.model.named_modules())["blocks.0.attn.qkv"]
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    learner.autocast_dtype = torch.bfloat16
    embeddings = learner.embed(images)
    handle.remove()

    assert seen == [torch.bfloat16]
    assert embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(images)), atol=1e-6, rtol=0)
    # bfloat16 keeps 8 bits of mantissa: close to float32, but not equal.
    difference = (embeddings - reference).abs().max().item()
    assert 0 < difference < 0.05


def test_bf16_training_step_has_float32_loss_and_grads():
    config, learner, data, context = build_digits_learner("method=drs_sphere", "projection.k_max=8", "train.epochs_warm=1")
    learner.autocast_dtype = torch.bfloat16
    optimizer = learner.start_task(context(0))
    images, labels = digits_batch(data, 0)
    from spherical_cl.methods.base import StepInfo

    output = learner.training_loss(images, labels, StepInfo(task=0, epoch=1, num_epochs=2, phase="main"))
    assert output.loss.dtype == torch.float32
    assert torch.isfinite(output.loss)
    output.loss.backward()
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    assert grads
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.fixture
def restore_distribution_validation():
    # torch.compile switches off argument validation of torch.distributions for the whole process.
    default = torch.distributions.Distribution._validate_args
    yield
    torch.distributions.Distribution.set_default_validate_args(default)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_backbone_follows_folds_and_lora_minus(restore_distribution_validation):
    config, learner, data, context = build_digits_learner("train.compile=true")
    images, labels = digits_batch(data, 0, size=8)
    learner.eval()
    compiled, eager = learner._backbone_forward, learner.backbone
    assert compiled is not eager
    with torch.no_grad():
        for parameter in learner.adapters.add_task(0):
            parameter.add_(0.5 * torch.randn_like(parameter))
    learner.adapters.fold_active()

    def embeddings(forward):
        learner._backbone_forward = forward
        plain = learner.embed(images)
        with learner.adapters.subtracted_view():
            subtracted = learner.embed(images)
        return plain, subtracted

    plain, subtracted = embeddings(compiled)
    plain_eager, subtracted_eager = embeddings(eager)
    torch.testing.assert_close(plain, plain_eager, atol=1e-5, rtol=0)
    # The compiled graph must read the swapped LoRA⁻ weights, not the ones it was traced with.
    torch.testing.assert_close(subtracted, subtracted_eager, atol=1e-5, rtol=0)
    assert (subtracted - plain).abs().max() > 0.1


def test_cosine_schedule_decays_within_each_task(tmp_path):
    import json

    from conftest import DEMO, SHORT_DEMO

    from spherical_cl.config import load_config
    from trainers.experiment import run_experiment

    overrides = [*SHORT_DEMO, "train.epochs_main=3", "train.lr_schedule=cosine", "train.lr_min=1e-4"]
    run_experiment(load_config(DEMO, overrides), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    for task in (1, 2, 3):
        rates = [r["lr"] for r in records if r["type"] == "epoch" and r["task"] == task]
        assert len(rates) == 3
        assert rates[0] < 1e-2
        assert rates[0] > rates[1] > rates[2]
        # After the task's last step the cosine has reached lr_min.
        assert rates[2] == pytest.approx(1e-4, rel=1e-6)
