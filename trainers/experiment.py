"""One experiment from a config: load data and backbone, train every task, write the results.

Everything that can fail on user input (config, data, backbone weights, run directory)
is checked before the first file of the run is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from spherical_cl.backbones import build_backbone, check_weights_available
from spherical_cl.config import ExperimentConfig
from spherical_cl.errors import DataError
from spherical_cl.data import ClassSplit, IncrementalData, build_class_split, load_source
from spherical_cl.methods import build_learner
from spherical_cl.plots import plot_run
from spherical_cl.results import RunWriter, prepare_run_dir, run_info
from trainers.incremental import IncrementalTrainer, resolve_device, seed_everything

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
    """Run the whole experiment and write its run directory; return the metrics."""
    seed_everything(config.seed)
    device = resolve_device(config.train.device)
    model = config.model
    backbone = build_backbone(model.backbone, pretrained=model.pretrained, checkpoint=model.checkpoint,
                              img_size=model.img_size)
    data = build_data(config, backbone.input_spec.input_size)
    learner = build_learner(config, backbone)
    prepare_run_dir(run_dir, overwrite=overwrite)
    writer = RunWriter(run_dir)
    writer.write_start(config, run_info(config, str(device)))
    logger.info("run directory: %s", run_dir)

    trainer = IncrementalTrainer(config, learner, data, writer, device)
    metrics = trainer.run()
    plot_run(metrics, run_dir / "plots")
    writer.write_metrics(metrics)
    return metrics
