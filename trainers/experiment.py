"""One experiment from a config: load data and backbone, train every task, write the results.

Everything that can fail on user input (config, data, backbone weights, run directory)
is checked before the first file of the run is written.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from spherical_cl.backbones import build_backbone, check_weights_available
from spherical_cl.checkpoint import checkpoint_path, latest_checkpoint, list_checkpoints
from spherical_cl.config import ExperimentConfig, diff_configs, flatten_dict, is_resume_fixed, to_dict, to_yaml
from spherical_cl.distributed import DistributedContext, init_distributed
from spherical_cl.errors import ConfigError, DataError, RunDirError, UserError
from spherical_cl.data import ClassSplit, IncrementalData, build_class_split, load_source
from spherical_cl.methods import build_learner
from spherical_cl.plots import plot_run
from spherical_cl.results import RunLock, RunWriter, check_writable, prepare_run_dir, run_info
from trainers.incremental import IncrementalTrainer, RunState, resolve_device, seed_everything

logger = logging.getLogger(__name__)

CIFAR100_TRAIN_PER_CLASS = 500


@dataclass
class ExperimentPlan:
    """The plan of a run (split, backbone, trainable size), built without weights or training."""

    split: ClassSplit
    backbone: str
    embed_dim: int
    input_size: int
    trainable_parameters: int
    lora_layers: int
    train_images: list[int]

    def describe(self) -> str:
        """Return the plan as lines of text for ``--dry-run``."""
        lines = [
            f"backbone: {self.backbone} (embedding {self.embed_dim}, input {self.input_size} px, "
            f"{self.lora_layers} LoRA layers)",
            f"trainable parameters per task: {self.trainable_parameters:,} (adapter, head and any VAE head of the "
            "first task)",
            f"tasks: {self.split.num_tasks}, classes: {self.split.num_classes}",
        ]
        for task in range(self.split.num_tasks):
            labels = self.split.task_classes(task)
            original = list(self.split.class_order[labels.start:labels.stop])
            lines.append(f"  task {task + 1}: {len(original)} classes, {self.train_images[task]} training images, "
                         f"classes {original}")
        return "\n".join(lines)


def build_data(config: ExperimentConfig, input_size: int, *, download: bool | None = None) -> IncrementalData:
    """Load the dataset and split it into tasks by the ``data`` section of the config."""
    data = config.data
    splits = load_source(data.source, data.root, train_list=data.train_list, test_list=data.test_list,
                         download=data.download if download is None else download)
    split = _build_split(config, splits.num_classes)
    return IncrementalData(splits, split, input_size=input_size, augment=data.augment,
                           max_train_per_class=data.max_train_per_class, subset_seed=config.seed)


def _build_split(config: ExperimentConfig, num_classes: int) -> ClassSplit:
    data = config.data
    return build_class_split(
        num_classes,
        num_tasks=data.num_tasks,
        classes_per_task=data.classes_per_task,
        first_task_classes=data.first_task_classes,
        remainder=data.remainder,
        class_order=data.class_order,
        class_list=data.class_list,
        order_seed=data.order_seed,
    )


def plan_experiment(config: ExperimentConfig) -> ExperimentPlan:
    """Build the split and the architecture (random weights, no download) and describe the run."""
    check_weights_available(config.model.backbone, pretrained=config.model.pretrained,
                            checkpoint=config.model.checkpoint)
    backbone = build_backbone(config.model.backbone, pretrained=False, img_size=config.model.img_size)
    try:
        # A dry run downloads nothing.
        data = build_data(config, backbone.input_spec.input_size, download=False)
        split = data.class_split
        train_images = [len(data.train_indices_of(t)) for t in range(split.num_tasks)]
    except DataError:
        if config.data.source != "cifar100":
            raise
        logger.info("CIFAR-100 is not downloaded yet; planning with its published size of %d images per class",
                    CIFAR100_TRAIN_PER_CLASS)
        split = _build_split(config, num_classes=100)
        per_class = min(CIFAR100_TRAIN_PER_CLASS, config.data.max_train_per_class or CIFAR100_TRAIN_PER_CLASS)
        train_images = [per_class * size for size in split.task_sizes]
    learner = build_learner(config, backbone)
    adapter_size = sum(p.numel() for p in learner.adapters.add_task(0))
    vae = getattr(learner, "vae", None)
    vae_size = sum(p.numel() for p in vae.parameters()) if vae is not None else 0
    head_size = split.task_sizes[0] * learner.head.embed_dim + vae_size
    return ExperimentPlan(
        split=split,
        backbone=config.model.backbone,
        embed_dim=backbone.embed_dim,
        input_size=backbone.input_spec.input_size,
        trainable_parameters=adapter_size + head_size,
        lora_layers=len(learner.adapters.layers()),
        train_images=train_images,
    )


def run_experiment(config: ExperimentConfig, run_dir: Path, *, overwrite: bool = False) -> dict:
    """Run the whole experiment in a new run directory; return the metrics.

    Under ``torchrun`` every rank calls this; rank 0 prepares and writes the run directory.
    """
    device, dist = _prepare_device(config)
    backbone, data, learner = _build(config)
    _check_world_size(config, dist)
    _on_main_rank(dist, device, lambda: check_writable(run_dir), run_dir)
    with RunLock(run_dir, enabled=dist.is_main):
        _on_main_rank(dist, device, lambda: prepare_run_dir(run_dir, overwrite=overwrite), run_dir)
        writer = RunWriter(run_dir, enabled=dist.is_main)
        writer.write_start(config, run_info(config, str(device), world_size=dist.world_size))
        logger.info("run directory: %s", run_dir)
        trainer = IncrementalTrainer(config, learner, data, writer, device, dist)
        return _finish(trainer.run(), writer, run_dir, dist)


def _on_main_rank(dist: DistributedContext, device: torch.device, action, run_dir: Path) -> None:
    """Run ``action`` on rank 0 only, and raise its UserError on every rank so none waits alone."""
    failure = None
    if dist.is_main:
        try:
            action()
        except UserError as error:
            failure = error
    if not dist.all_true(failure is None, device):
        raise failure or RunDirError(f"rank 0 could not prepare the run directory {run_dir}; see its error")


def resume_config_text(run_dir: Path) -> tuple[str, str]:
    """Return the YAML text of the config a plain ``--resume`` continues with, and its source.

    That is the config saved in the newest checkpoint, which trained the last finished
    task, or ``config.yaml`` for a finished run or one without a checkpoint.

    Raises:
        RunDirError: there is neither a checkpoint nor ``config.yaml``.
        CheckpointError: the newest checkpoint is damaged.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").exists() and list_checkpoints(run_dir):
        checkpoint = latest_checkpoint(run_dir)
        return checkpoint["config_yaml"], str(checkpoint_path(run_dir, checkpoint["task"] - 1))
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"no run to resume in {run_dir} (no config.yaml and no checkpoint); pass the run "
                          "directory of an earlier run to --resume")
    return path.read_text(), str(path)


def resume_experiment(config: ExperimentConfig, run_dir: Path, *, force: bool = False) -> dict:
    """Continue the run in ``run_dir`` after its last complete task; return the metrics.

    ``config`` must equal the config of the newest checkpoint unless ``force`` is given.
    Even then, the keys the finished tasks depend on (seed, method, model, data split,
    VAE size, drift sample) must not change. A run that finished already is not trained
    again: its metrics are returned. While it runs, the process holds the run's lock.

    Raises:
        RunDirError: ``run_dir`` contains no run, or another process is writing it.
        CheckpointError: the newest checkpoint is damaged (the message names the last good one).
        ConfigError: ``config`` differs from the run's and ``force`` is off, or a fixed key differs.
    """
    run_dir = Path(run_dir)
    if (run_dir / "metrics.json").exists():
        text, source = resume_config_text(run_dir)
        check_resume_config(_yaml_dict(text), config, source, force=force)
        if int(os.environ.get("RANK", "0")) == 0:
            logger.info("%s already finished; nothing to resume", run_dir)
        return json.loads((run_dir / "metrics.json").read_text())

    device, dist = _prepare_device(config)
    with RunLock(run_dir, enabled=dist.is_main):
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is not None:
            source = str(checkpoint_path(run_dir, checkpoint["task"] - 1))
            saved = _yaml_dict(checkpoint["config_yaml"])
        else:
            text, source = resume_config_text(run_dir)
            saved = _yaml_dict(text)
        changes = check_resume_config(saved, config, source, force=force)
        backbone, data, learner = _build(config)
        _check_world_size(config, dist)
        _on_main_rank(dist, device, lambda: check_writable(run_dir), run_dir)
        writer = RunWriter(run_dir, enabled=dist.is_main)
        learner.to(device)
        state, rng, finished = None, None, 0
        if checkpoint is not None:
            learner.load_checkpoint_state(checkpoint["learner"])
            state = RunState.from_dict(checkpoint["trainer"], device)
            rng, finished = checkpoint["rng"], checkpoint["task"]
            writer.rewind(checkpoint["log_size"], finished)
        else:
            # Killed during the first task: start it again in the same directory.
            writer.rewind(0, 0)
        # config.yaml always describes the config the run continues with.
        writer.write_config(config)
        writer.add_resume({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "after_task": finished,
                           "changed": {key: [old, new] for key, old, new in changes},
                           "git_commit": run_info(config, str(device))["git_commit"]})
        writer.log({"type": "resume", "after_task": finished, "changed": [key for key, _, _ in changes]})
        logger.info("resuming %s after task %d of %d", run_dir, finished, data.class_split.num_tasks)
        trainer = IncrementalTrainer(config, learner, data, writer, device, dist)
        return _finish(trainer.run(state, rng), writer, run_dir, dist)


def _check_world_size(config: ExperimentConfig, dist: DistributedContext) -> None:
    if config.train.batch_size < dist.world_size:
        raise ConfigError(f"train.batch_size={config.train.batch_size} is smaller than the {dist.world_size} "
                          f"ranks; use a global batch of at least {dist.world_size}")


def check_resume_config(saved: dict, config: ExperimentConfig, source: str, *, force: bool) -> list:
    """Return the differences between a run's saved config and ``config``, if resuming is allowed.

    Raises:
        ConfigError: they differ and ``force`` is off, or a key that must not change differs.
    """
    changes = diff_configs(saved, to_dict(config))
    # A key added to the schema after the run started is no change if it keeps its default.
    saved_keys, defaults = flatten_dict(saved), flatten_dict(to_dict(ExperimentConfig()))
    changes = [(key, old, new) for key, old, new in changes
               if key in saved_keys or new != defaults.get(key, object())]
    if not changes:
        return []
    listed_changes = ", ".join(f"{key} ({old!r} -> {new!r})" for key, old, new in changes[:6])
    if len(changes) > 6:
        listed_changes += f" and {len(changes) - 6} more"
    fixed = [key for key, _, _ in changes if is_resume_fixed(key)]
    if fixed:
        raise ConfigError(f"cannot resume with a changed {', '.join(fixed)}: the finished tasks depend on it "
                          f"(differences from the config of {source}: {listed_changes}); resume with the run's "
                          "own values or start a new run")
    if not force:
        raise ConfigError(f"the config differs from that of {source} in {listed_changes}; pass --force to resume "
                          "with the new values, or drop them to resume unchanged")
    logger.warning("resuming with a changed config: %s", listed_changes)
    return changes


def _yaml_dict(text: str) -> dict:
    # OmegaConf wrote the text, so its own reader gives back the same values and types.
    return OmegaConf.to_container(OmegaConf.create(text))


def _prepare_device(config: ExperimentConfig) -> tuple[torch.device, DistributedContext]:
    """Return this process's device and its place among the ranks, joining torchrun's group if any."""
    if config.train.deterministic:
        # cuBLAS reads this when the first CUDA handle is created; it must be set before.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    device = resolve_device(config.train.device)
    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if not dist.is_main:
        # Rank 0 reports progress; the others report only problems.
        logging.getLogger("spherical_cl").setLevel(logging.WARNING)
        logging.getLogger("trainers").setLevel(logging.WARNING)
    return device, dist


def _build(config: ExperimentConfig):
    """Seed, then build the backbone, the data and the learner in a fixed order."""
    seed_everything(config.seed)
    model = config.model
    backbone = build_backbone(model.backbone, pretrained=model.pretrained, checkpoint=model.checkpoint,
                              img_size=model.img_size)
    data = build_data(config, backbone.input_spec.input_size)
    learner = build_learner(config, backbone)
    return backbone, data, learner


def _finish(metrics: dict, writer: RunWriter, run_dir: Path, dist: DistributedContext) -> dict:
    if dist.is_main:
        plot_run(metrics, run_dir / "plots")
        writer.write_metrics(metrics)
    # No rank returns before metrics.json exists, so a caller on any rank can read it.
    dist.barrier()
    return metrics
