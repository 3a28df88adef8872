"""The contract between an incremental learner and the trainer that drives it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import DataLoader


@dataclass
class TaskContext:
    """The task a learner starts or ends, and access to its data.

    Attributes:
        task: 0-based task index.
        num_tasks: number of tasks in the experiment.
        classes: model labels introduced by this task.
        seen: model labels of every class seen up to and including this task.
        feature_loader: builds a loader over this task's training images with test-time
            transforms, for passes that estimate statistics (prototypes, subspaces).
        device: where the learner's modules live.
    """

    task: int
    num_tasks: int
    classes: range
    seen: range
    feature_loader: Callable[[], DataLoader]
    device: torch.device


@dataclass
class StepInfo:
    """The position of a training step: its task, epoch, the task's epoch count and phase."""

    task: int
    epoch: int
    num_epochs: int
    phase: str = "main"

    @property
    def progress(self) -> float:
        """Fraction of the task's epochs finished before this one, in [0, 1]."""
        return self.epoch / max(self.num_epochs - 1, 1)


@dataclass
class LossOutput:
    """The loss to back-propagate and each of its terms as floats for the log.

    Attributes:
        loss: the mean over this process's samples of the per-sample terms. With several
            ranks the trainer weights it by the rank's share of the global batch.
        terms: each term as a float, for the log.
        batch_loss: a term computed over the whole global batch (the same value on every
            rank), such as the batch-hard triplet loss; added without weighting.
    """

    loss: torch.Tensor
    terms: dict[str, float] = field(default_factory=dict)
    batch_loss: torch.Tensor | None = None
