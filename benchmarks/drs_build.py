"""Measure the time to build the drift-resistant space and the memory each task keeps.

For every number of vectors N and embedding size D, the script draws N random unit vectors
in 10 clusters (one per class, about 0.6 rad from their centre) and times, as
``HypersphericalDRS.start_task`` runs them:

- ``build``: ``HypersphericalDRS.build_tangent_basis`` end to end. Per chunk of rows it
  looks up the base points, takes the log maps at each vector's class base point,
  transports them to their mean direction m̄ and calls ``TangentPCA.update``. Then it
  calls ``TangentPCA.solve``;
- its stages alone, each on chunks of ``--chunk`` rows.
  ``map`` is the log maps and the transport. ``update`` is the accumulation of Σ v vᵀ in
  float64. ``solve`` is ``torch.linalg.eigh`` on the (D − 1, D − 1) restriction to the
  tangent space at m̄, then the energy cut. ``build − update − solve``, per round, is mostly
  build's own log maps and transport;
- ``per_class``: the per-class base points (normalised class means);
- ``k-means``: the ``multi_anchor`` base points, spherical k-means with ``--anchors`` anchors.

The memory table lists the bytes of the tensors a task keeps after the build: U_t (D, k)
float32, the base point m̄ (D,) and one prototype (D,) per class. It also lists the rise of
the peak memory during a build: resident memory (VmHWM over VmRSS, Linux only) on the CPU,
the allocator's peak on CUDA. Memory that the C allocator freed earlier but kept is reused
without a rise, so on the CPU this is a lower bound of the build's temporaries.
Run from the repository root:

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/drs_build.py

Prints Markdown tables to stdout; ``--json FILE`` also writes every per-round time.
"""

from __future__ import annotations

import argparse
import math
import types

import torch

import harness
from manifolds import Sphere, TangentPCA
from spherical_cl.config import load_config
from spherical_cl.methods import HypersphericalDRS
from spherical_cl.prototypes import class_means, estimate_base_points, mean_direction

CLASSES = 10
# Earlier estimates of the per-task memory in bytes: U_t at D = 768, k = 64 (768 × 64 × 4 bytes of
# float32) and one float32 prototype at D = 768 (768 × 4 bytes).
PLAN_U_BYTES_AT_768_64 = 0.19e6
PLAN_PROTOTYPE_BYTES_AT_768 = 3e3


def clustered_unit_vectors(count: int, dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Return unit vectors (N, D) around one random centre per class, and their labels (N,).

    Noise of norm about 0.7 around a unit centre puts the vectors about atan(0.7) ≈ 0.6 rad
    from it, so log maps are of the size real embeddings give.
    """
    centres = torch.nn.functional.normalize(torch.randn(CLASSES, dim, generator=generator), dim=1)
    labels = torch.arange(count) % CLASSES
    noise = torch.randn(count, dim, generator=generator) * (0.7 / math.sqrt(dim))
    return torch.nn.functional.normalize(centres[labels] + noise, dim=1), labels


def process_memory_bytes(field: str) -> int | None:
    """Return ``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> int | None:
    """Reset the peak-memory counter and return the memory in use now, or None when it cannot be read.

    On the CPU, writing 5 to /proc/self/clear_refs resets VmHWM to VmRSS (Linux 4.0 and later).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return None
    return process_memory_bytes("VmRSS")


def peak_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return process_memory_bytes("VmHWM")


def stage_functions(vectors: torch.Tensor, labels: torch.Tensor, learner_stub, args) -> tuple[dict, dict]:
    """Return the timed callables of one (N, D) point and a dict that ``build`` fills with its last result."""
    sphere = Sphere()
    classes = range(CLASSES)
    dim = vectors.shape[1]
    base_points = estimate_base_points(vectors, labels, classes, mode="per_class")
    center = mean_direction(base_points.points)
    mu = base_points.points[base_points.assign(vectors, labels)]

    def map_vectors() -> torch.Tensor:
        chunks = []
        for start in range(0, len(vectors), args.chunk):
            chunk_mu = mu[start:start + args.chunk]
            chunks.append(sphere.transp(chunk_mu, center.expand_as(chunk_mu),
                                        sphere.logmap(chunk_mu, vectors[start:start + args.chunk])))
        return torch.cat(chunks)

    # The inputs of the update and solve stages, computed once outside the timed calls.
    tangent = map_vectors()
    filled = TangentPCA(dim, device=vectors.device).update(tangent)
    last_build: dict = {"peak_rise_bytes": None}

    def build() -> None:
        before = reset_peak_memory(vectors.device)
        last_build["result"] = HypersphericalDRS.build_tangent_basis(learner_stub, vectors, base_points, labels)
        peak = peak_memory(vectors.device)
        if before is not None and peak is not None:
            rise = max(peak - before, last_build["peak_rise_bytes"] or 0)
            last_build["peak_rise_bytes"] = rise

    def update() -> None:
        pca = TangentPCA(dim, device=vectors.device)
        for start in range(0, len(tangent), args.chunk):
            pca.update(tangent[start:start + args.chunk])

    def solve() -> None:
        filled.solve(args.energy, args.k_max, base_point=center)

    def per_class() -> None:
        estimate_base_points(vectors, labels, classes, mode="per_class")

    def kmeans() -> None:
        estimate_base_points(vectors, labels, classes, mode="multi_anchor", num_anchors=args.anchors, seed=args.seed)

    functions = {"build": build, "map": map_vectors, "update": update, "solve": solve, "per_class": per_class, "k-means": kmeans}
    # These tensors exist only while the DRS is built. The bytes come from their shapes, not from a measurement.
    transient = (vectors.numel() * vectors.element_size() + tangent.numel() * tangent.element_size()
                 + filled.second_moment_sum.numel() * filled.second_moment_sum.element_size())
    return functions, {"last_build": last_build, "transient_bytes": transient}


def memory_facts(vectors: torch.Tensor, labels: torch.Tensor, build_result, transient_bytes: int) -> dict:
    """Return k, the captured energy and the bytes of the tensors a task keeps after the build."""
    basis, point, energy = build_result
    prototypes = class_means(vectors, labels, range(CLASSES))
    return {
        "k": basis.shape[1], "energy": energy,
        "U_bytes": basis.numel() * basis.element_size(),
        "base_point_bytes": point.numel() * point.element_size(),
        "prototype_bytes_per_class": prototypes.numel() * prototypes.element_size() // CLASSES,
        "transient_bytes": transient_bytes,
    }


def parse_sizes(text: str, option: str, parser: argparse.ArgumentParser) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        parser.error(f"{option} must be comma-separated integers, got {text!r}")
    if any(size < 2 for size in sizes):
        parser.error(f"{option} values must be at least 2, got {text!r}")
    return sizes


def format_seconds(summary: dict[str, float]) -> str:
    return f"{summary['median']:.3f} ({summary['min']:.3f}–{summary['max']:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Without warm-up calls by default: one call at N = 50,000 takes seconds, and the median of
    # 3 rounds leaves out a slow first round.
    harness.add_common_arguments(parser, repeats=3, warmup=0)
    parser.add_argument("--counts", default="1000,5000,10000,50000",
                        help="comma-separated numbers of vectors N (default: 1000,5000,10000,50000)")
    parser.add_argument("--dims", default="192,384,768,1024",
                        help="comma-separated embedding sizes D (default: 192,384,768,1024)")
    parser.add_argument("--k-max", type=int, default=64,
                        help="maximum rank of U_t, projection.k_max (default: 64, the k of the memory estimate, "
                             "while the config default is 128)")
    parser.add_argument("--energy", type=float, default=0.90,
                        help="energy fraction U_t must capture, projection.pca_energy (default: 0.90)")
    parser.add_argument("--chunk", type=int, default=256,
                        help="rows per chunk in the map and update stages (default: 256, "
                             "the default train.eval_batch_size)")
    parser.add_argument("--anchors", type=int, default=4,
                        help="spherical k-means anchors, prototypes.num_anchors (default: 4)")
    args = parser.parse_args()
    counts = parse_sizes(args.counts, "--counts", parser)
    dims = parse_sizes(args.dims, "--dims", parser)
    if args.k_max >= min(dims):
        parser.error(f"--k-max={args.k_max} must be smaller than every D in --dims (smallest: {min(dims)})")
    device, info = harness.start(args)
    config = load_config(None, [f"projection.k_max={args.k_max}", f"projection.pca_energy={args.energy}"])
    # build_tangent_basis reads only self.config.projection and self.sphere, so a stub replaces the
    # learner and no backbone of each size D is needed.
    learner_stub = types.SimpleNamespace(config=config, sphere=Sphere())
    generator = torch.Generator().manual_seed(args.seed)
    results = []
    for dim in dims:
        for count in counts:
            vectors, labels = clustered_unit_vectors(count, dim, generator)
            vectors, labels = vectors.to(device), labels.to(device)
            functions, state = stage_functions(vectors, labels, learner_stub, args)
            seconds = harness.time_interleaved(functions, repeats=args.repeats, calls=1, warmup=args.warmup,
                                               device=device)
            # The log maps, the transport and the base point lookup are what build does besides update and solve.
            seconds["build − update − solve"] = [build - update - solve for build, update, solve
                                                 in zip(seconds["build"], seconds["update"], seconds["solve"])]
            memory = memory_facts(vectors, labels, state["last_build"]["result"], state["transient_bytes"])
            memory["build_peak_rise_bytes"] = state["last_build"]["peak_rise_bytes"]
            results.append({"N": count, "D": dim, **memory, "seconds": seconds,
                            "summary": {name: harness.summarize(times) for name, times in seconds.items()}})

    print(f"Build time in seconds, median (min–max) of {args.repeats} rounds; "
          f"k_max = {args.k_max}, energy {args.energy}, {CLASSES} classes:")
    print()
    stages = list(results[0]["summary"])
    rows = [[str(result["N"]), str(result["D"]), str(result["k"])]
            + [format_seconds(result["summary"][stage]) for stage in stages] for result in results]
    print(harness.markdown_table(["N", "D", "k"] + stages, rows))
    print()

    print(f"Memory kept per task (tensor bytes, float32), the inputs held during the build (from their shapes), "
          f"and the rise of the peak {'CUDA allocator' if device.type == 'cuda' else 'resident'} memory during "
          f"one build (max over rounds), at the largest N = {max(counts):,}:")
    print()
    rows = []
    for dim in dims:
        largest = next(r for r in results if r["D"] == dim and r["N"] == max(counts))
        rise = largest["build_peak_rise_bytes"]
        rows.append([str(dim), str(largest["k"]), f"{largest['U_bytes']:,}", f"{largest['base_point_bytes']:,}",
                     f"{largest['prototype_bytes_per_class']:,}", f"{largest['transient_bytes'] / 1e6:.1f}",
                     "n/a" if rise is None else f"{rise / 1e6:.0f}"])
    print(harness.markdown_table(["D", "k", "U_t bytes", "m̄ bytes", "prototype bytes per class",
                                  "X, tangent vectors and Σ, MB", "peak memory rise during build, MB"], rows))
    print()
    at_plan = next((r for r in results if r["D"] == 768 and r["k"] == 64), None)
    if at_plan is not None:
        print(f"Estimate at D = 768, k = 64: U_t {PLAN_U_BYTES_AT_768_64 / 1e6:.2f} MB, measured "
              f"{at_plan['U_bytes'] / 1e6:.3f} MB ({at_plan['U_bytes'] / 2**20:.4f} MiB); prototype "
              f"{PLAN_PROTOTYPE_BYTES_AT_768 / 1e3:.0f} KB per class, measured "
              f"{at_plan['prototype_bytes_per_class']:,} bytes.")
        print()
    harness.write_results(args.json, info, args, results)


if __name__ == "__main__":
    main()
