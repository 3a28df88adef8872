"""Measure the training-step overhead of the hyperspherical DRS over a plain LoRA step.

Both learners come from ``spherical_cl.methods.build_learner`` on copies of one frozen
backbone with random weights and train on the same batch. A step is the one the trainer
runs: forward and loss, ``zero_grad``, backward, ``optimizer.step()`` and ``after_step``.

- ``seq_lora``: sequential LoRA, a cosine head and cross-entropy (ablation row 0).
- ``drs_sphere``: the hyperspherical DRS in its main phase, with U_t built, the projection
  hook on the embedding gradient, EMA of the base points, the angular triplet loss and the
  ArcFace margin (ablation row 6).
- ``drs_sphere`` with one of these four parts switched off by its config key, and with all
  four off. The time a part costs is then t(drs_sphere) − t(drs_sphere without it).

Each learner first runs task 1 without training steps, so the measured step is in task 2:
the DRS is built under the LoRA⁻ view and the triplet loss uses 10 old prototypes as negatives.
Run from the repository root:

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/step_overhead.py

Prints Markdown tables to stdout; ``--json FILE`` also writes every per-round time.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import harness
from spherical_cl.backbones import build_backbone
from spherical_cl.config import load_config
from spherical_cl.losses import angular_triplet_loss
from spherical_cl.methods import StepInfo, TaskContext, build_learner
from spherical_cl.prototypes import BasePoints

CLASSES_PER_TASK = 10

# Config overrides of each measured variant, in table order.
VARIANTS: dict[str, tuple[str, ...]] = {
    "seq_lora": ("method=seq_lora",),
    "drs_sphere": ("method=drs_sphere",),
    "drs_sphere, no projection hook": ("method=drs_sphere", "projection.enabled=false"),
    "drs_sphere, no EMA": ("method=drs_sphere", "prototypes.ema=false"),
    "drs_sphere, no triplet": ("method=drs_sphere", "loss.triplet_lambda=0"),
    "drs_sphere, no ArcFace margin": ("method=drs_sphere", "loss.m_start=0", "loss.m_end=0"),
    "drs_sphere, all four off": ("method=drs_sphere", "projection.enabled=false", "prototypes.ema=false",
                                 "loss.triplet_lambda=0", "loss.m_start=0", "loss.m_end=0"),
}
# The part that each leave-one-out variant switches off.
PARTS = {
    "projection hook": "drs_sphere, no projection hook",
    "EMA of base points": "drs_sphere, no EMA",
    "angular triplet": "drs_sphere, no triplet",
    "ArcFace margin": "drs_sphere, no ArcFace margin",
}


def coloured_images(count: int, size: int, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Return uint8 images (count, 3, size, size): one random colour per class plus noise.

    Distinct classes give the per-class base points and the tangent PCA distinct data.
    """
    palette = torch.randint(0, 256, (int(labels.max()) + 1, 3), generator=generator)
    noise = torch.randint(-40, 41, (count, 3, size, size), generator=generator)
    return (palette[labels][:, :, None, None] + noise).clamp(0, 255).to(torch.uint8)


def task_data(task: int, per_class: int, size: int, generator: torch.Generator) -> TensorDataset:
    labels = torch.arange(CLASSES_PER_TASK).repeat_interleave(per_class) + task * CLASSES_PER_TASK
    return TensorDataset(coloured_images(len(labels), size, labels, generator), labels)


def make_context(task: int, dataset: TensorDataset, device: torch.device) -> TaskContext:
    classes = range(task * CLASSES_PER_TASK, (task + 1) * CLASSES_PER_TASK)
    return TaskContext(task=task, num_tasks=2, classes=classes, seen=range(0, classes.stop),
                       feature_loader=lambda: DataLoader(dataset, batch_size=64), device=device)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def prepare_learner(overrides: tuple[str, ...], common: list[str], backbone, datasets, device: torch.device,
                    seed: int, precision: str = "fp32"):
    """Build a learner, run task 1 without steps, start task 2 and return (learner, optimizer)."""
    torch.manual_seed(seed)
    config = load_config(None, [*common, *overrides])
    learner = build_learner(config, copy.deepcopy(backbone))
    learner.start_task(make_context(0, datasets[0], device))
    learner.end_task(make_context(0, datasets[0], device))
    optimizer = learner.start_task(make_context(1, datasets[1], device))
    learner.train()
    learner.autocast_dtype = PRECISIONS[precision]
    return learner, optimizer


def make_step(learner, optimizer, images: torch.Tensor, labels: torch.Tensor):
    # Epoch 1 of 2 has progress 1, so ArcFace runs at s_end and m_end (margin 0.2 rad).
    info = StepInfo(task=1, epoch=1, num_epochs=2, phase="main")

    def step() -> None:
        output = learner.training_loss(images, labels, info)
        optimizer.zero_grad()
        # The batch-hard triplet is a separate batch loss; with one process the trainer adds it unweighted.
        loss = output.loss if output.batch_loss is None else output.loss + output.batch_loss
        loss.backward()
        optimizer.step()
        learner.after_step(images, labels, info)

    return step


def part_functions(learner, images: torch.Tensor, labels: torch.Tensor, scale: float, margin: float):
    """Return callables that run each DRS part alone on the (B, D) embeddings of the batch."""
    with torch.no_grad():
        embeddings = learner.embed(images)
    gradient = torch.randn_like(embeddings)
    base_points = learner.base_points
    projector = learner.subspace_projector
    ema_points = BasePoints(base_points.points.clone(), base_points.mode, base_points.first_class)
    momentum = learner.config.train.ema_momentum
    classes = learner.current_classes
    leaf = embeddings.clone().requires_grad_(True)

    def projection_hook() -> None:
        # What training_loss adds per step: base point lookup, hook creation, and the hook call.
        mu = base_points.points[base_points.assign(embeddings, labels)]
        projector.hook(mu)(gradient)

    def ema_update() -> None:
        ema_points.ema_update(embeddings, labels, momentum)

    def triplet() -> None:
        leaf.grad = None
        angular_triplet_loss(leaf, labels, margin=learner.config.loss.triplet_margin,
                             old_prototypes=learner.prototypes,
                             distance=learner.config.loss.triplet_distance).backward()

    def head_loss(head_margin: float) -> None:
        leaf.grad = None
        logits = learner.head.logits(leaf, labels, scale=scale, margin=head_margin)[:, classes.start:classes.stop]
        F.cross_entropy(logits, labels - classes.start).backward()

    return {
        "projection hook (assign, project, ratio)": projection_hook,
        "EMA update": ema_update,
        "angular triplet, forward and backward": triplet,
        "head + CE with margin, forward and backward": lambda: head_loss(margin),
        "head + CE without margin, forward and backward": lambda: head_loss(0.0),
    }


def benchmark_backbone(name: str, img_size: int | None, args, device: torch.device) -> dict:
    backbone = build_backbone(name, pretrained=False, img_size=img_size)
    size = backbone.input_spec.input_size
    k_max = args.k_max or min(128, backbone.embed_dim // 2)
    common = [f"model.backbone={name}", "model.pretrained=false", f"model.lora_rank={args.rank}",
              f"model.lora_alpha={args.rank}", f"projection.k_max={k_max}",
              # Energy 1.0 makes k = k_max, as in the CIFAR-100 proxy run, where U_t reached k_max in every task.
              "projection.pca_energy=1.0", f"seed={args.seed}"]
    if img_size is not None:
        common.append(f"model.img_size={img_size}")

    generator = torch.Generator().manual_seed(args.seed)
    per_class = math.ceil(args.feature_images / CLASSES_PER_TASK)
    datasets = [task_data(task, per_class, size, generator) for task in range(2)]
    batch_labels = torch.randint(0, CLASSES_PER_TASK, (args.batch,), generator=generator) + CLASSES_PER_TASK
    images = coloured_images(args.batch, size, batch_labels, generator).to(device)
    labels = batch_labels.to(device)

    learners, steps = {}, {}
    for variant, overrides in VARIANTS.items():
        learner, optimizer = prepare_learner(overrides, common, backbone, datasets, device, args.seed,
                                             args.precision)
        learners[variant] = learner
        steps[variant] = make_step(learner, optimizer, images, labels)
    drs = learners["drs_sphere"]
    k = drs.subspace_projector.rank

    for step in steps.values():
        for _ in range(args.warmup):
            step()
    calls = args.calls or harness.calls_for(steps["seq_lora"], args.block_seconds, device)
    seconds = harness.time_interleaved(steps, repeats=args.repeats, calls=calls, warmup=0, device=device)
    reference = seconds["seq_lora"]
    ratios = {variant: harness.summarize(harness.round_ratios(times, reference)) for variant, times in seconds.items()}
    part_costs = {
        part: harness.summarize([(full - without) / base for full, without, base
                                 in zip(seconds["drs_sphere"], seconds[variant], reference)])
        for part, variant in PARTS.items()
    }

    scale, margin = drs.scale_and_margin(StepInfo(task=1, epoch=1, num_epochs=2, phase="main"))
    parts = part_functions(drs, images, labels, scale, margin)
    part_calls = {part: harness.calls_for(function, args.block_seconds / 4, device) for part, function in parts.items()}
    part_seconds = {}
    for part, function in parts.items():
        # Each part gets its own call count, so time them one by one, in rounds of their own.
        part_seconds[part] = harness.time_interleaved({part: function}, repeats=args.repeats,
                                                      calls=part_calls[part], warmup=args.warmup,
                                                      device=device)[part]

    return {
        "backbone": name, "input_size": size, "embed_dim": backbone.embed_dim, "k": k, "batch": args.batch,
        "lora_layers": len(drs.adapters.layers()), "calls_per_round": calls,
        "seconds": seconds, "ratio_to_seq_lora": ratios, "part_cost_fraction_of_seq_lora_step": part_costs,
        "part_seconds": part_seconds, "part_seconds_summary": {p: harness.summarize(s) for p, s in part_seconds.items()},
    }


def print_backbone(result: dict, target: float) -> None:
    print(f"### {result['backbone']}: input {result['input_size']} px, D = {result['embed_dim']}, "
          f"k = {result['k']}, batch {result['batch']}, LoRA on {result['lora_layers']} layers, "
          f"steps per round: {result['calls_per_round']}")
    print()
    print_steps(result)

    overhead = result["ratio_to_seq_lora"]["drs_sphere"]["median"] - 1.0
    verdict = "met" if overhead <= target else "not met"
    print(f"Overhead of drs_sphere: {100 * overhead:.1f}% (target ≤ {100 * target:.0f}%: {verdict})")
    print()

    rows = [[part, harness.format_spread(harness.scale_summary(summary, 100), digits=1)]
            for part, summary in result["part_cost_fraction_of_seq_lora_step"].items()]
    print(harness.markdown_table(
        ["part", "t(drs_sphere) − t(without it), % of a seq_lora step, median (min–max, IQR)"], rows))
    print()
    print_parts_alone(result)


def print_steps(result: dict) -> None:
    fastest_reference = min(result["seconds"]["seq_lora"])
    rows = []
    for variant, times in result["seconds"].items():
        step = harness.summarize(times)
        rows.append([variant, f"{1e3 * step['median']:.2f} (IQR {1e3 * step['q1']:.2f}–{1e3 * step['q3']:.2f})",
                     f"{result['batch'] / step['median']:.1f}",
                     harness.format_spread(result["ratio_to_seq_lora"][variant]),
                     f"{min(times) / fastest_reference:.3f}"])
    print(harness.markdown_table(["variant", "step ms, median", "images/s", "ratio to seq_lora, median (min–max, IQR)",
                                  "ratio of fastest rounds"], rows))
    print()


def print_parts_alone(result: dict) -> None:
    reference = harness.summarize(result["seconds"]["seq_lora"])["median"]
    medians = {part: summary["median"] for part, summary in result["part_seconds_summary"].items()}
    rows = []
    for part, summary in result["part_seconds_summary"].items():
        rows.append([part, f"{1e6 * summary['median']:.0f} (IQR {1e6 * summary['q1']:.0f}–{1e6 * summary['q3']:.0f})",
                     f"{100 * summary['median'] / reference:.1f}"])
    margin = (medians["head + CE with margin, forward and backward"]
              - medians["head + CE without margin, forward and backward"])
    rows.append(["ArcFace margin: with − without", f"{1e6 * margin:.0f}", f"{100 * margin / reference:.1f}"])
    print(harness.markdown_table(["part run alone on the (B, D) embeddings", "µs, median", "% of a seq_lora step"],
                                 rows))
    print()

    total = (medians["projection hook (assign, project, ratio)"] + medians["EMA update"]
             + medians["angular triplet, forward and backward"] + margin)
    print(f"Hook, EMA, triplet and margin run alone add up to {100 * total / reference:.1f}% of a seq_lora step.")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser, repeats=9, warmup=3)
    parser.add_argument("--backbones", default="vit_micro,mobilenet_v2",
                        help="comma-separated backbone aliases (default: vit_micro,mobilenet_v2)")
    parser.add_argument("--mobilenet-img-size", type=int, default=64,
                        help="MobileNetV2 input size in pixels (default: 64, the size of the CIFAR-100 CPU proxy, "
                             "while its pretrained size is 224)")
    parser.add_argument("--batch", type=int, default=32, help="images per training step (default: 32)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r, with alpha = r (default: 8)")
    parser.add_argument("--k-max", type=int, default=None,
                        help="rank k of U_t (default: min(128, D // 2): 32 for vit_micro, 128 for mobilenet_v2)")
    parser.add_argument("--feature-images", type=int, default=320,
                        help="images per task that the DRS and the prototypes are built from (default: 320)")
    parser.add_argument("--calls", type=int, default=None,
                        help="steps per variant in each round (default: as many as fill --block-seconds)")
    parser.add_argument("--block-seconds", type=float, default=0.5,
                        help="target duration of one variant's block of steps in a round (default: 0.5)")
    parser.add_argument("--target", type=float, default=0.10, help="overhead target as a fraction (default: 0.10)")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                        help="autocast dtype of the backbone, as train.precision sets it (default: fp32)")
    args = parser.parse_args()

    device, info = harness.start(args)
    # peft warns that a plain torch module has no config, and the learners log each U_t.
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.disable(logging.INFO)

    results = []
    for name in args.backbones.split(","):
        img_size = args.mobilenet_img_size if name == "mobilenet_v2" else None
        result = benchmark_backbone(name, img_size, args, device)
        print_backbone(result, args.target)
        results.append(result)
    harness.write_results(args.json, info, args, results)


if __name__ == "__main__":
    main()
