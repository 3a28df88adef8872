"""Frozen backbones by name: one alias table, timm and torchvision loading, embedding output.

A backbone maps a normalised image batch (B, 3, S, S) to a pooled embedding (B, D). Its
weights are frozen; only the LoRA adapters added later are trained.
"""

from __future__ import annotations

import difflib
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spherical_cl.errors import BackboneError

logger = logging.getLogger(__name__)

# Regex (peft `target_modules` as a string) for the 34 pointwise (1x1) convolutions of
# torchvision's MobileNetV2: the projection `features.1.conv.1` of block 1 (which has no
# expansion), the expansion `conv.0.0` and projection `conv.2` of blocks 2..17, and the
# last `features.18.0`. Depthwise convolutions are left out: peft cannot add LoRA to a
# grouped convolution whose group count does not divide the rank.
MOBILENET_V2_POINTWISE = r"features\.(1\.conv\.1|([2-9]|1[0-7])\.conv\.(0\.0|2)|18\.0)"


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and where LoRA goes by default.

    Attributes:
        library: ``"timm"`` or ``"torchvision"``.
        name: the model name in that library (for timm, with its pretrained tag).
        lora_targets: peft ``target_modules``: a list of module-name suffixes or one regex.
        weights: the torchvision weights enum name used when ``pretrained`` is set.
        kwargs: extra keyword arguments for the model constructor.
        mean, std, input_size: normalisation and resolution when the library has none.
    """

    library: str
    name: str
    lora_targets: tuple[str, ...] | str = ("qkv",)
    weights: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    input_size: int | None = None
    has_weights: bool = True


BACKBONES: dict[str, BackboneSpec] = {
    # ViT-B/16 pre-trained on ImageNet-21k, the setting of most pre-trained-model CIL papers
    # (older timm releases called it `vit_base_patch16_224_in21k`).
    "vit_b16_in21k": BackboneSpec("timm", "vit_base_patch16_224.augreg_in21k"),
    "vit_b16_in21k_ft_in1k": BackboneSpec("timm", "vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    "vit_b16_in1k": BackboneSpec("timm", "vit_base_patch16_224.augreg_in1k"),
    # A 2-block, 64-wide ViT for tests and the CPU demo; it has no pretrained weights.
    "vit_micro": BackboneSpec(
        "timm", "vit_tiny_patch16_224",
        kwargs=dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=32, has_weights=False,
    ),
    "mobilenet_v2": BackboneSpec("torchvision", "mobilenet_v2", lora_targets=MOBILENET_V2_POINTWISE,
                                 weights="IMAGENET1K_V1"),
    "resnet18": BackboneSpec("torchvision", "resnet18", lora_targets=("conv1", "conv2"), weights="IMAGENET1K_V1"),
}


@dataclass(frozen=True)
class InputSpec:
    """The input a backbone expects: square size in pixels, channel mean and std in [0, 1] units."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def resolve_spec(name: str) -> BackboneSpec:
    """Return the spec of an alias, or of ``timm:NAME`` / ``torchvision:NAME``.

    Raises:
        BackboneError: the name is neither an alias nor a known timm or torchvision model.
    """
    if name in BACKBONES:
        return BACKBONES[name]
    library, sep, model_name = name.partition(":")
    if sep and library == "timm":
        import timm

        if not timm.is_model(model_name):
            close = difflib.get_close_matches(model_name, timm.list_models(), n=3)
            raise BackboneError(f"unknown timm model {model_name!r}; closest: {', '.join(close) or 'none'}")
        return BackboneSpec("timm", model_name)
    if sep and library == "torchvision":
        import torchvision

        available = torchvision.models.list_models()
        if model_name not in available:
            close = difflib.get_close_matches(model_name, available, n=3)
            raise BackboneError(f"unknown torchvision model {model_name!r}; closest: {', '.join(close) or 'none'}")
        return BackboneSpec("torchvision", model_name, weights="DEFAULT", lora_targets=())
    close = difflib.get_close_matches(name, list(BACKBONES), n=3, cutoff=0.4)
    raise BackboneError(
        f"unknown backbone {name!r}; closest aliases: {', '.join(close) or 'none'} "
        f"(all: {', '.join(BACKBONES)}), or use 'timm:NAME' or 'torchvision:NAME'"
    )


class Backbone(nn.Module):
    """A frozen feature extractor returning pooled embeddings (B, D)."""

    def __init__(self, model: nn.Module, spec: BackboneSpec, input_spec: InputSpec, embed_dim: int) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.input_spec = input_spec
        self.embed_dim = embed_dim
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def build_backbone(name: str, *, pretrained: bool, checkpoint: str | None = None,
                   img_size: int | None = None) -> Backbone:
    """Build a frozen backbone, loading pretrained weights when asked.

    Raises:
        BackboneError: unknown name, missing checkpoint file, or weights that cannot be
            loaded (for example, no network and no local copy).
    """
    spec = resolve_spec(name)
    check_weights_available(name, pretrained=pretrained, checkpoint=checkpoint)
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise BackboneError(f"model.checkpoint file not found: {checkpoint}")
    if spec.library == "timm":
        return _build_timm(spec, pretrained=pretrained, checkpoint=checkpoint, img_size=img_size)
    return _build_torchvision(spec, pretrained=pretrained, checkpoint=checkpoint, img_size=img_size)


def check_weights_available(name: str, *, pretrained: bool, checkpoint: str | None) -> None:
    """Raise BackboneError when pretrained weights are requested for a backbone that has none."""
    spec = resolve_spec(name)
    if pretrained and checkpoint is None and not spec.has_weights:
        raise BackboneError(f"backbone {name!r} has no pretrained weights; set model.pretrained=false "
                            "or give model.checkpoint")


def _checkpoint_error(checkpoint: str, error: Exception) -> BackboneError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return BackboneError(f"cannot load model.checkpoint {checkpoint} into this backbone ({first_line}); "
                         "check that the file holds a state dict of the same architecture")


def _offline_hint(name: str) -> str:
    return (
        f"cannot load pretrained weights of {name!r}; with no network, set model.checkpoint to a local "
        "weights file, point TORCH_HOME (torchvision) or HF_HOME with HF_HUB_OFFLINE=1 (timm) at a cache "
        "that holds them, or set model.pretrained=false"
    )


def _build_timm(spec: BackboneSpec, *, pretrained: bool, checkpoint: str | None, img_size: int | None) -> Backbone:
    import timm

    kwargs = dict(spec.kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if checkpoint is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(checkpoint))
    try:
        model = timm.create_model(spec.name, pretrained=pretrained or checkpoint is not None, num_classes=0, **kwargs)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
        if checkpoint is not None:
            raise _checkpoint_error(checkpoint, error) from None
        if pretrained:
            first_line = str(error).strip().splitlines()[0]
            raise BackboneError(f"{_offline_hint(spec.name)} ({type(error).__name__}: {first_line})") from None
        raise
    config = timm.data.resolve_data_config({}, model=model)
    input_spec = InputSpec(
        input_size=img_size or spec.input_size or int(config["input_size"][-1]),
        mean=tuple(spec.mean or config["mean"]),
        std=tuple(spec.std or config["std"]),
    )
    return Backbone(model, spec, input_spec, embed_dim=model.num_features)


def _build_torchvision(spec: BackboneSpec, *, pretrained: bool, checkpoint: str | None,
                       img_size: int | None) -> Backbone:
    import torchvision

    weights = None
    if pretrained and checkpoint is None:
        weights = torchvision.models.get_model_weights(spec.name)[spec.weights] if spec.weights != "DEFAULT" \
            else torchvision.models.get_model_weights(spec.name).DEFAULT
    try:
        model = torchvision.models.get_model(spec.name, weights=weights)
    except (OSError, RuntimeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise BackboneError(f"{_offline_hint(spec.name)} ({type(error).__name__}: {first_line})") from None
    if checkpoint is not None:
        try:
            model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
            raise _checkpoint_error(checkpoint, error) from None
    embed_dim = _drop_classifier(model)
    mean, std, default_size = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224
    if weights is not None:
        preset = weights.transforms()
        mean, std, default_size = tuple(preset.mean), tuple(preset.std), int(preset.crop_size[0])
    input_spec = InputSpec(input_size=img_size or default_size, mean=mean, std=std)
    return Backbone(model, spec, input_spec, embed_dim=embed_dim)


def _drop_classifier(model: nn.Module) -> int:
    """Replace the classification layer with identity and return the embedding size."""
    for attribute in ("fc", "classifier", "head", "heads"):
        head = getattr(model, attribute, None)
        if head is None:
            continue
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if not isinstance(head, nn.Linear) else [head]
        if linears:
            setattr(model, attribute, nn.Identity())
            return linears[0].in_features
    raise BackboneError(f"cannot find the classifier of {type(model).__name__} to turn it into a feature extractor")
