"""The task loop: train each task, evaluate on every class seen so far, record metrics.

The trainer owns loops, devices, logging and timing; the learner (see
:mod:`spherical_cl.methods`) owns the model, the losses and the per-task estimates.
"""

from __future__ import annotations

import logging
import math
import random
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from spherical_cl.config import ExperimentConfig
from spherical_cl.data import IncrementalData
from spherical_cl.errors import ConfigError
from spherical_cl.features import class_mean_directions
from spherical_cl.methods.base import StepInfo, TaskContext
from spherical_cl.metrics import summarize
from spherical_cl.results import RunWriter

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient became NaN or Inf; the message names where and what to try."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """Return the device for ``train.device``: 'auto' picks CUDA when available, else CPU.

    Raises:
        ConfigError: the name is not a device, or it names CUDA on a machine without it.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"invalid train.device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use train.device=cpu or auto")
    return device


def peak_memory_mb(device: torch.device) -> float:
    """Return the peak GPU memory allocated on CUDA, else the peak resident memory of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class EvaluationResult:
    """Accuracy per task's classes (percent) of each predictor, and the sample counts."""

    per_task: dict[str, list[float]]
    counts: list[int]
    overall: dict[str, float] = field(default_factory=dict)


class IncrementalTrainer:
    """Runs a class-incremental experiment for one learner on one :class:`IncrementalData`."""

    def __init__(self, config: ExperimentConfig, learner, data: IncrementalData, writer: RunWriter,
                 device: torch.device) -> None:
        self.config = config
        self.learner = learner.to(device)
        self.data = data
        self.writer = writer
        self.device = device
        self.split = data.class_split
        self.task_of_label = torch.as_tensor(self.split.task_of_label(), device=device)
        # None lets tqdm hide the bars when stderr is not a terminal, so logs stay readable.
        self._progress_disabled = None if config.logging.progress else True
        self._drift_reference: list[torch.Tensor] = []

    # Loaders --------------------------------------------------------------------------

    def _loader(self, dataset, *, shuffle: bool, batch_size: int, seed_offset: int = 0) -> DataLoader:
        generator = torch.Generator().manual_seed(self.config.seed + seed_offset)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          num_workers=self.config.data.num_workers, pin_memory=self.device.type == "cuda",
                          drop_last=False, persistent_workers=False)

    def _context(self, task: int) -> TaskContext:
        batch = self.config.train.eval_batch_size
        return TaskContext(
            task=task,
            num_tasks=self.split.num_tasks,
            classes=self.split.task_classes(task),
            seen=self.split.seen_classes(task),
            feature_loader=lambda: self._loader(self.data.train_set(task, augment=False), shuffle=False,
                                                batch_size=batch),
            device=self.device,
        )

    # Main loop ------------------------------------------------------------------------

    def run(self) -> dict:
        """Train and evaluate every task; return the metrics written to ``metrics.json``."""
        seed_everything(self.config.seed)
        rows: dict[str, list[list[float]]] = {}
        runtimes: list[float] = []
        counts: list[int] = []
        drifts: list[float | None] = []
        for task in range(self.split.num_tasks):
            started = time.perf_counter()
            context = self._context(task)
            self.train_task(context)
            result = self.evaluate(task)
            runtimes.append(time.perf_counter() - started)
            drifts.append(self.measure_drift(task))
            self._export(task)
            counts = result.counts
            for name, accuracies in result.per_task.items():
                rows.setdefault(name, []).append(accuracies + [math.nan] * (self.split.num_tasks - task - 1))
            self.writer.log({"type": "task", "task": task + 1, "accuracy": result.overall,
                             "accuracy_per_task": result.per_task, "geodesic_drift": drifts[-1],
                             "runtime_s": runtimes[-1], "peak_memory_mb": peak_memory_mb(self.device),
                             **self.learner.task_log()})
            logger.info("task %d/%d done in %.1f s: %s", task + 1, self.split.num_tasks, runtimes[-1],
                        ", ".join(f"{k} {v:.2f}%" for k, v in result.overall.items()))
        return self._metrics(rows, counts, runtimes, drifts)

    def _export(self, task: int) -> None:
        exports = self.learner.task_exports()
        logging_config = self.config.logging
        if logging_config.save_prototypes and "prototypes" in exports:
            classes = torch.as_tensor(self.split.class_order[: self.split.seen_classes(task).stop])
            self.writer.export(task, "prototypes", {**exports["prototypes"], "class_ids": classes})
        if logging_config.save_U and "U" in exports:
            self.writer.export(task, "U", exports["U"])

    @torch.no_grad()
    def measure_drift(self, task: int) -> float | None:
        """Return the mean geodesic drift of old classes' prototypes after ``task``, in radians.

        Drift of class c is d(μ_c at the end of its own task, μ_c under the current weights),
        both estimated on the same seeded subset of c's training images. This reads old
        classes' data for evaluation only; nothing computed here reaches the learner.
        """
        per_class = self.config.eval.drift_samples_per_class
        if per_class == 0:
            return None
        self.learner.eval()

        def class_means_of(owner: int) -> torch.Tensor:
            dataset = self.data.train_set(owner, augment=False, max_per_class=per_class, seed=self.config.seed)
            loader = self._loader(dataset, shuffle=False, batch_size=self.config.train.eval_batch_size)
            return class_mean_directions(self.learner.embed, loader, self.split.task_classes(owner), self.device)

        self._drift_reference.append(class_means_of(task))
        if task == 0:
            return None
        current = torch.cat([class_means_of(owner) for owner in range(task)])
        reference = torch.cat(self._drift_reference[:task])
        return float(self.learner.sphere.dist(current, reference).mean())

    def _metrics(self, rows: dict[str, list[list[float]]], counts: list[int], runtimes: list[float],
                 drifts: list[float | None]) -> dict:
        predictors = {name: summarize(matrix, counts) for name, matrix in rows.items()}
        headline = self.config.eval.headline if self.config.eval.headline in predictors else next(iter(predictors))
        metrics = dict(predictors[headline])
        metrics.update({
            "headline": headline,
            "predictors": predictors,
            "classes_per_task": [list(self.split.class_order[r.start:r.stop])
                                 for r in map(self.split.task_classes, range(self.split.num_tasks))],
            "test_counts": counts,
            "runtime_s": runtimes,
            "geodesic_drift": drifts,
            "stability_gap": [None if old is None else old - new
                              for old, new in zip(metrics["a_old"], metrics["a_new"])],
            "peak_memory_mb": peak_memory_mb(self.device),
            "method": self.learner.name,
            "seed": self.config.seed,
        })
        return metrics

    def train_task(self, context: TaskContext) -> None:
        """Run the learner's start hook, every epoch of the task, then its end hook."""
        optimizer = self.learner.start_task(context)
        if optimizer is None:
            # A learner without trainable parameters (nearest class mean) only estimates.
            self.learner.end_task(context)
            return
        train = self.config.train
        loader = self._loader(self.data.train_set(context.task), shuffle=True, batch_size=train.batch_size,
                              seed_offset=1000 * (context.task + 1))
        num_epochs = train.epochs_warm + train.epochs_main
        epochs = tqdm(range(num_epochs), desc=f"task {context.task + 1}/{context.num_tasks}", unit="epoch",
                      disable=self._progress_disabled, leave=False)
        for epoch in epochs:
            phase = "warmup" if epoch < train.epochs_warm else "main"
            step = StepInfo(task=context.task, epoch=epoch, num_epochs=num_epochs, phase=phase)
            started = time.perf_counter()
            terms = self.train_epoch(loader, optimizer, step)
            record = {"type": "epoch", "task": context.task + 1, "epoch": epoch + 1, "phase": phase,
                      **terms, "time_s": time.perf_counter() - started}
            interval = self.config.logging.eval_interval
            if interval and (epoch + 1) % interval == 0 and epoch + 1 < num_epochs:
                record["accuracy"] = self.evaluate(context.task).overall
            epochs.set_postfix(loss=f"{terms['loss']:.3f}")
            self.writer.log(record)
        self.learner.end_task(context)

    def train_epoch(self, loader: DataLoader, optimizer: torch.optim.Optimizer, step: StepInfo) -> dict[str, float]:
        """Train one epoch and return the mean of each loss term."""
        self.learner.train()
        totals: dict[str, float] = {}
        batches = 0
        bar = tqdm(loader, desc=f"epoch {step.epoch + 1}/{step.num_epochs}", unit="batch",
                   disable=self._progress_disabled, leave=False)
        for batch_index, (images, labels) in enumerate(bar):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            output = self.learner.training_loss(images, labels, step)
            optimizer.zero_grad(set_to_none=True)
            self._check_finite(output.loss, output.terms, step, batch_index)
            output.loss.backward()
            self._check_gradients(optimizer, output.terms, step, batch_index)
            if self.config.train.grad_clip is not None:
                parameters = [p for group in optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(parameters, self.config.train.grad_clip)
            optimizer.step()
            extra = self.learner.after_step(images, labels, step)
            terms = {"loss": output.loss.item(), **output.terms, **extra}
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value
            batches += 1
        return {key: value / max(batches, 1) for key, value in totals.items()}

    def _check_finite(self, loss: torch.Tensor, terms: dict, step: StepInfo, batch_index: int) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(self._non_finite_message("loss", terms, step, batch_index))

    def _check_gradients(self, optimizer, terms: dict, step: StepInfo, batch_index: int) -> None:
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None and not torch.isfinite(parameter.grad).all():
                    raise NonFiniteLossError(self._non_finite_message("gradient", terms, step, batch_index))

    @staticmethod
    def _non_finite_message(what: str, terms: dict, step: StepInfo, batch_index: int) -> str:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        return (
            f"non-finite {what} in task {step.task + 1}, epoch {step.epoch + 1}, step {batch_index + 1} "
            f"({shown}); try a lower train.lr, a longer warm-up (train.epochs_warm), a smaller loss.m_end, "
            "label smoothing (loss.label_smoothing) or train.grad_clip"
        )

    # Evaluation -----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, task: int) -> EvaluationResult:
        """Return each predictor's accuracy on the test classes of every task up to ``task``."""
        self.learner.eval()
        loader = self._loader(self.data.test_set(task), shuffle=False, batch_size=self.config.train.eval_batch_size)
        correct: dict[str, torch.Tensor] = {}
        totals = torch.zeros(task + 1, dtype=torch.long, device=self.device)
        for images, labels in tqdm(loader, desc="evaluate", unit="batch", disable=self._progress_disabled,
                                   leave=False):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            owner = self.task_of_label[labels]
            totals += torch.bincount(owner, minlength=task + 1)
            for name, predicted in self.learner.predict(images).items():
                hits = torch.bincount(owner[predicted == labels], minlength=task + 1)
                correct[name] = correct.get(name, torch.zeros_like(totals)) + hits
        counts = totals.tolist()
        per_task = {name: (100.0 * hits.double() / totals.clamp(min=1).double()).tolist()
                    for name, hits in correct.items()}
        overall = {name: 100.0 * hits.sum().item() / max(totals.sum().item(), 1) for name, hits in correct.items()}
        return EvaluationResult(per_task=per_task, counts=counts, overall=overall)
