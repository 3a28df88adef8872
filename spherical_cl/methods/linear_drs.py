"""The original linear drift-resistant space of LoRA⁻ (Liu & Chang, CVPR 2025), ablation row 1.

For each adapted layer, the uncentred covariance of its input over all tokens is computed
under the LoRA⁻ view. Its leading eigenvectors U, the fewest that reach
``linear_drs.energy`` of the eigenvalue sum, split the input space. With
``linear_drs.subspace=nullspace`` (the default) updates are projected onto the remaining
eigenvectors, P = I − U Uᵀ, as in the Adam-NSCL optimizer the published code builds on
(Wang et al., CVPR 2021), so the adapter barely responds to inputs in the span of the
features under LoRA⁻; ``principal`` uses P = U Uᵀ. With
``linear_drs.normalize_projector`` P is divided by its Frobenius norm (√rank), as the
published code does, which shrinks every step by that factor. The optimizer
wrapper applies P to the Adam *update* of the task's LoRA matrices, A's update (r, d_in)
on the right. With ``linear_drs.project_B`` it also applies P to B's update (d_out, r) on
the left, block by block when d_out is a multiple of d_in (a fused qkv layer). The first task is not
projected. Training uses cross-entropy on a per-task linear head plus the triplet loss
with old prototypes as negatives; prototypes are computed once after each task.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from manifolds import ProjectedOptimizer, TangentPCA
from spherical_cl.errors import ConfigError
from spherical_cl.losses import angular_triplet_loss
from spherical_cl.methods.base import LossOutput, StepInfo, TaskContext
from spherical_cl.methods.seq_lora import SequentialLoRA

logger = logging.getLogger(__name__)


class InputSpaceProjection:
    """Apply a (d_in, d_in) projector to the input side of a LoRA factor.

    ``side="right"`` maps A (r, d_in, ...) to A P; ``side="left"`` maps B (d_out, r, ...)
    to P B on each block of d_in rows. Trailing 1x1 kernel dimensions of convolution
    weights are kept.
    """

    def __init__(self, projector: torch.Tensor, side: str) -> None:
        self.projector = projector
        self.side = side

    def __call__(self, update: torch.Tensor) -> torch.Tensor:
        shape = update.shape
        matrix = update.reshape(shape[0], shape[1])
        projector = self.projector.to(device=update.device, dtype=torch.float32)
        if self.side == "right":
            projected = matrix.float() @ projector
        else:
            blocks = matrix.float().reshape(-1, projector.shape[0], matrix.shape[1])
            projected = (projector @ blocks).reshape(matrix.shape)
        return projected.to(update.dtype).reshape(shape)


class LinearDRS(SequentialLoRA):
    """LoRA⁻ with the published per-layer linear drift-resistant space."""

    name = "linear_drs"

    def __init__(self, config, backbone) -> None:
        super().__init__(config, backbone)
        self.linear_heads = nn.ModuleList()
        self.layer_ranks: dict[str, int] = {}
        # The current task's principal basis U (d_in, k) of each layer's input, on the CPU.
        self.layer_bases: dict[str, torch.Tensor] = {}
        self._warned_b: set[str] = set()

    @torch.no_grad()
    def layer_projectors(self, context: TaskContext) -> dict[str, torch.Tensor]:
        """Return P (d_in, d_in) of each adapted layer from its input covariance under LoRA⁻."""
        self.eval()
        layers = self.adapters.layers()
        accumulators: dict[str, TangentPCA] = {}
        handles = []

        def recorder(key: str):
            def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                x = inputs[0]
                tokens = x.movedim(1, -1) if x.ndim == 4 else x  # Conv inputs are (B, C, H, W).
                tokens = tokens.reshape(-1, tokens.shape[-1])
                if key not in accumulators:
                    accumulators[key] = TangentPCA(tokens.shape[1], device=tokens.device)
                accumulators[key].update(tokens)
            return record

        for key, layer in layers.items():
            handles.append(layer.get_base_layer().register_forward_pre_hook(recorder(key)))
        try:
            with self.adapters.subtracted_view():
                for images, _ in context.feature_loader():
                    self.embed(images.to(context.device))
        finally:
            for handle in handles:
                handle.remove()

        settings = self.config.linear_drs
        projectors = {}
        for key, accumulator in accumulators.items():
            # Sums Σ x xᵀ and counts over the ranks' shards (in layer order, the same on every rank).
            if self.dist.enabled:
                accumulator.all_reduce()
            result = accumulator.solve(settings.energy, accumulator.dim)
            basis = result.basis.float()
            self.layer_bases[key] = basis.cpu()
            projector = basis @ basis.t()
            rank = result.k
            if settings.subspace == "nullspace":
                projector = torch.eye(accumulator.dim, device=projector.device) - projector
                rank = accumulator.dim - result.k
            if rank == 0:
                logger.warning("layer %s: the %s subspace is empty; its LoRA update is frozen this task",
                               key, settings.subspace)
            elif settings.normalize_projector:
                projector = projector / projector.norm()
            projectors[key] = projector
            self.layer_ranks[key] = rank
        return projectors

    def start_task(self, context: TaskContext):
        projectors = self.layer_projectors(context) if context.task > 0 else {}
        self.current_classes = context.classes
        lora_parameters = self.adapters.add_task(context.task)
        name = self.adapters.active
        if self.config.linear_drs.kv_only:
            self._freeze_query_rows(name)

        head = nn.Linear(self.backbone.embed_dim, len(context.classes))
        self.linear_heads.append(head)
        for old in self.linear_heads[:-1]:
            old.requires_grad_(False)
        self.to(context.device)
        train = self.config.train
        inner = torch.optim.Adam([
            {"params": lora_parameters, "lr": train.lr, "weight_decay": train.wd},
            {"params": list(head.parameters()), "lr": train.head_lr or train.lr, "weight_decay": train.wd},
        ])

        self.optimizer = ProjectedOptimizer(inner)
        for key, (factor_a, factor_b) in self.adapters.named_factors(name).items():
            if key not in projectors:
                continue
            projector = projectors[key]
            self.optimizer.register(factor_a, InputSpaceProjection(projector, "right"), mode="step")
            if self.config.linear_drs.project_B:
                if factor_b.shape[0] % projector.shape[0] == 0:
                    self.optimizer.register(factor_b, InputSpaceProjection(projector, "left"), mode="step")
                elif key not in self._warned_b:
                    self._warned_b.add(key)
                    logger.warning("layer %s: B has %d rows, not a multiple of d_in=%d; its update is not "
                                   "projected", key, factor_b.shape[0], projector.shape[0])
        return self.optimizer

    def _freeze_query_rows(self, name: str) -> None:
        """Keep the q block of each fused qkv layer's B at zero, so only k and v are adapted."""
        factors = {key: pair for key, pair in self.adapters.named_factors(name).items() if key.endswith("qkv")}
        if not factors:
            raise ConfigError("linear_drs.kv_only needs fused 'qkv' LoRA layers; set it to false for this backbone")
        for factor_a, factor_b in factors.values():
            rows = factor_b.shape[0] // 3

            def zero_query_rows(grad: torch.Tensor, rows: int = rows) -> torch.Tensor:
                grad = grad.clone()
                grad[:rows] = 0
                return grad

            factor_b.register_hook(zero_query_rows)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Return the backbone's raw embeddings (B, D) in float32."""
        return self.backbone_features(images)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo) -> LossOutput:
        features = self.features(images)
        logits = self.linear_heads[-1](features)
        cross_entropy = F.cross_entropy(logits, labels - self.current_classes.start)
        terms = {"ce": cross_entropy.item()}
        batch_loss = None
        loss_config = self.config.loss
        if loss_config.triplet_lambda > 0:
            embeddings = self.dist.gather_rows_with_grad(self.sphere.projx(features))
            triplet = angular_triplet_loss(embeddings, self.dist.gather_rows(labels),
                                           margin=loss_config.triplet_margin, old_prototypes=self.prototypes,
                                           distance=loss_config.triplet_distance)
            batch_loss = loss_config.triplet_lambda * triplet
            terms["triplet"] = triplet.item()
        return LossOutput(cross_entropy, terms, batch_loss)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images)
        logits = torch.cat([head(features) for head in self.linear_heads], dim=1)
        predictions = {"classifier": logits.argmax(dim=1)}
        if len(self.prototypes):
            predictions["ncm"] = (self.sphere.projx(features) @ self.prototypes.t()).argmax(dim=1)
        return predictions

    def task_exports(self) -> dict[str, dict[str, torch.Tensor]]:
        exports = super().task_exports()
        if self.layer_bases:
            exports["U"] = {f"layer/{key}": basis.contiguous() for key, basis in self.layer_bases.items()}
        return exports

    def checkpoint_state(self) -> dict:
        state = super().checkpoint_state()
        state["linear_heads"] = [{key: value.cpu().clone() for key, value in head.state_dict().items()}
                                 for head in self.linear_heads]
        state["layer_bases"] = dict(self.layer_bases)
        return state

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        device = self.prototypes.device
        for saved in state["linear_heads"]:
            head = nn.Linear(saved["weight"].shape[1], saved["weight"].shape[0]).to(device)
            head.load_state_dict(saved)
            head.requires_grad_(False)
            self.linear_heads.append(head)
        self.layer_bases = dict(state["layer_bases"])

    def task_log(self) -> dict[str, float]:
        if not self.layer_ranks:
            return {}
        ranks = list(self.layer_ranks.values())
        return {"layer_rank_mean": sum(ranks) / len(ranks), "layer_rank_max": float(max(ranks))}
