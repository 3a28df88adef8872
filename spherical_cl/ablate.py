"""Command line: ``python -m spherical_cl.ablate --config FILE --rows ncm,0-6 --seeds 0,1,2``.

Runs each ablation row (see :mod:`spherical_cl.presets`) for each seed, one after another,
into ``OUT/row-<row>/seed-<seed>``. A run whose ``metrics.json`` exists is not run again,
and an interrupted one continues from its last checkpoint.
Then writes ``OUT/ablation.md`` (mean ± std over seeds) and ``OUT/ablation.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from spherical_cl.cli import configure_logging, run_reporting_input_errors
from spherical_cl.errors import ConfigError, RunDirError

logger = logging.getLogger("spherical_cl.ablate")

COLUMNS = (
    ("final_acc", "final acc (%)"),
    ("avg_acc", "avg acc (%)"),
    ("bwt", "BWT"),
    ("forgetting", "forgetting"),
    ("final_drift", "drift (rad)"),
    ("final_gap", "stability gap"),
    ("wall_time_s", "time (s)"),
    ("peak_memory_mb", "memory (MB)"),
)


def build_parser() -> argparse.ArgumentParser:
    from spherical_cl.presets import ROW_DESCRIPTIONS

    rows = "; ".join(f"{row}: {text}" for row, text in ROW_DESCRIPTIONS.items())
    parser = argparse.ArgumentParser(prog="python -m spherical_cl.ablate",
                                     description=f"Run rows of the ablation matrix and tabulate them. Rows: {rows}.")
    parser.add_argument("--config", required=True, help="Base YAML config; each row overrides some of its keys.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Overrides applied to every row.")
    parser.add_argument("--rows", default="ncm,0-6", help="Rows to run, e.g. ncm,0-6 or 1,3 (default: ncm,0-6).")
    parser.add_argument("--seeds", default="0", help="Comma-separated training seeds (default: 0).")
    parser.add_argument("--out", type=Path, default=None, help="Output directory (default: runs/ablation-<config>).")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="Logging level of the console.")
    parser.add_argument("--debug", action="store_true", help="Show the traceback of input errors.")
    return parser


def parse_seeds(text: str) -> list[int]:
    """Parse ``0,1,2`` into seeds.

    Raises:
        ConfigError: a seed is not an integer.
    """
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    bad = [seed for seed in seeds if not 0 <= seed < 2**32]
    if bad:
        raise ConfigError(f"--seeds {bad} are out of range; seeds must be in 0..2**32-1")
    if not seeds:
        raise ConfigError("--seeds is empty; give e.g. --seeds 0,1,2")
    return list(dict.fromkeys(seeds))


def summarize_row(metrics_list: list[dict]) -> dict[str, tuple[float | None, float | None]]:
    """Return (mean, std) over seeds of each table column; std is None for one seed."""
    values: dict[str, list[float]] = {key: [] for key, _ in COLUMNS}
    for metrics in metrics_list:
        drift = [d for d in metrics.get("geodesic_drift", []) if d is not None]
        gap = [g for g in metrics.get("stability_gap", []) if g is not None]
        row = {
            "final_acc": metrics["final_acc"],
            "avg_acc": metrics["avg_acc"],
            "bwt": metrics["bwt"],
            "forgetting": metrics["forgetting"],
            "final_drift": drift[-1] if drift else None,
            "final_gap": gap[-1] if gap else None,
            "wall_time_s": sum(metrics["runtime_s"]),
            "peak_memory_mb": metrics["peak_memory_mb"],
        }
        for key, value in row.items():
            if value is not None:
                values[key].append(float(value))
    summary = {}
    for key, items in values.items():
        if not items:
            summary[key] = (None, None)
            continue
        mean = sum(items) / len(items)
        std = math.sqrt(sum((v - mean) ** 2 for v in items) / (len(items) - 1)) if len(items) > 1 else None
        summary[key] = (mean, std)
    return summary


def format_table(rows: dict[str, list[dict]], descriptions: dict[str, str], header_note: str) -> str:
    """Return the Markdown ablation table, one line per row."""
    def cell(pair: tuple[float | None, float | None], digits: int) -> str:
        mean, std = pair
        if mean is None:
            return "n/a"
        return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"

    lines = [header_note, "",
             "| row | what | seeds | " + " | ".join(title for _, title in COLUMNS) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |"]
    for row, metrics_list in rows.items():
        summary = summarize_row(metrics_list)
        digits = {"final_drift": 4, "wall_time_s": 0, "peak_memory_mb": 0}
        cells = [cell(summary[key], digits.get(key, 2)) for key, _ in COLUMNS]
        lines.append(f"| {row} | {descriptions[row]} | {len(metrics_list)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_ablation(rows: dict[str, list[dict]], path: Path) -> None:
    """Write accuracy after each task (mean over seeds) of every row to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for row, metrics_list in rows.items():
        curves = np.array([m["acc_per_task"] for m in metrics_list])
        tasks = np.arange(1, curves.shape[1] + 1)
        axes[0].plot(tasks, curves.mean(axis=0), marker="o", label=f"row {row}")
    axes[0].set(xlabel="task", ylabel="accuracy on seen classes (%)", title="Accuracy after each task")
    axes[0].legend(fontsize=7)
    names = list(rows)
    finals = [np.mean([m["final_acc"] for m in rows[r]]) for r in names]
    axes[1].bar(range(len(names)), finals)
    axes[1].set_xticks(range(len(names)), [f"row {r}" for r in names], rotation=45, fontsize=8)
    axes[1].set(ylabel="final accuracy (%)", title="Final accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def read_finished_run(run_dir: Path, config) -> dict | None:
    """Return the metrics of a finished run of ``config`` in ``run_dir``, or None if it has no metrics.json.

    Raises:
        RunDirError: the directory contains a finished run of another config, or unreadable
            metrics. Reusing either would mix results.
    """
    from spherical_cl.config import config_hash

    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists():
        return None
    try:
        metrics = json.loads(metrics_path.read_text())
        recorded = json.loads((run_dir / "run_info.json").read_text())["config_hash"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RunDirError(f"cannot reuse the finished run in {run_dir} ({type(error).__name__}: {error}); "
                          "delete that directory to run it again") from None
    if recorded != config_hash(config):
        raise RunDirError(f"{run_dir} contains a run of a different config than this ablation requests; use "
                          "another --out or delete that directory")
    missing = [key for key in ("final_acc", "avg_acc", "acc_per_task", "runtime_s") if key not in metrics]
    if missing:
        raise RunDirError(f"{metrics_path} lacks {missing}; delete {run_dir} to run it again")
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Run the ablation command line; return the process exit code."""
    args = build_parser().parse_intermixed_args(argv)
    configure_logging(args.log_level)
    return run_reporting_input_errors(_run, args)


def _run(args: argparse.Namespace) -> int:
    from spherical_cl.config import load_config
    from spherical_cl.presets import ROW_DESCRIPTIONS, parse_rows, row_overrides

    base = load_config(args.config, args.overrides)
    rows = parse_rows(args.rows)
    seeds = parse_seeds(args.seeds)
    # Validate every row's config before the first run starts.
    plans = {(row, seed): load_config(args.config, [*args.overrides, *row_overrides(row, base), f"seed={seed}"])
             for row in rows for seed in seeds}

    from trainers.experiment import resume_experiment, run_experiment
    from trainers.incremental import NonFiniteLossError

    out = args.out or Path("runs") / f"ablation-{Path(args.config).stem}"
    results: dict[str, list[dict]] = {row: [] for row in rows}
    for (row, seed), config in plans.items():
        run_dir = out / f"row-{row}" / f"seed-{seed}"
        finished = read_finished_run(run_dir, config)
        if finished is not None:
            logger.info("row %s seed %d: finished earlier, reading %s", row, seed, run_dir / "metrics.json")
            results[row].append(finished)
            continue
        logger.info("row %s seed %d: %s", row, seed, ROW_DESCRIPTIONS[row])
        try:
            if (run_dir / "config.yaml").exists():
                # An interrupted run of this row; a different config is rejected, not mixed in.
                results[row].append(resume_experiment(config, run_dir))
            else:
                results[row].append(run_experiment(config, run_dir, overwrite=False))
        except NonFiniteLossError as error:
            print(f"error: row {row} seed {seed}: {error}", file=sys.stderr)
            return 1

    note = (f"Ablation of `{args.config}` (overrides: {' '.join(args.overrides) or 'none'}), seeds "
            f"{', '.join(map(str, seeds))}; headline predictor of each run; mean ± sample std over seeds. "
            "Drift and stability gap are after the last task.")
    table = format_table(results, ROW_DESCRIPTIONS, note)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(table)
    plot_ablation(results, out / "ablation.png")
    print(table)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
