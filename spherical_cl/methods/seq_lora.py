"""Sequential LoRA: each task trains its own adapter and head block, with no drift control.

This is the lower bound of every table (ablation row 0) and the base class of the other
learners, which override the hooks it defines: :meth:`start_task`, :meth:`training_loss`,
:meth:`after_step`, :meth:`end_task` and :meth:`predict`.
"""

from __future__ import annotations

import logging

import geoopt
import torch
import torch.nn.functional as F
from torch import nn

from manifolds import Sphere
from spherical_cl.backbones import Backbone
from spherical_cl.config import ExperimentConfig
from spherical_cl.data import BatchPreprocessor
from spherical_cl.distributed import DistributedContext
from spherical_cl.checkpoint import CheckpointError
from spherical_cl.errors import ConfigError
from spherical_cl.features import class_mean_directions
from spherical_cl.heads import ArcFaceHead
from spherical_cl.lora import TaskAdapters
from spherical_cl.methods.base import LossOutput, StepInfo, TaskContext

logger = logging.getLogger(__name__)


class SequentialLoRA(nn.Module):
    """Per-task LoRA adapters and a cosine head trained by cross-entropy on the task's classes.

    The head's scale is ``loss.s_end`` and its margin 0. After each task the adapter is
    folded into the backbone and the task's class prototypes (normalised class means under
    the final weights) are stored for nearest-prototype prediction.
    """

    name = "seq_lora"
    trains_adapters = True

    def __init__(self, config: ExperimentConfig, backbone: Backbone) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        spec = backbone.input_spec
        self.preprocess = BatchPreprocessor(spec.input_size, spec.mean, spec.std)
        targets = config.model.lora_targets or backbone.spec.lora_targets
        if not targets and self.trains_adapters:
            raise ConfigError(f"backbone {config.model.backbone!r} has no default LoRA targets; set model.lora_targets")
        self.adapters = TaskAdapters(backbone.model, targets, rank=config.model.lora_rank,
                                     alpha=config.model.lora_alpha, dropout=config.model.lora_dropout)
        if self.trains_adapters:
            self.adapters.check_targets()
        self.sphere = Sphere()
        self.head = ArcFaceHead(backbone.embed_dim)
        self.prototypes = geoopt.ManifoldTensor(torch.empty(0, backbone.embed_dim), manifold=self.sphere)
        self.optimizer: torch.optim.Optimizer | None = None
        self.current_classes = range(0)
        # The trainer replaces these: the ranks of a distributed run and the autocast dtype.
        self.dist = DistributedContext()
        self.autocast_dtype: torch.dtype | None = None
        # Stored outside the module tree, so the backbone's parameters are not listed twice.
        self.__dict__["_backbone_forward"] = torch.compile(backbone) if config.train.compile else backbone

    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """Return the backbone's embeddings (B, D) of uint8 images (B, 3, H, W), in float32.

        Only the backbone runs under autocast (bfloat16 on GPUs by default), so the
        geometry, prototypes, statistics and losses downstream stay in float32.
        """
        pixels = self.preprocess(images)
        with torch.autocast(pixels.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            features = self._backbone_forward(pixels)
        return features.float()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Map uint8 images (B, 3, H, W) to unit embeddings (B, D) in float32."""
        return self.sphere.projx(self.backbone_features(images))

    def train(self, mode: bool = True) -> "SequentialLoRA":
        """Set training mode, but keep the frozen backbone in eval mode.

        Batch-norm statistics and dropout of the pre-trained backbone stay as they were
        pre-trained; only the LoRA dropout follows ``mode``.
        """
        super().train(mode)
        self.backbone.eval()
        for layer in self.adapters.layers().values():
            layer.lora_dropout.train(mode)
        return self

    # Task lifecycle -------------------------------------------------------------------

    def start_task(self, context: TaskContext) -> torch.optim.Optimizer:
        """Add the task's adapter and head block and return the optimizer over them."""
        self.current_classes = context.classes
        lora_parameters = self.adapters.add_task(context.task)
        head_block = self.head.add_classes(len(context.classes), init=self.initial_head_weights(context))
        self.to(context.device)
        train = self.config.train
        self.optimizer = geoopt.optim.RiemannianAdam([
            {"params": lora_parameters, "lr": train.lr, "weight_decay": train.wd},
            {"params": [head_block], "lr": train.head_lr or train.lr, "weight_decay": 0.0},
        ])
        return self.optimizer

    def initial_head_weights(self, context: TaskContext) -> torch.Tensor | None:
        """Return the new head block's initial weights, (n_t, D); None means random on the sphere."""
        return None

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo) -> LossOutput:
        """Cross-entropy of the scaled cosine logits over the current task's classes."""
        embeddings = self.embed(images)
        logits = self.head.logits(embeddings, scale=self.config.loss.s_end)
        task_logits = logits[:, self.current_classes.start:self.current_classes.stop]
        loss = F.cross_entropy(task_logits, labels - self.current_classes.start)
        return LossOutput(loss, {"ce": loss.item()})

    def after_step(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo) -> dict[str, float]:
        """Update running statistics after an optimizer step; return extra values for the epoch log."""
        return {}

    def end_task(self, context: TaskContext) -> None:
        """Fold the adapter into the backbone and store the task's class prototypes."""
        self.adapters.fold_active()
        self.optimizer = None
        new = self.estimate_prototypes(context)
        self.prototypes = geoopt.ManifoldTensor(torch.cat([self.prototypes.to(new.device), new]),
                                                manifold=self.sphere)

    def estimate_prototypes(self, context: TaskContext) -> torch.Tensor:
        """Return the normalised class means of the task's classes under the current weights."""
        self.eval()
        return class_mean_directions(self.embed, context.feature_loader(), context.classes, context.device,
                                     reduce=self.dist.all_reduce_sum)

    def task_log(self) -> dict[str, float]:
        """Return per-task values for the log (for example the rank of U_t)."""
        return {}

    def task_exports(self) -> dict[str, dict[str, torch.Tensor]]:
        """Return named groups of tensors to export after a task (see docs/method.md)."""
        return {"prototypes": {"prototypes": self.prototypes.detach().cpu().contiguous()}}

    # Checkpoints ----------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        """Return what the next task needs, as CPU tensors and plain values (see docs/checkpoints.md).

        Called between tasks: every adapter is folded and no optimizer exists.
        """
        return {
            "method": self.name,
            "adapters": self.adapters.checkpoint_state(),
            "head": [plain_tensor(block) for block in self.head.blocks],
            "prototypes": plain_tensor(self.prototypes),
        }

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore :meth:`checkpoint_state` into a learner freshly built from the same config.

        Raises:
            CheckpointError: the checkpoint is of another learner or architecture.
        """
        if state["method"] != self.name:
            raise CheckpointError(f"the checkpoint was written by method {state['method']!r}, not {self.name!r}")
        device = self.prototypes.device
        try:
            self.adapters.load_checkpoint_state(state["adapters"])
            self.head.load_blocks([block.to(device) for block in state["head"]])
        except ValueError as error:
            raise CheckpointError(f"the checkpoint does not fit this model: {error}") from None
        self.prototypes = geoopt.ManifoldTensor(state["prototypes"].to(device), manifold=self.sphere)

    # Prediction -----------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the predicted model label (B,) of each predictor over all seen classes."""
        embeddings = self.embed(images)
        predictions = {"classifier": self.head.cosine(embeddings).argmax(dim=1)}
        if len(self.prototypes):
            # Nearest prototype by geodesic distance is the largest cosine.
            predictions["ncm"] = (embeddings @ self.prototypes.t()).argmax(dim=1)
        return predictions


def plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Return a detached CPU copy as a plain ``torch.Tensor``, which ``weights_only`` loading accepts."""
    return tensor.detach().as_subclass(torch.Tensor).cpu().clone()
