"""Frozen nearest class mean (SimpleCIL): no training, prototypes of the frozen backbone."""

from __future__ import annotations

import geoopt
import torch

from spherical_cl.methods.base import TaskContext
from spherical_cl.methods.seq_lora import SequentialLoRA


class NearestClassMean(SequentialLoRA):
    """Predict the class whose normalised mean embedding under the frozen backbone is nearest.

    In pre-trained-model CIL this is the baseline every method must clearly beat
    (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models", 2023).
    """

    name = "ncm"
    trains_adapters = False

    def start_task(self, context: TaskContext) -> None:
        """Train nothing; the trainer skips the epochs when no optimizer is returned."""
        self.current_classes = context.classes
        self.to(context.device)
        return None

    def end_task(self, context: TaskContext) -> None:
        new = self.estimate_prototypes(context)
        self.prototypes = geoopt.ManifoldTensor(torch.cat([self.prototypes.to(new.device), new]),
                                                manifold=self.sphere)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        embeddings = self.embed(images)
        return {"ncm": (embeddings @ self.prototypes.t()).argmax(dim=1)}
