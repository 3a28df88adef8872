"""Measure how a LoRA training step slows down from task 1 to task 20, folded against summed adapters.

Three ``seq_lora`` learners on copies of one frozen backbone with random weights:

- ``task 1``: the first task's adapter is the only one.
- ``task 20, folded``: this project. Tasks 1 to 19 ended with ``TaskAdapters.fold_active``,
  so their ΔW_j are in the base weights and only adapter 20 runs as a LoRA branch.
- ``task 20, summed``: the original LoRA⁻ code's layout. The base weights hold W₀ and all
  20 peft adapters are active in every LoRA layer, so each forward computes
  W₀x + Σ_j B_j A_j x. Adapters 1 to 19 are frozen, as they are there; only adapter 20
  gets gradients.

Before each of tasks 1 to 19 is folded, its B factor is set to random values, so ΔW_j ≠ 0
and the folded and summed models compute the same function. The script checks this on the
batch and prints the largest difference of their unit embeddings.
Run from the repository root:

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/task_scaling.py
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/task_scaling.py --models vit_b16 --repeats 5 --warmup 1

Prints Markdown tables to stdout; ``--json FILE`` also writes every per-round time.
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

import harness
from spherical_cl.backbones import build_backbone
from spherical_cl.config import load_config
from spherical_cl.methods import StepInfo, TaskContext, build_learner

CLASSES_PER_TASK = 10
# Backbone alias and default batch size of each supported model, small enough for one CPU thread.
MODELS = {"vit_micro": ("vit_micro", 32), "vit_b16": ("vit_b16_in21k", 4)}


def make_context(task: int, num_tasks: int, size: int, device: torch.device) -> TaskContext:
    """Return task ``task``'s context, whose feature loader yields one random image per class."""
    classes = range(task * CLASSES_PER_TASK, (task + 1) * CLASSES_PER_TASK)
    generator = torch.Generator().manual_seed(task)
    images = torch.randint(0, 256, (CLASSES_PER_TASK, 3, size, size), dtype=torch.uint8, generator=generator)
    dataset = TensorDataset(images, torch.arange(classes.start, classes.stop))
    return TaskContext(task=task, num_tasks=num_tasks, classes=classes, seen=range(0, classes.stop),
                       feature_loader=lambda: DataLoader(dataset, batch_size=CLASSES_PER_TASK), device=device)


def randomize_active_b(learner, generator: torch.Generator, std: float) -> None:
    """Give the active adapter a nonzero B (peft starts it at zero), so that its ΔW is not zero."""
    name = learner.adapters.active
    with torch.no_grad():
        for _, factor_b in learner.adapters.named_factors(name).values():
            factor_b.copy_(torch.randn(factor_b.shape, generator=generator) * std)


def unfold_into_sum(learner) -> None:
    """Turn a learner with folded adapters into the summed layout: W₀ as base, every adapter active.

    The base weight loses Σ ΔW_j of the folded adapters again (up to float32 rounding), and
    each layer runs all adapters. Only the current adapter keeps ``requires_grad``.
    """
    adapters = learner.adapters
    with torch.no_grad():
        for key, layer in adapters.layers().items():
            base = layer.get_base_layer()
            base.weight.sub_(adapters.delta_sum(key, adapters.folded).to(base.weight.dtype))
            # peft's set_adapter makes every listed adapter trainable, so freeze the finished ones after it.
            layer.set_adapter(list(adapters.names))
            for name in adapters.folded:
                layer.lora_A[name].weight.requires_grad_(False)
                layer.lora_B[name].weight.requires_grad_(False)


def make_step(learner, optimizer, images: torch.Tensor, labels: torch.Tensor, task: int):
    info = StepInfo(task=task, epoch=0, num_epochs=1, phase="main")

    def step() -> None:
        output = learner.training_loss(images, labels, info)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        learner.after_step(images, labels, info)

    return step


def head_step(learner, embeddings: torch.Tensor, labels: torch.Tensor):
    """Return a callable that runs the learner's head and cross-entropy, forward and backward, on (B, D) embeddings."""
    leaf = embeddings.clone().requires_grad_(True)
    classes = learner.current_classes
    scale = learner.config.loss.s_end

    def run() -> None:
        leaf.grad = None
        logits = learner.head.logits(leaf, scale=scale)[:, classes.start:classes.stop]
        torch.nn.functional.cross_entropy(logits, labels - classes.start).backward()

    return run


def benchmark_model(key: str, args, device: torch.device) -> dict:
    alias, default_batch = MODELS[key]
    batch = args.batch or default_batch
    tasks = args.tasks
    backbone = build_backbone(alias, pretrained=False)
    size = backbone.input_spec.input_size
    config = load_config(None, [f"model.backbone={alias}", "model.pretrained=false", "method=seq_lora",
                                f"model.lora_rank={args.rank}", f"model.lora_alpha={args.rank}",
                                f"seed={args.seed}"])
    generator = torch.Generator().manual_seed(args.seed)

    torch.manual_seed(args.seed)
    first = build_learner(config, copy.deepcopy(backbone))
    first_optimizer = first.start_task(make_context(0, tasks, size, device))

    folded = build_learner(config, copy.deepcopy(backbone))
    for task in range(tasks - 1):
        context = make_context(task, tasks, size, device)
        folded.start_task(context)
        randomize_active_b(folded, generator, args.b_std)
        folded.end_task(context)
    summed = copy.deepcopy(folded)
    last = make_context(tasks - 1, tasks, size, device)
    folded_optimizer = folded.start_task(last)
    summed_optimizer = summed.start_task(last)
    unfold_into_sum(summed)

    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator).to(device)
    labels = torch.randint(0, CLASSES_PER_TASK, (batch,), generator=generator).to(device)
    last_labels = labels + (tasks - 1) * CLASSES_PER_TASK

    folded.eval()
    summed.eval()
    with torch.no_grad():
        embedding_difference = (folded.embed(images) - summed.embed(images)).abs().max().item()
    active_per_layer = {
        "task 1": len(next(iter(first.adapters.layers().values())).active_adapters),
        f"task {tasks}, folded": len(next(iter(folded.adapters.layers().values())).active_adapters),
        f"task {tasks}, summed": len(next(iter(summed.adapters.layers().values())).active_adapters),
    }
    for learner in (first, folded, summed):
        learner.train()

    steps = {
        "task 1": make_step(first, first_optimizer, images, labels, 0),
        f"task {tasks}, folded": make_step(folded, folded_optimizer, images, last_labels, tasks - 1),
        f"task {tasks}, summed": make_step(summed, summed_optimizer, images, last_labels, tasks - 1),
    }
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    calls = args.calls or harness.calls_for(steps["task 1"], args.block_seconds, device)
    seconds = harness.time_interleaved(steps, repeats=args.repeats, calls=calls, warmup=0, device=device)
    reference = seconds["task 1"]

    # The head grows by one block of classes per task, which is the one other cost that grows.
    with torch.no_grad():
        embeddings = first.embed(images)
    heads = {"task 1": head_step(first, embeddings, labels),
             f"task {tasks}": head_step(folded, embeddings, last_labels)}
    head_calls = harness.calls_for(heads["task 1"], args.block_seconds / 4, device)
    head_seconds = harness.time_interleaved(heads, repeats=args.repeats, calls=head_calls, warmup=args.warmup,
                                            device=device)
    return {
        "model": key, "backbone": alias, "input_size": size, "embed_dim": backbone.embed_dim, "batch": batch,
        "tasks": tasks, "lora_layers": len(first.adapters.layers()), "calls_per_round": calls,
        "active_adapters_per_layer": active_per_layer, "max_embedding_difference": embedding_difference,
        "seconds": seconds, "head_seconds": head_seconds,
        "ratio_to_task_1": {name: harness.summarize(harness.round_ratios(times, reference))
                            for name, times in seconds.items()},
        "summed_over_folded": harness.summarize(harness.round_ratios(seconds[f"task {tasks}, summed"],
                                                                     seconds[f"task {tasks}, folded"])),
    }


def print_model(result: dict, target: float) -> None:
    tasks = result["tasks"]
    print(f"### {result['backbone']}: input {result['input_size']} px, D = {result['embed_dim']}, "
          f"batch {result['batch']}, LoRA on {result['lora_layers']} layers, "
          f"steps per round: {result['calls_per_round']}")
    print()
    rows = []
    for name, times in result["seconds"].items():
        step = harness.summarize(times)
        rows.append([name, str(result["active_adapters_per_layer"][name]),
                     f"{1e3 * step['median']:.2f} (IQR {1e3 * step['q1']:.2f}–{1e3 * step['q3']:.2f})",
                     harness.format_spread(result["ratio_to_task_1"][name]),
                     f"{min(times) / min(result['seconds']['task 1']):.3f}"])
    print(harness.markdown_table(["model", "active adapters per layer", "step ms, median",
                                  "ratio to task 1, median (min–max, IQR)", "ratio of fastest rounds"], rows))
    print()
    ours = result["ratio_to_task_1"][f"task {tasks}, folded"]["median"]
    verdict = "met" if ours <= target else "not met"
    print(f"Folded, task {tasks} over task 1: {ours:.3f} (target ≤ {target:.2f}: {verdict}). "
          f"Summed over folded at task {tasks}: {harness.format_spread(result['summed_over_folded'])}. "
          f"Largest difference of the folded and summed unit embeddings: {result['max_embedding_difference']:.2e}.")
    print()
    head = {name: harness.summarize(times) for name, times in result["head_seconds"].items()}
    reference = harness.summarize(result["seconds"]["task 1"])["median"]
    growth = head[f"task {tasks}"]["median"] - head["task 1"]["median"]
    print(f"Head and cross-entropy alone, forward and backward on the (B, D) embeddings: "
          f"{1e6 * head['task 1']['median']:.0f} µs with 1 block of classes, "
          f"{1e6 * head[f'task {tasks}']['median']:.0f} µs with {tasks}; the difference is "
          f"{100 * growth / reference:.1f}% of a task-1 step.")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser, repeats=15, warmup=2)
    parser.add_argument("--models", default="vit_micro",
                        help="comma-separated models: vit_micro (2 blocks, D = 64, 32 px) and vit_b16 "
                             "(ViT-B/16 with random weights, 224 px, about 3 s per step on one CPU thread) "
                             "(default: vit_micro)")
    parser.add_argument("--tasks", type=int, default=20, help="task whose step is compared with task 1 (default: 20)")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per step (default: 32 for vit_micro, 4 for vit_b16)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r, with alpha = r (default: 8)")
    parser.add_argument("--b-std", type=float, default=0.01,
                        help="standard deviation of the random B factors of tasks 1 to 19 (default: 0.01)")
    parser.add_argument("--calls", type=int, default=None,
                        help="steps per model in each round (default: as many as fill --block-seconds)")
    parser.add_argument("--block-seconds", type=float, default=0.5,
                        help="target duration of one model's block of steps in a round (default: 0.5)")
    parser.add_argument("--target", type=float, default=1.05,
                        help="target of the folded model's task-20 over task-1 ratio (default: 1.05)")
    args = parser.parse_args()

    if args.tasks < 2:
        parser.error(f"--tasks must be at least 2, got {args.tasks}")
    models = args.models.split(",")
    unknown = [key for key in models if key not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)} in --models; choose from {', '.join(MODELS)}")

    device, info = harness.start(args)
    # peft warns that a plain torch module has no config.
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.disable(logging.INFO)

    results = []
    for key in models:
        result = benchmark_model(key, args, device)
        print_model(result, args.target)
        results.append(result)
    harness.write_results(args.json, info, args, results)


if __name__ == "__main__":
    main()
