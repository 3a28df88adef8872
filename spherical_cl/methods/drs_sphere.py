"""The drift-resistant space on the hypersphere (ablation rows 2 to 6).

Per task t (see docs/method.md for the equations and the config key of each symbol):

1. Under the LoRA⁻ view W₀ − Σ_{j<t} ΔW_j, forward a seeded sample of the task's training
   images with test-time transforms and normalise the embeddings onto the sphere.
2. Estimate the base points μ from them (per class, one per task, or k-means anchors).
3. Tangent PCA: v_i = log_μ(x̂_i) at each sample's own μ, parallel-transported to the
   task's mean direction m̄, then the smallest basis U_t (D, k) that captures
   ``projection.pca_energy`` of Σ v vᵀ.
4. Train: the gradient at the live unit embedding is projected onto the tangent space at
   the sample's μ (warm-up) and then onto U_t transported to μ (main phase).
5. After each step the base points move by EMA; after the task the class prototypes are
   re-estimated under the final weights.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from manifolds import TangentPCA, TangentSubspaceProjector
from spherical_cl.errors import ConfigError
from spherical_cl.losses import anneal, angular_triplet_loss
from spherical_cl.methods.base import LossOutput, StepInfo, TaskContext
from spherical_cl.methods.seq_lora import SequentialLoRA
from spherical_cl.prototypes import BasePoints, class_means, estimate_base_points, mean_direction

logger = logging.getLogger(__name__)


class HypersphericalDRS(SequentialLoRA):
    """ArcFace and angular triplet training with the embedding gradient kept in the DRS."""

    name = "drs_sphere"

    def __init__(self, config, backbone) -> None:
        super().__init__(config, backbone)
        k_max = config.projection.k_max
        if config.projection.use_U and k_max >= backbone.embed_dim:
            raise ConfigError(
                f"projection.k_max={k_max} must be smaller than the embedding size {backbone.embed_dim} of "
                f"{config.model.backbone}; U_t lives in a tangent space of dimension {backbone.embed_dim - 1}"
            )
        self.base_points: BasePoints | None = None
        self.tangent_projector = TangentSubspaceProjector()
        self.subspace_projector: TangentSubspaceProjector | None = None
        self.bases: list[dict[str, torch.Tensor]] = []
        self._last_embeddings: torch.Tensor | None = None
        self._task_log: dict[str, float] = {}
        self._last_projector: TangentSubspaceProjector | None = None

    # Drift-resistant space ------------------------------------------------------------

    @torch.no_grad()
    def collect_subtracted_embeddings(self, context: TaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward up to ``projection.max_vectors`` training images under LoRA⁻; return (X, y).

        The embeddings are held in memory only while the DRS is built (at most
        max_vectors × D floats) and dropped when the task starts training.
        """
        self.eval()
        loader = context.feature_loader()
        total = len(loader.dataset)
        cap = self.config.projection.max_vectors
        keep = None
        if cap < total:
            generator = torch.Generator().manual_seed(self.config.seed + context.task)
            keep = torch.zeros(total, dtype=torch.bool)
            keep[torch.randperm(total, generator=generator)[:cap]] = True
        embeddings, labels, seen = [], [], 0
        with self.adapters.subtracted_view():
            for images, batch_labels in loader:
                rows = slice(seen, seen + len(batch_labels))
                seen += len(batch_labels)
                if keep is not None:
                    chosen = keep[rows]
                    if not chosen.any():
                        continue
                    images, batch_labels = images[chosen], batch_labels[chosen]
                embeddings.append(self.embed(images.to(context.device)))
                labels.append(batch_labels.to(context.device))
        return torch.cat(embeddings), torch.cat(labels)

    def build_tangent_basis(self, embeddings: torch.Tensor, base_points: BasePoints,
                            labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Return (U_t (D, k), its base point m̄ (D,), captured energy) from the task's embeddings.

        Each v_i = log_μ(x̂_i) lives in the tangent space at the sample's own base point,
        so the vectors are parallel-transported to m̄, the mean direction of the base
        points, before Σ v vᵀ is pooled.
        """
        projection = self.config.projection
        points = base_points.points
        index = base_points.assign(embeddings, labels)
        mu = points[index]
        center = mean_direction(points)
        vectors = self.sphere.transp(mu, center.expand_as(mu), self.sphere.logmap(mu, embeddings))
        pca = TangentPCA(embeddings.shape[1], device=embeddings.device)
        pca.update(vectors)
        result = pca.solve(projection.pca_energy, projection.k_max, base_point=center)
        return result.basis.float(), center, result.energy

    # Task lifecycle -------------------------------------------------------------------

    def start_task(self, context: TaskContext):
        embeddings, labels = self.collect_subtracted_embeddings(context)
        prototypes = self.config.prototypes
        self.base_points = estimate_base_points(
            embeddings, labels, context.classes, mode=prototypes.mode, num_anchors=prototypes.num_anchors,
            min_per_class=prototypes.min_per_class, seed=self.config.seed + context.task,
        )
        self._initial_class_means = class_means(embeddings, labels, context.classes)
        self._task_log = {"base_points": float(len(self.base_points.points))}
        self.subspace_projector = None
        if self.config.projection.use_U:
            basis, center, energy = self.build_tangent_basis(embeddings, self.base_points, labels)
            self.subspace_projector = TangentSubspaceProjector(basis, center)
            self.bases.append({"U": basis.cpu(), "base_point": center.cpu(), "energy": torch.tensor(energy)})
            self._task_log.update({"k": float(basis.shape[1]), "energy": energy})
            logger.info("task %d: U_t has rank %d and captures %.3f of the tangent energy",
                        context.task + 1, basis.shape[1], energy)
        return super().start_task(context)

    def initial_head_weights(self, context: TaskContext) -> torch.Tensor:
        """New class weights start at the class means under LoRA⁻, which are on the sphere."""
        return self._initial_class_means

    def projector_for(self, step: StepInfo) -> TangentSubspaceProjector | None:
        """Return the projector of this phase: tangent only in warm-up, tangent then U_t in the main phase."""
        if not self.config.projection.enabled:
            return None
        if step.phase == "main" and self.subspace_projector is not None:
            return self.subspace_projector
        return self.tangent_projector

    def scale_and_margin(self, step: StepInfo) -> tuple[float, float]:
        """Return ArcFace's (s, m) at this epoch."""
        loss = self.config.loss
        return (anneal(loss.s_start, loss.s_end, step.progress, loss.anneal),
                anneal(loss.m_start, loss.m_end, step.progress, loss.anneal))

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo) -> LossOutput:
        loss_config = self.config.loss
        embeddings = self.embed(images)
        projector = self.projector_for(step)
        if projector is not None and embeddings.requires_grad:
            # The hook sits on the unit embedding that is still connected to the backbone,
            # so the projected gradient is what reaches the LoRA weights.
            mu = self.base_points.points[self.base_points.assign(embeddings, labels)]
            embeddings.register_hook(projector.hook(mu))
        self._last_projector = projector
        self._last_embeddings = embeddings.detach()

        scale, margin = self.scale_and_margin(step)
        logits = self.head.logits(embeddings, labels, scale=scale, margin=margin)
        if loss_config.ce_classes == "current":
            classes = self.current_classes
            logits, targets = logits[:, classes.start:classes.stop], labels - classes.start
        else:
            targets = labels
        smoothing = loss_config.label_smoothing if step.phase == "warmup" else 0.0
        cross_entropy = F.cross_entropy(logits, targets, label_smoothing=smoothing)
        terms = {"ce": cross_entropy.item(), "s": scale, "m": margin}
        loss = cross_entropy
        if step.phase == "main" and loss_config.triplet_lambda > 0:
            triplet = angular_triplet_loss(embeddings, labels, margin=loss_config.triplet_margin,
                                           old_prototypes=self.prototypes, distance=loss_config.triplet_distance)
            loss = loss + loss_config.triplet_lambda * triplet
            terms["triplet"] = triplet.item()
        return LossOutput(loss, terms)

    def after_step(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo) -> dict[str, float]:
        stats = {}
        if self._last_projector is not None and self._last_projector.last_ratio is not None:
            stats["proj_ratio"] = float(self._last_projector.last_ratio)
        if self.config.prototypes.ema:
            # The step's own embeddings (before the update), so EMA costs no extra forward pass.
            self.base_points.ema_update(self._last_embeddings, labels, self.config.train.ema_momentum)
        return stats

    def end_task(self, context: TaskContext) -> None:
        super().end_task(context)
        self.base_points = None
        self.subspace_projector = None

    def task_log(self) -> dict[str, float]:
        return dict(self._task_log)

    def task_exports(self) -> dict[str, dict[str, torch.Tensor]]:
        exports = super().task_exports()
        if self.bases:
            exports["U"] = {key: value.contiguous() for key, value in self.bases[-1].items()}
        return exports
