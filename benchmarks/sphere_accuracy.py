"""Measure the accuracy of manifolds.Sphere and geoopt.Sphere on the same inputs.

Prints a Markdown report (the tables in docs/sphere_accuracy.md) to stdout.
Run from the repository root:

    PYTHONPATH=. .venv/bin/python benchmarks/sphere_accuracy.py

Pairs (x, y) at a chosen angle θ are built in float64 as y = cos θ·x + sin θ·v
with v a unit tangent at x, then rounded to the dtype under test. The
reference angle is computed from the rounded inputs in numpy long double
(80-bit extended precision on x86-64, eps ≈ 1.1e-19): both points are
normalised and θ = 2·atan2(‖x − y‖, ‖x + y‖). Errors therefore measure the
implementation, not the rounding of the inputs.
"""

import argparse
import datetime
import math
import os
import platform
from typing import Callable, Dict, List, Sequence, Tuple

import geoopt
import numpy as np
import torch

import manifolds
from harness import cpu_model

# (label, low, high, spacing). "log" samples θ log-uniformly; "pi-log" samples
# π − θ log-uniformly, to reach the antipode.
THETA_RANGES: List[Tuple[str, float, float, str]] = [
    ("1e-7 to 1e-4", 1e-7, 1e-4, "log"),
    ("1e-4 to 1e-2", 1e-4, 1e-2, "log"),
    ("1e-2 to 1", 1e-2, 1.0, "log"),
    ("1 to π−1e-3", 1.0, math.pi - 1e-3, "uniform"),
    ("π−1e-3 to π−1e-6", 1e-6, 1e-3, "pi-log"),
]
DIMS = (3, 128, 1024)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def sample_thetas(low: float, high: float, spacing: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``count`` angles between ``low`` and ``high`` with the given spacing."""
    if spacing == "uniform":
        return rng.uniform(low, high, count)
    logs = rng.uniform(math.log(low), math.log(high), count)
    if spacing == "log":
        return np.exp(logs)
    return math.pi - np.exp(logs)


def make_pairs(thetas: np.ndarray, dim: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Build float64 unit vectors x and y with angle θ between them, shape (N, dim)."""
    x = rng.standard_normal((len(thetas), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    v = rng.standard_normal((len(thetas), dim))
    v -= np.sum(v * x, axis=1, keepdims=True) * x
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    y = np.cos(thetas)[:, None] * x + np.sin(thetas)[:, None] * v
    return x, y


def reference_angle(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Compute the angle between the directions of x and y in long double."""
    x_ld = x.double().numpy().astype(np.longdouble)
    y_ld = y.double().numpy().astype(np.longdouble)
    x_ld /= np.sqrt(np.sum(x_ld * x_ld, axis=-1, keepdims=True))
    y_ld /= np.sqrt(np.sum(y_ld * y_ld, axis=-1, keepdims=True))
    difference = np.sqrt(np.sum((x_ld - y_ld) ** 2, axis=-1))
    total = np.sqrt(np.sum((x_ld + y_ld) ** 2, axis=-1))
    return 2 * np.arctan2(difference, total)


def to_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(array).to(dtype)


def run_safely(function: Callable[[], str]) -> str:
    """Return the function's table cell, or the exception type if it raised."""
    try:
        return function()
    except Exception as error:  # noqa: BLE001 - the table reports any failure
        return f"error: {type(error).__name__}"


def format_number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if value == 0:
        return "0"
    return f"{value:.2e}"


def max_relative_dist_error(manifold, dtype: torch.dtype, pairs: Sequence[Tuple[np.ndarray, np.ndarray]]) -> str:
    worst = 0.0
    for x64, y64 in pairs:
        x, y = to_tensor(x64, dtype), to_tensor(y64, dtype)
        reference = reference_angle(x, y)
        distance = manifold.dist(x, y).double().numpy().astype(np.longdouble)
        # Rounding to a half dtype can make x == y, where both angles are 0.
        scale = np.where(reference > 0, reference, 1)
        error = np.abs(distance - reference) / scale
        if np.isnan(error).any():
            return "NaN"
        worst = max(worst, float(error.max()))
    return format_number(worst)


def special_cases(manifold, dtype: torch.dtype, seed: int) -> Dict[str, str]:
    """Measure dist(x, x), the antipodal log map, the exp∘log round trip and gradients."""
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    cells: Dict[str, str] = {}
    points = [manifolds.Sphere().projx(torch.randn(64, dim, generator=generator, dtype=torch.float64)) for dim in DIMS]
    points = [p.to(dtype) for p in points]

    cells["max dist(x, x)"] = run_safely(
        lambda: format_number(max(manifold.dist(p, p).double().abs().max().item() for p in points))
    )
    cells["max ‖logmap(x, x)‖"] = run_safely(
        lambda: format_number(max(manifold.logmap(p, p).double().norm(dim=-1).max().item() for p in points))
    )

    def antipode_lengths() -> str:
        lengths = torch.cat([manifold.logmap(p, -p).double().norm(dim=-1) for p in points])
        if lengths.isnan().any():
            return "NaN"
        return f"{lengths.min().item():.6f} to {lengths.max().item():.6f}"

    cells["‖logmap(x, −x)‖ (π = 3.141593)"] = run_safely(antipode_lengths)

    def round_trip() -> str:
        worst = 0.0
        for dim in DIMS:
            thetas = np.concatenate(
                [sample_thetas(low, high, spacing, 64, rng) for _, low, high, spacing in THETA_RANGES[:4]]
            )
            x64, y64 = make_pairs(thetas, dim, rng)
            x, y = to_tensor(x64, dtype), to_tensor(y64, dtype)
            recovered = manifold.expmap(x, manifold.logmap(x, y))
            error = (recovered.double() - y.double()).norm(dim=-1)
            if error.isnan().any():
                return "NaN"
            worst = max(worst, error.max().item())
        return format_number(worst)

    cells["max ‖exp(x, log(x, y)) − y‖, θ ≤ π−1e-3"] = run_safely(round_trip)

    def gradients_finite() -> str:
        x = points[1][:8].clone()
        y = torch.cat([x[:3], -x[3:6], points[1][8:10]]).clone()
        results = []
        for function in (manifold.dist, manifold.logmap):
            x_leaf = x.clone().requires_grad_()
            y_leaf = y.clone().requires_grad_()
            function(x_leaf, y_leaf).sum().backward()
            finite = bool(x_leaf.grad.isfinite().all() and y_leaf.grad.isfinite().all())
            results.append("yes" if finite else "no")
        return " / ".join(results)

    cells["finite gradients at θ = 0, π (dist / logmap)"] = run_safely(gradients_finite)

    def gradient_norm_error() -> str:
        # The Riemannian gradient of dist(x, ·) has norm 1 wherever dist is smooth.
        thetas = np.full(64, 1e-3)
        x64, y64 = make_pairs(thetas, 128, rng)
        x, y = to_tensor(x64, dtype), to_tensor(y64, dtype).requires_grad_()
        manifold.dist(x, y).sum().backward()
        riemannian = manifolds.Sphere().proju(y.detach().double(), y.grad.double())
        error = (riemannian.norm(dim=-1) - 1).abs()
        if error.isnan().any():
            return "NaN"
        return format_number(error.max().item())

    cells["max error of ‖grad dist‖ (exact: 1) at θ = 1e-3"] = run_safely(gradient_norm_error)

    def antipodal_log_length_error() -> str:
        _, low, high, spacing = THETA_RANGES[-1]
        thetas = sample_thetas(low, high, spacing, 64, rng)
        x64, y64 = make_pairs(thetas, 128, rng)
        x, y = to_tensor(x64, dtype), to_tensor(y64, dtype)
        reference = reference_angle(x, y)
        lengths = manifold.logmap(x, y).double().norm(dim=-1).numpy().astype(np.longdouble)
        error = np.abs(lengths - reference) / reference
        if np.isnan(error).any():
            return "NaN"
        return format_number(float(error.max()))

    cells["max relative error of ‖logmap‖, θ in π−1e-3 to π−1e-6"] = run_safely(antipodal_log_length_error)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200, help="pairs per θ range and dimension (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the numpy and torch generators (default: 0)")
    args = parser.parse_args()

    implementations = [("manifolds.Sphere", manifolds.Sphere()), ("geoopt.Sphere", geoopt.Sphere())]
    rng = np.random.default_rng(args.seed)
    pairs_by_range = {
        label: [make_pairs(sample_thetas(low, high, spacing, args.pairs, rng), dim, rng) for dim in DIMS]
        for label, low, high, spacing in THETA_RANGES
    }

    print(f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}  ")
    print(f"Hardware: {len(os.sched_getaffinity(0))} CPUs (nproc), {cpu_model()}  ")
    print(f"Software: Python {platform.python_version()}, torch {torch.__version__}, geoopt {geoopt.__version__}  ")
    print(f"Inputs: {args.pairs} pairs per θ range and dimension, dimensions {DIMS}, seed {args.seed}")
    print()
    print("Max relative error of dist against the long-double reference:")
    print()
    print("| implementation | dtype | " + " | ".join(label for label, *_ in THETA_RANGES) + " |")
    print("|---|---|" + "---|" * len(THETA_RANGES))
    for name, manifold in implementations:
        for dtype in DTYPES:
            cells = [
                run_safely(lambda pairs=pairs: max_relative_dist_error(manifold, dtype, pairs))
                for pairs in pairs_by_range.values()
            ]
            print(f"| {name} | {str(dtype).replace('torch.', '')} | " + " | ".join(cells) + " |")
    print()
    print("Special cases:")
    print()
    header_written = False
    for name, manifold in implementations:
        for dtype in DTYPES:
            cells = special_cases(manifold, dtype, args.seed)
            if not header_written:
                print("| implementation | dtype | " + " | ".join(cells) + " |")
                print("|---|---|" + "---|" * len(cells))
                header_written = True
            print(f"| {name} | {str(dtype).replace('torch.', '')} | " + " | ".join(cells.values()) + " |")


if __name__ == "__main__":
    main()
