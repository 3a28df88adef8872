import pytest
import torch

from conftest import TORCH_HUB
from spherical_cl.backbones import BACKBONES, build_backbone, resolve_spec
from spherical_cl.errors import BackboneError
from spherical_cl.lora import TaskAdapters


def test_alias_table_resolves_paper_backbone():
    spec = resolve_spec("vit_b16_in21k")
    assert spec.library == "timm"
    assert spec.name == "vit_base_patch16_224.augreg_in21k"
    assert spec.lora_targets == ("qkv",)


def test_unknown_backbone_suggests_aliases():
    with pytest.raises(BackboneError) as caught:
        resolve_spec("vit_b16_in21")
    assert "vit_b16_in21k" in str(caught.value)
    with pytest.raises(BackboneError, match="closest"):
        resolve_spec("timm:vit_base_patch16_22")


def test_micro_vit_embedding_shape():
    backbone = build_backbone("vit_micro", pretrained=False)
    assert backbone.embed_dim == 64
    assert backbone.input_spec.input_size == 32
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    assert not any(p.requires_grad for p in backbone.parameters())


def test_timm_local_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    source = build_backbone("vit_micro", pretrained=False)
    path = tmp_path / "micro.pth"
    torch.save(source.model.state_dict(), path)
    torch.manual_seed(1)
    loaded = build_backbone("vit_micro", pretrained=False, checkpoint=str(path))
    for (name, expected), (_, actual) in zip(source.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(expected, actual), name


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(BackboneError, match="not found"):
        build_backbone("vit_micro", pretrained=False, checkpoint=str(tmp_path / "absent.pth"))


def test_pretrained_without_network_explains_offline_options(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(BackboneError) as caught:
        build_backbone("timm:vit_tiny_patch16_224", pretrained=True)
    message = str(caught.value)
    assert "model.checkpoint" in message
    assert "HF_HUB_OFFLINE" in message


@pytest.mark.skipif(not (TORCH_HUB / "hub" / "checkpoints").is_dir(), reason="shared torch hub cache not present")
def test_mobilenet_v2_from_torch_home_with_pointwise_lora(monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(TORCH_HUB))
    backbone = build_backbone("mobilenet_v2", pretrained=True, img_size=64)
    assert backbone.embed_dim == 1280
    assert backbone.input_spec.mean == pytest.approx((0.485, 0.456, 0.406))
    adapters = TaskAdapters(backbone.model, BACKBONES["mobilenet_v2"].lora_targets, rank=4, alpha=4)
    adapters.add_task(0)
    layers = adapters.layers()
    assert len(layers) == 34
    assert all(layer.get_base_layer().kernel_size == (1, 1) for layer in layers.values())
    backbone.eval()
    assert backbone(torch.randn(2, 3, 64, 64)).shape == (2, 1280)
