"""End-to-end wall time and peak memory of one training run, by the command line.

Runs ``python -m spherical_cl.train --config CONFIG --run-dir OUT [KEY=VALUE ...]`` in a
child process. It reports the wall time of the whole command (start-up, data and weight
loading, training, evaluation, checkpoints) and the time of each task from
``metrics.json``. It also reports the child's peak resident memory and the final and
average accuracy.

    OMP_NUM_THREADS=1 TORCH_HOME=../shared/torch-hub PYTHONPATH=. .venv/bin/python \\
        benchmarks/end_to_end.py --config configs/cifar100_mobilenetv2.yaml --out /tmp/e2e
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from harness import cpu_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML experiment config")
    parser.add_argument("--out", type=Path, required=True, help="run directory to write (replaced if it exists)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    args = parser.parse_args()

    command = [sys.executable, "-m", "spherical_cl.train", "--config", args.config, "--run-dir", str(args.out),
               "--overwrite", "logging.progress=false", *args.overrides]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        print(result.stderr[-4000:], file=sys.stderr)
        return result.returncode
    # ru_maxrss of the children is in kilobytes on Linux; the child is the only one.
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    metrics = json.loads((args.out / "metrics.json").read_text())
    record = {
        "command": " ".join(command),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "cpu": cpu_model(),
        "cpus": len(os.sched_getaffinity(0)),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "wall_s": wall,
        "train_eval_s": sum(metrics["runtime_s"]),
        "task_s": metrics["runtime_s"],
        "peak_rss_mb": peak_rss_mb,
        "final_acc": metrics["final_acc"],
        "avg_acc": metrics["avg_acc"],
        "method": metrics["method"],
    }
    print(f"| method | wall (s) | tasks (s) | slowest task (s) | peak RSS (MB) | final acc | avg acc |\n"
          f"| --- | --- | --- | --- | --- | --- | --- |\n"
          f"| {record['method']} | {wall:.0f} | {record['train_eval_s']:.0f} | {max(record['task_s']):.1f} | "
          f"{peak_rss_mb:.0f} | {record['final_acc']:.2f} | {record['avg_acc']:.2f} |")
    print(f"{record['date']}, {record['cpu']}, {record['cpus']} CPUs, OMP_NUM_THREADS={record['omp_num_threads']}")
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
