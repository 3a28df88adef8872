"""Per-task LoRA adapters through peft, folding of finished tasks, and the LoRA⁻ view.

Task t trains its own adapter ``task_<t>`` (ΔW_t = scaling · B_t A_t) on the frozen
backbone. When task t ends, ΔW_t is added into the base weights once, so a training step
at task 50 costs what it costs at task 1: the base weight of an adapted layer is always
W₀ + Σ_{j<t} ΔW_j, and only the current adapter runs as a separate branch. The finished
adapters stay in the peft layers (inactive and frozen) so their deltas can be recomputed.

The LoRA⁻ view needs W̃ = W₀ − Σ_{j<t} ΔW_j. :meth:`TaskAdapters.subtracted_view` swaps
that weight in and swaps the original tensor object back afterwards, so the restore is
exact rather than a subtraction undone by an addition.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from typing import Iterator

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from spherical_cl.errors import ConfigError

logger = logging.getLogger(__name__)


def adapter_name(task: int) -> str:
    """Return the peft adapter name of 0-based task ``task`` (``task_1`` for the first task)."""
    return f"task_{task + 1}"


class TaskAdapters:
    """The LoRA adapters of every task on one backbone module, keyed by adapter name.

    Args:
        model: the frozen backbone module; adapters are injected into it in place.
        targets: peft ``target_modules``: module-name suffixes, or one regex string.
        rank, alpha, dropout: LoRA hyper-parameters shared by every task.
    """

    def __init__(self, model: nn.Module, targets: list[str] | tuple[str, ...] | str, *, rank: int,
                 alpha: float, dropout: float = 0.0) -> None:
        self.model = model
        self.lora_config = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=dropout,
            target_modules=list(targets) if not isinstance(targets, str) else targets,
        )
        self.names: list[str] = []
        self.folded: list[str] = []

    @property
    def active(self) -> str | None:
        """Name of the adapter being trained, or None between tasks."""
        unfolded = [name for name in self.names if name not in self.folded]
        return unfolded[-1] if unfolded else None

    def check_targets(self) -> None:
        """Raise ConfigError unless the target names select at least one module of the model.

        The rule follows peft: a list entry matches a module whose name equals it or ends
        with ``.entry``, and a string is a regex that must match the whole name.
        """
        targets = self.lora_config.target_modules
        if not isinstance(targets, str):
            targets = sorted(targets)  # peft stores a list as a set.
        names = [name for name, _ in self.model.named_modules() if name]
        if isinstance(targets, str):
            matched = [name for name in names if re.fullmatch(targets, name)]
        else:
            matched = [name for name in names if any(name == t or name.endswith(f".{t}") for t in targets)]
        if not matched:
            leaves = sorted({name.rsplit(".", 1)[-1] for name, module in self.model.named_modules()
                             if isinstance(module, (nn.Linear, nn.Conv2d))})
            raise ConfigError(
                f"model.lora_targets={targets!r} matches no module of the backbone; linear and convolution "
                f"modules end in: {', '.join(leaves[:12])}"
            )

    def layers(self) -> dict[str, LoraLayer]:
        """Return the adapted layers by module name."""
        return {name: module for name, module in self.model.named_modules() if isinstance(module, LoraLayer)}

    def add_task(self, task: int) -> list[nn.Parameter]:
        """Inject task ``task``'s adapter, make it the only active one and return its parameters.

        Raises:
            ConfigError: no module of the backbone matches the target names.
            RuntimeError: the previous task's adapter was not folded yet.
        """
        if self.active is not None:
            raise RuntimeError(f"adapter {self.active!r} is still active; call fold_active() before adding a task")
        name = adapter_name(task)
        with warnings.catch_warnings():
            # peft warns that a non-transformers model has no config; that is expected here.
            warnings.filterwarnings("ignore", message=".*config.*", category=UserWarning)
            try:
                inject_adapter_in_model(self.lora_config, self.model, adapter_name=name)
            except ValueError as error:
                reason = str(error).strip().rstrip(".")
                raise ConfigError(
                    f"cannot add LoRA to model.lora_targets={self.lora_config.target_modules!r}: {reason}; "
                    "set model.lora_targets to the names of linear or 1x1 convolution modules, such as 'qkv'"
                ) from None
        self.names.append(name)
        for layer in self.layers().values():
            layer.set_adapter([name])
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        parameters = self.parameters(name)
        for parameter in parameters:
            parameter.requires_grad_(True)
        return parameters

    def parameters(self, name: str) -> list[nn.Parameter]:
        """Return the LoRA A and B weights of adapter ``name`` in a fixed layer order."""
        found = []
        for layer in self.layers().values():
            found += [layer.lora_A[name].weight, layer.lora_B[name].weight]
        return found

    def named_factors(self, name: str) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        """Return ``{layer name: (A, B)}`` of adapter ``name``; A is (r, d_in), B is (d_out, r)."""
        return {key: (layer.lora_A[name].weight, layer.lora_B[name].weight) for key, layer in self.layers().items()}

    @torch.no_grad()
    def fold_active(self) -> None:
        """Add the active adapter's ΔW into the base weights and deactivate it.

        Raises:
            FloatingPointError: ΔW of some layer contains NaN or Inf. Nothing is changed then.
        """
        name = self.active
        if name is None:
            return
        layers = self.layers()
        deltas = {key: layer.get_delta_weight(name) for key, layer in layers.items()}
        for key, delta in deltas.items():
            bad = (~torch.isfinite(delta)).sum().item()
            if bad:
                raise FloatingPointError(
                    f"adapter {name!r} of layer {key} has {bad} non-finite entries in ΔW; refusing to fold it"
                )
        for key, layer in layers.items():
            base = layer.get_base_layer()
            base.weight.add_(deltas[key].to(base.weight.dtype))
            layer.set_adapter([])
        self.folded.append(name)

    @torch.no_grad()
    def delta_sum(self, key: str, names: list[str]) -> torch.Tensor | None:
        """Return Σ ΔW of adapters ``names`` at layer ``key``, or None for an empty list."""
        layer = self.layers()[key]
        total = None
        for name in names:
            delta = layer.get_delta_weight(name)
            total = delta if total is None else total + delta
        return total

    @contextlib.contextmanager
    def subtracted_view(self) -> Iterator[None]:
        """View the backbone with W₀ − Σ ΔW over the folded adapters, then restore it exactly.

        The base weights hold W₀ + Σ ΔW, so the view weight is base − 2 Σ ΔW. The active
        adapter is switched off inside the view. With no folded adapter this is W₀ itself.
        """
        layers = self.layers()
        saved: dict[str, tuple[torch.Tensor, list[str]]] = {}
        try:
            with torch.no_grad():
                for key, layer in layers.items():
                    base = layer.get_base_layer()
                    saved[key] = (base.weight.data, list(layer.active_adapters))
                    layer.set_adapter([])
                    delta = self.delta_sum(key, self.folded)
                    if delta is not None:
                        base.weight.data = base.weight.data - 2.0 * delta.to(base.weight.dtype)
            yield
        finally:
            for key, (weight, active) in saved.items():
                layer = layers[key]
                layer.get_base_layer().weight.data = weight
                layer.set_adapter(active)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return every adapter's A and B weights, keyed ``layer/adapter/A`` and ``.../B``."""
        state = {}
        for key, layer in self.layers().items():
            for name in self.names:
                state[f"{key}/{name}/A"] = layer.lora_A[name].weight.detach().clone()
                state[f"{key}/{name}/B"] = layer.lora_B[name].weight.detach().clone()
        return state

    def checkpoint_state(self) -> dict:
        """Return the adapter names, which are folded, and every A and B weight on the CPU."""
        return {"names": list(self.names), "folded": list(self.folded),
                "factors": {key: value.cpu() for key, value in self.state_dict().items()}}

    @torch.no_grad()
    def load_checkpoint_state(self, state: dict) -> None:
        """Re-create the adapters of :meth:`checkpoint_state` on a backbone with its original weights.

        Each adapter is injected, given its saved A and B, and folded in the original order,
        so the base weights are rebuilt by the same operations as in the interrupted run.

        Raises:
            ValueError: adapters exist already, or a saved factor is missing or has another shape.
        """
        if self.names:
            raise ValueError(f"cannot load adapters into a model that already has {self.names}")
        factors = state["factors"]
        for name in state["names"]:
            self.add_task(int(name.rsplit("_", 1)[1]) - 1)
            for key, (factor_a, factor_b) in self.named_factors(name).items():
                for label, parameter in (("A", factor_a), ("B", factor_b)):
                    saved = factors.get(f"{key}/{name}/{label}")
                    if saved is None or saved.shape != parameter.shape:
                        found = "missing" if saved is None else f"shape {tuple(saved.shape)}"
                        raise ValueError(f"LoRA factor {key}/{name}/{label} is {found}; the model expects shape "
                                         f"{tuple(parameter.shape)}")
                    parameter.copy_(saved)
            if name in state["folded"]:
                self.fold_active()

