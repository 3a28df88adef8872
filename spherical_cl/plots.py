"""PNG plots of one run's metrics: accuracy per task, the accuracy matrix, old and new classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(metrics: dict, out_dir: Path) -> list[Path]:
    """Write ``acc_per_task.png``, ``acc_matrix.png`` and ``old_new.png``; return their paths."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = np.arange(1, len(metrics["classes_per_task"]) + 1)
    written = []

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for name, predictor in metrics["predictors"].items():
        axis.plot(tasks, predictor["acc_per_task"], marker="o", label=name)
    axis.set(xlabel="task", ylabel="accuracy on seen classes (%)", title="Accuracy after each task")
    axis.set_xticks(tasks)
    axis.legend()
    written.append(_save(figure, out_dir / "acc_per_task.png", plt))

    headline = metrics["predictors"][metrics["headline"]]
    matrix = np.array([[np.nan if v is None else v for v in row] for row in headline["acc_matrix"]])
    figure, axis = plt.subplots(figsize=(4.5, 4))
    image = axis.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
    for (i, j), value in np.ndenumerate(matrix):
        if not np.isnan(value) and len(matrix) <= 12:
            axis.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white")
    axis.set(xlabel="evaluated task j", ylabel="after task i", title=f"R[i][j] ({metrics['headline']})")
    axis.set_xticks(tasks - 1, tasks)
    axis.set_yticks(tasks - 1, tasks)
    figure.colorbar(image, ax=axis, label="accuracy (%)")
    written.append(_save(figure, out_dir / "acc_matrix.png", plt))

    figure, axis = plt.subplots(figsize=(5, 3.5))
    old = [np.nan if v is None else v for v in headline["a_old"]]
    axis.plot(tasks, old, marker="o", label="old classes")
    axis.plot(tasks, headline["a_new"], marker="s", label="new classes")
    axis.set(xlabel="task", ylabel="accuracy (%)", title=f"Old and new classes ({metrics['headline']})")
    axis.set_xticks(tasks)
    axis.legend()
    written.append(_save(figure, out_dir / "old_new.png", plt))
    return written


def _save(figure, path: Path, plt) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
