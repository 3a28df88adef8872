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
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from spherical_cl.checkpoint import (CHECKPOINT_DIR, capture_rng, checkpoint_path, list_checkpoints, restore_rng,
                                     save_checkpoint)
from spherical_cl.config import ExperimentConfig, config_hash, to_yaml
from spherical_cl.data import IncrementalData
from spherical_cl.distributed import DistributedContext, ShardedBatchSampler
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
class RunState:
    """The task loop's record of finished tasks, stored in each checkpoint.

    Attributes:
        next_task: 0-based index of the next task to train.
        rows: per predictor, one accuracy row per finished task (NaN for unseen tasks).
        counts: test images per task's classes.
        runtimes: seconds per task.
        drifts: mean geodesic drift after each task (None where not measured).
        drift_reference: per finished task, the mean directions (n_t, D) of its classes at
            the end of that task, the reference the drift is measured against.
    """

    next_task: int = 0
    rows: dict[str, list[list[float]]] = field(default_factory=dict)
    counts: list[int] = field(default_factory=list)
    runtimes: list[float] = field(default_factory=list)
    drifts: list[float | None] = field(default_factory=list)
    drift_reference: list[torch.Tensor] = field(default_factory=list)

    def record(self, result: EvaluationResult, runtime: float, drift: float | None, num_tasks: int) -> None:
        """Add one finished task's evaluation, runtime and drift."""
        task = self.next_task
        for name, accuracies in result.per_task.items():
            self.rows.setdefault(name, []).append(accuracies + [math.nan] * (num_tasks - task - 1))
        self.counts = result.counts
        self.runtimes.append(runtime)
        self.drifts.append(drift)
        self.next_task = task + 1

    def to_dict(self) -> dict:
        """Return the state as plain values and CPU tensors for a checkpoint."""
        return {"next_task": self.next_task, "rows": self.rows, "counts": list(self.counts),
                "runtimes": list(self.runtimes), "drifts": list(self.drifts),
                "drift_reference": [reference.cpu() for reference in self.drift_reference]}

    @classmethod
    def from_dict(cls, state: dict, device: torch.device) -> "RunState":
        """Rebuild the state of :meth:`to_dict`, with the drift references on ``device``."""
        return cls(next_task=state["next_task"], rows=state["rows"], counts=state["counts"],
                   runtimes=state["runtimes"], drifts=state["drifts"],
                   drift_reference=[reference.to(device) for reference in state["drift_reference"]])


@dataclass
class EvaluationResult:
    """Accuracy per task's classes (percent) of each predictor, and the sample counts."""

    per_task: dict[str, list[float]]
    counts: list[int]
    overall: dict[str, float] = field(default_factory=dict)


class TrainingStep(nn.Module):
    """The learner's training loss as a module, so DistributedDataParallel can wrap its forward."""

    def __init__(self, learner) -> None:
        super().__init__()
        self.learner = learner

    def forward(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo):
        output = self.learner.training_loss(images, labels, step)
        return output.loss, output.batch_loss, output.terms


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype of ``train.precision`` on ``device``, or None for float32."""
    if name == "bf16":
        return torch.bfloat16
    if name == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


class IncrementalTrainer:
    """Runs a class-incremental experiment for one learner on one :class:`IncrementalData`.

    With a :class:`~spherical_cl.distributed.DistributedContext` of several ranks, each
    rank runs this loop on its shard of every batch and pass. Only rank 0 writes files
    and shows progress bars.
    """

    def __init__(self, config: ExperimentConfig, learner, data: IncrementalData, writer: RunWriter,
                 device: torch.device, dist: DistributedContext = DistributedContext()) -> None:
        self.config = config
        self.learner = learner.to(device)
        self.learner.dist = dist
        self.learner.autocast_dtype = resolve_precision(config.train.precision, device)
        self.data = data
        self.writer = writer
        self.device = device
        self.dist = dist
        self.split = data.class_split
        self.task_of_label = torch.as_tensor(self.split.task_of_label(), device=device)
        # None lets tqdm hide the bars when stderr is not a terminal, so logs stay readable.
        self._progress_disabled = None if config.logging.progress and dist.is_main else True
        self._drift_reference: list[torch.Tensor] = []

    # Loaders --------------------------------------------------------------------------

    def _loader(self, dataset, *, batch_size: int) -> DataLoader:
        """Return a loader over this rank's contiguous shard of ``dataset``, in order."""
        if self.dist.enabled:
            dataset = Subset(dataset, self.dist.shard(len(dataset)))
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=self.config.data.num_workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)

    def _training_loader(self, task: int) -> DataLoader:
        """Return the shuffled loader of task ``task``'s training images; this rank gets its share of each batch."""
        dataset = self.data.train_set(task)
        seed = self.config.seed + 1000 * (task + 1)
        sampler = ShardedBatchSampler(len(dataset), self.config.train.batch_size, seed=seed, context=self.dist)
        # The generator seeds the workers' augmentation streams.
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.config.data.num_workers,
                          pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(seed),
                          persistent_workers=False)

    def _context(self, task: int) -> TaskContext:
        batch = self.config.train.eval_batch_size
        return TaskContext(
            task=task,
            num_tasks=self.split.num_tasks,
            classes=self.split.task_classes(task),
            seen=self.split.seen_classes(task),
            feature_loader=lambda: self._loader(self.data.train_set(task, augment=False), batch_size=batch),
            device=self.device,
        )

    # Main loop ------------------------------------------------------------------------

    def run(self, state: RunState | None = None, rng: dict | None = None) -> dict:
        """Train and evaluate every task; return the metrics written to ``metrics.json``.

        To resume, pass the ``state`` and ``rng`` of a checkpoint; the learner must already
        hold the checkpoint's state. The loop then continues at ``state.next_task`` with the
        random generators exactly where the interrupted run had them.
        """
        if state is None:
            seed_everything(self.config.seed)
            state = RunState()
        if rng is not None:
            restore_rng(rng)
        self._drift_reference = state.drift_reference
        for task in range(state.next_task, self.split.num_tasks):
            started = time.perf_counter()
            context = self._context(task)
            try:
                self.train_task(context)
            except NonFiniteLossError as error:
                raise NonFiniteLossError(f"{error}. {self._resume_hint(task)}") from None
            result = self.evaluate(task)
            runtime = time.perf_counter() - started
            drift = self.measure_drift(task)
            self._export(task)
            state.record(result, runtime, drift, self.split.num_tasks)
            self.writer.log({"type": "task", "task": task + 1, "accuracy": result.overall,
                             "accuracy_per_task": result.per_task, "geodesic_drift": drift,
                             "runtime_s": runtime, "peak_memory_mb": peak_memory_mb(self.device),
                             **self.learner.task_log()})
            self._save_checkpoint(task, state)
            logger.info("task %d/%d done in %.1f s: %s", task + 1, self.split.num_tasks, runtime,
                        ", ".join(f"{k} {v:.2f}%" for k, v in result.overall.items()))
        return self._metrics(state.rows, state.counts, state.runtimes, state.drifts)

    def _resume_hint(self, task: int) -> str:
        if not self.config.logging.checkpoints:
            return "Checkpoints are off (logging.checkpoints=false), so the run cannot be resumed"
        if task == 0:
            return "No task had finished, so there is no checkpoint to resume from"
        run_dir = self.writer.path
        return (f"Tasks 1-{task} are saved in {run_dir / CHECKPOINT_DIR}; change the config and continue with "
                f"python -m spherical_cl.train --resume {run_dir} KEY=VALUE --force")

    def _save_checkpoint(self, task: int, state: RunState) -> None:
        logging_config = self.config.logging
        if not logging_config.checkpoints or not self.dist.is_main:
            return
        path = checkpoint_path(self.writer.path, task)
        save_checkpoint(path, {
            "task": task + 1,
            "config_yaml": to_yaml(self.config),
            "config_hash": config_hash(self.config),
            "learner": self.learner.checkpoint_state(),
            "trainer": state.to_dict(),
            "log_size": self.writer.sync_log(),
            "rng": capture_rng(),
        })
        logger.debug("checkpoint written: %s", path)
        if logging_config.keep_checkpoints:
            # The new checkpoint is complete on disk before any older one is removed.
            for _, old in list_checkpoints(self.writer.path)[:-logging_config.keep_checkpoints]:
                old.unlink()

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
            loader = self._loader(dataset, batch_size=self.config.train.eval_batch_size)
            return class_mean_directions(self.learner.embed, loader, self.split.task_classes(owner), self.device,
                                         reduce=self.dist.all_reduce_sum)

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
        loader = self._training_loader(context.task)
        step_module = TrainingStep(self.learner)
        if self.dist.enabled:
            # A new wrapper per task, because each task trains new parameters. It broadcasts
            # rank 0's parameters first, so an adapter initialised differently elsewhere is overwritten.
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            step_module = DistributedDataParallel(step_module, device_ids=device_ids, forward_sync_buffers=False)
        num_epochs = train.epochs_warm + train.epochs_main
        scheduler = None
        if train.lr_schedule == "cosine":
            # One cosine from each group's learning rate down to lr_min over the task's steps.
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=max(num_epochs * len(loader), 1), eta_min=train.lr_min)
        epochs = tqdm(range(num_epochs), desc=f"task {context.task + 1}/{context.num_tasks}", unit="epoch",
                      disable=self._progress_disabled, leave=False)
        for epoch in epochs:
            phase = "warmup" if epoch < train.epochs_warm else "main"
            step = StepInfo(task=context.task, epoch=epoch, num_epochs=num_epochs, phase=phase)
            started = time.perf_counter()
            loader.batch_sampler.set_epoch(epoch)
            terms = self.train_epoch(loader, optimizer, step, step_module, scheduler)
            record = {"type": "epoch", "task": context.task + 1, "epoch": epoch + 1, "phase": phase,
                      "lr": optimizer.param_groups[0]["lr"], **terms, "time_s": time.perf_counter() - started}
            interval = self.config.logging.eval_interval
            if interval and (epoch + 1) % interval == 0 and epoch + 1 < num_epochs:
                record["accuracy"] = self.evaluate(context.task).overall
            epochs.set_postfix(loss=f"{terms['loss']:.3f}")
            self.writer.log(record)
        self.learner.end_task(context)

    def train_epoch(self, loader: DataLoader, optimizer: torch.optim.Optimizer, step: StepInfo,
                    step_module: nn.Module | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> dict[str, float]:
        """Train one epoch and return the mean of each loss term (this rank's, with several ranks).

        ``scheduler``, if given, steps after every optimizer step.
        """
        self.learner.train()
        step_module = step_module or TrainingStep(self.learner)
        totals: dict[str, float] = {}
        batches = 0
        bar = tqdm(loader, desc=f"epoch {step.epoch + 1}/{step.num_epochs}", unit="batch",
                   disable=self._progress_disabled, leave=False)
        for batch_index, (images, labels) in enumerate(bar):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            loss, batch_loss, loss_terms = step_module(images, labels, step)
            if self.dist.enabled:
                # Distributed runs always train from a ShardedBatchSampler, which returns the global batch size.
                loss = loss * self._share_of_batch(len(labels), loader.batch_sampler.global_batch_size(batch_index))
            if batch_loss is not None:
                loss = loss + batch_loss
            optimizer.zero_grad(set_to_none=True)
            self._check_finite(loss, loss_terms, step, batch_index)
            loss.backward()
            self._check_gradients(optimizer, loss_terms, step, batch_index)
            if self.config.train.grad_clip is not None:
                parameters = [p for group in optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(parameters, self.config.train.grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            extra = self.learner.after_step(images, labels, step)
            terms = {"loss": loss.item(), **loss_terms, **extra}
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value
            batches += 1
        return {key: value / max(batches, 1) for key, value in totals.items()}

    def _share_of_batch(self, local_size: int, global_size: int) -> float:
        """Return the weight that makes DDP's average of per-rank means the global batch mean.

        Rank r's mean over n_r samples is weighted by n_r · world / N; averaging over the
        ranks then gives Σ n_r mean_r / N.
        """
        return local_size * self.dist.world_size / global_size

    def _check_finite(self, loss: torch.Tensor, terms: dict, step: StepInfo, batch_index: int) -> None:
        # Every rank takes the same branch; a rank that stopped alone would leave the others waiting.
        if not self.dist.all_true(bool(torch.isfinite(loss)), self.device):
            raise NonFiniteLossError(self._non_finite_message("loss", terms, step, batch_index))

    def _check_gradients(self, optimizer, terms: dict, step: StepInfo, batch_index: int) -> None:
        finite = all(parameter.grad is None or bool(torch.isfinite(parameter.grad).all())
                     for group in optimizer.param_groups for parameter in group["params"])
        if not self.dist.all_true(finite, self.device):
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
        loader = self._loader(self.data.test_set(task), batch_size=self.config.train.eval_batch_size)
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
        self.dist.all_reduce_sum(totals)
        for name in sorted(correct):
            self.dist.all_reduce_sum(correct[name])
        counts = totals.tolist()
        per_task = {name: (100.0 * hits.double() / totals.clamp(min=1).double()).tolist()
                    for name, hits in correct.items()}
        overall = {name: 100.0 * hits.sum().item() / max(totals.sum().item(), 1) for name, hits in correct.items()}
        return EvaluationResult(per_task=per_task, counts=counts, overall=overall)
