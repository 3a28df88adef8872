"""Shared helpers of the timing benchmarks: thread and device set-up, interleaved timing, summaries.

The benchmark scripts import this module by its bare name, which works because Python puts
the script's own folder (``benchmarks/``) first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch


def add_common_arguments(parser: argparse.ArgumentParser, *, repeats: int, warmup: int) -> None:
    """Add --device, --threads, --repeats, --warmup, --seed and --json to ``parser``."""
    parser.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op CPU threads (default: 1). Set OMP_NUM_THREADS to the same value")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help=f"timed rounds; each round times every variant once (default: {repeats})")
    parser.add_argument("--warmup", type=int, default=warmup,
                        help=f"untimed calls of each variant before the first round (default: {warmup})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default: 0)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")


def set_up(args: argparse.Namespace) -> torch.device:
    """Apply --threads and --seed, and return the device of --device.

    NOTE: only --device cpu has been run so far. The CUDA path, which synchronizes before and
    after each timed block, is untested.

    Raises:
        SystemExit: a CUDA device was requested but CUDA is not available.
    """
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device} requested, but this torch build has no usable CUDA device")
    return device


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo (the same string as lscpu's 'Model name')."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device) -> dict[str, str | int]:
    """Describe the date, hardware and software of this run."""
    info: dict[str, str | int] = {
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "cpu": cpu_model(),
        "cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_environment(info: dict[str, str | int]) -> None:
    print(f"Date (UTC): {info['date']}  ")
    hardware = f"{info['cpus']} CPUs ({info['cpu']})"
    if "gpu" in info:
        hardware += f", GPU {info['gpu']}"
    print(f"Hardware: {hardware}  ")
    print(f"Software: Python {info['python']}, torch {info['torch']}, {info['torch_threads']} torch threads, "
          f"OMP_NUM_THREADS={info['omp_num_threads']}, device {info['device']}")
    print()


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a wall-clock interval covers the work it launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(variants: dict[str, Callable[[], object]], *, repeats: int, calls: int, warmup: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Time each variant's callable in rounds and return the seconds per call, one entry per round.

    Every round times each variant once, ``calls`` calls in a row, and the order rotates from
    round to round (A B C, B C A, C A B, ...). Load changes on a shared machine then hit all
    variants alike, so ratios taken within one round are more stable than absolute times.
    """
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            function = variants[name]
            gc.collect()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                function()
            synchronize(device)
            seconds[name].append((time.perf_counter() - start) / calls)
    return seconds


def calls_for(function: Callable[[], object], seconds: float, device: torch.device) -> int:
    """Return how many calls of ``function`` fill about ``seconds``, from one timed call."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    elapsed = time.perf_counter() - start
    return max(1, math.ceil(seconds / max(elapsed, 1e-6)))


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Return the median, min, max and quartiles of ``values``."""
    array = np.asarray(values, dtype=np.float64)
    q1, median, q3 = np.percentile(array, [25, 50, 75])
    return {"median": float(median), "min": float(array.min()), "max": float(array.max()),
            "q1": float(q1), "q3": float(q3), "n": int(array.size)}


def scale_summary(summary: dict[str, float], factor: float) -> dict[str, float]:
    """Multiply every statistic of a summary by ``factor``, for a change of unit."""
    return {key: value * factor if key != "n" else value for key, value in summary.items()}


def round_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Divide two per-round timings round by round."""
    return [a / b for a, b in zip(numerator, denominator)]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_spread(summary: dict[str, float], digits: int = 3) -> str:
    """Format a summary as 'median (min–max, IQR q1–q3)'."""
    return (f"{summary['median']:.{digits}f} ({summary['min']:.{digits}f}–{summary['max']:.{digits}f}, "
            f"IQR {summary['q1']:.{digits}f}–{summary['q3']:.{digits}f})")


def start(args: argparse.Namespace) -> tuple[torch.device, dict[str, str | int]]:
    """Apply the common arguments, print the run's environment and return (device, environment)."""
    device = set_up(args)
    info = environment(device)
    print_environment(info)
    return device, info


def write_results(path: Path | None, info: dict, args: argparse.Namespace, results: list) -> None:
    """Write the environment, the arguments and the results as JSON to ``path`` (from --json), if given."""
    write_json(path, {"environment": info, "arguments": {k: str(v) for k, v in vars(args).items()},
                      "results": results})


def write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
