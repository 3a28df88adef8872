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

With ``vae.enabled`` (ablation row 7), the spCauchy-VAE head of :mod:`spherical_cl.vae`
maps the unit embedding to a latent on S^{k−1}. Then :meth:`HypersphericalDRS.embed` returns
the posterior location, and every step above works in the latent space.
"""

from __future__ import annotations

import logging

import geoopt
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from manifolds import TangentPCA, TangentSubspaceProjector
from spherical_cl.checkpoint import CheckpointError
from spherical_cl.errors import ConfigError, DataError
from spherical_cl.heads import ArcFaceHead
from spherical_cl.losses import anneal, angular_triplet_loss
from spherical_cl.methods.base import LossOutput, StepInfo, TaskContext
from spherical_cl.methods.seq_lora import SequentialLoRA
from spherical_cl.prototypes import BasePoints, class_means, estimate_base_points, mean_direction
from spherical_cl.vae import SphericalCauchyVAE

logger = logging.getLogger(__name__)

# Rows per chunk of the log maps in build_tangent_basis: 4096 × D floats per temporary.
TANGENT_CHUNK_ROWS = 4096


class HypersphericalDRS(SequentialLoRA):
    """ArcFace and angular triplet training with the embedding gradient kept in the DRS."""

    name = "drs_sphere"

    def __init__(self, config, backbone) -> None:
        super().__init__(config, backbone)
        self.vae: SphericalCauchyVAE | None = None
        space_dim = backbone.embed_dim
        space_name = f"the embedding size {backbone.embed_dim} of {config.model.backbone}"
        if config.vae.enabled:
            # The head, the prototypes, the base points and U_t all live on the latent sphere.
            space_dim, space_name = config.vae.latent_dim, f"vae.latent_dim={config.vae.latent_dim}"
            self.vae = SphericalCauchyVAE(backbone.embed_dim, space_dim, config.vae.hidden_dim)
            self.head = ArcFaceHead(space_dim)
            self.prototypes = geoopt.ManifoldTensor(torch.empty(0, space_dim), manifold=self.sphere)
        k_max = config.projection.k_max
        if config.projection.use_U and k_max >= space_dim:
            raise ConfigError(
                f"projection.k_max={k_max} must be smaller than {space_name}; "
                f"U_t lives in a tangent space of dimension {space_dim - 1}"
            )
        self.base_points: BasePoints | None = None
        self.tangent_projector = TangentSubspaceProjector()
        self.subspace_projector: TangentSubspaceProjector | None = None
        self.bases: list[dict[str, torch.Tensor]] = []
        # The base points of each finished task after their last EMA step, (P_t, D) on the CPU.
        self.final_base_points: list[torch.Tensor] = []
        self._last_embeddings: torch.Tensor | None = None
        self._task_log: dict[str, float] = {}
        self._last_projector: TangentSubspaceProjector | None = None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Map uint8 images (B, 3, H, W) to the unit vectors the method works on, in float32.

        These are the unit embeddings (B, D), or with the VAE head the posterior locations
        (B, k). Prototypes, base points, U_t, prediction and the drift measure all use them.
        """
        embeddings = super().embed(images)
        if self.vae is None:
            return embeddings
        return self.vae.encode_location(embeddings)

    # Drift-resistant space ------------------------------------------------------------

    @torch.no_grad()
    def collect_subtracted_embeddings(self, context: TaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward up to ``projection.max_vectors`` training images under LoRA⁻; return (X, y).

        The embeddings are held in memory only while the DRS is built (at most
        max_vectors × D floats) and dropped when the task starts training. With several
        ranks, each forwards its shard (a :class:`~torch.utils.data.Subset` over a range)
        and the kept rows are gathered in sample order, so every rank builds the same DRS.
        """
        self.eval()
        loader = context.feature_loader()
        dataset = loader.dataset
        shard = dataset.indices if isinstance(dataset, Subset) else range(len(dataset))
        total = len(dataset.dataset) if isinstance(dataset, Subset) else len(dataset)
        cap = self.config.projection.max_vectors
        keep = None
        if cap < total:
            # The sample is drawn over the whole task, so it does not depend on the number of ranks.
            generator = torch.Generator().manual_seed(self.config.seed + context.task)
            keep = torch.zeros(total, dtype=torch.bool)
            keep[torch.randperm(total, generator=generator)[:cap]] = True
            keep = keep[shard.start:shard.stop]
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
        if not embeddings:
            embeddings.append(torch.empty(0, self.head.embed_dim, device=context.device))
            labels.append(torch.empty(0, dtype=torch.long, device=context.device))
        return self.dist.gather_rows(torch.cat(embeddings)), self.dist.gather_rows(torch.cat(labels))

    def build_tangent_basis(self, embeddings: torch.Tensor, base_points: BasePoints,
                            labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Return (U_t (D, k), its base point m̄ (D,), captured energy) from the task's embeddings.

        Each v_i = log_μ(x̂_i) lives in the tangent space at the sample's own base point,
        so the vectors are parallel-transported to m̄, the mean direction of the base
        points, before Σ v vᵀ is pooled. The maps run on chunks of rows, because on all N
        rows at once their temporaries take about 20 times the memory of the embeddings.
        """
        projection = self.config.projection
        points = base_points.points
        center = mean_direction(points)
        pca = TangentPCA(embeddings.shape[1], device=embeddings.device)
        for rows, row_labels in zip(embeddings.split(TANGENT_CHUNK_ROWS), labels.split(TANGENT_CHUNK_ROWS)):
            mu = points[base_points.assign(rows, row_labels)]
            pca.update(self.sphere.transp(mu, center.expand_as(mu), self.sphere.logmap(mu, rows)))
        try:
            result = pca.solve(projection.pca_energy, projection.k_max, base_point=center)
        except ValueError as error:
            # Every sample sits on its base point, e.g. one image per class with per-class prototypes.
            raise DataError(
                f"cannot build U_t from {len(embeddings)} embeddings ({error}); use more images per class "
                "(data.max_train_per_class), fewer base points (prototypes.mode=global), or projection.use_U=false"
            ) from None
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
        optimizer = super().start_task(context)
        if self.vae is not None:
            # Each task's optimizer trains the encoder and decoder along with the new adapter.
            optimizer.add_param_group({"params": list(self.vae.parameters()), "lr": self.config.vae.lr,
                                       "weight_decay": self.config.train.wd})
        return optimizer

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
        posterior = None
        if self.vae is None:
            embeddings = self.embed(images)
        else:
            features = super().embed(images)
            posterior = self.vae.posterior(features)
            # The hook below goes on the location, which every latent sample is computed from.
            embeddings = posterior.loc
        projector = self.projector_for(step)
        if projector is not None and embeddings.requires_grad:
            # The hook sits on the unit embedding that is still connected to the backbone,
            # so the projected gradient is what reaches the LoRA weights.
            mu = self.base_points.points[self.base_points.assign(embeddings, labels)]
            embeddings.register_hook(projector.hook(mu))
        self._last_projector = projector
        self._last_embeddings = embeddings.detach()
        # Training draws the latent from the posterior; evaluation uses its location (embed).
        latent = embeddings if posterior is None else posterior.rsample()

        scale, margin = self.scale_and_margin(step)
        logits = self.head.logits(latent, labels, scale=scale, margin=margin)
        if loss_config.ce_classes == "current":
            classes = self.current_classes
            logits, targets = logits[:, classes.start:classes.stop], labels - classes.start
        else:
            targets = labels
        smoothing = loss_config.label_smoothing if step.phase == "warmup" else 0.0
        cross_entropy = F.cross_entropy(logits, targets, label_smoothing=smoothing)
        terms = {"ce": cross_entropy.item(), "s": scale, "m": margin}
        loss = cross_entropy
        batch_loss = None
        if posterior is not None:
            vae_losses = self.vae.losses(posterior, latent, features)
            loss = loss + self.config.vae.beta * (vae_losses.reconstruction + vae_losses.kl)
            terms.update({"reconstruction": vae_losses.reconstruction.item(), "kl": vae_losses.kl.item(),
                          "rho": posterior.rho.mean().item()})
        if step.phase == "main" and loss_config.triplet_lambda > 0:
            # Batch-hard mining looks at the whole global batch, whatever the number of ranks.
            triplet = angular_triplet_loss(self.dist.gather_rows_with_grad(latent), self.dist.gather_rows(labels),
                                           margin=loss_config.triplet_margin, old_prototypes=self.prototypes,
                                           distance=loss_config.triplet_distance)
            batch_loss = loss_config.triplet_lambda * triplet
            terms["triplet"] = triplet.item()
        return LossOutput(loss, terms, batch_loss)

    def after_step(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo) -> dict[str, float]:
        stats = {}
        if self._last_projector is not None and self._last_projector.last_ratio is not None:
            stats["proj_ratio"] = float(self._last_projector.last_ratio)
        if self.config.prototypes.ema:
            # The step's own embeddings (before the update), so EMA costs no extra forward pass.
            # They are gathered over ranks, so the batch means are those of the global batch.
            self.base_points.ema_update(self.dist.gather_rows(self._last_embeddings), self.dist.gather_rows(labels),
                                        self.config.train.ema_momentum)
        return stats

    def end_task(self, context: TaskContext) -> None:
        self.final_base_points.append(self.base_points.points.detach().cpu().clone())
        super().end_task(context)
        self.base_points = None
        self.subspace_projector = None

    def task_log(self) -> dict[str, float]:
        return dict(self._task_log)

    def task_exports(self) -> dict[str, dict[str, torch.Tensor]]:
        exports = super().task_exports()
        exports["prototypes"]["base_points"] = self.final_base_points[-1]
        if self.bases:
            exports["U"] = {key: value.contiguous() for key, value in self.bases[-1].items()}
        return exports

    def checkpoint_state(self) -> dict:
        state = super().checkpoint_state()
        state["bases"] = [dict(basis) for basis in self.bases]
        state["final_base_points"] = list(self.final_base_points)
        if self.vae is not None:
            state["vae"] = {key: value.cpu().clone() for key, value in self.vae.state_dict().items()}
        return state

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        self.bases = [dict(basis) for basis in state["bases"]]
        self.final_base_points = list(state["final_base_points"])
        if self.vae is not None:
            if "vae" not in state:
                raise CheckpointError("the checkpoint has no spCauchy-VAE head but vae.enabled is true")
            self.vae.load_state_dict(state["vae"])
