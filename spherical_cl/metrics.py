"""Class-incremental metrics as pure functions of the accuracy matrix.

``R[i][j]`` is the accuracy in percent on task j's test classes after training task i
(0-based), defined for j ≤ i. Entries above the diagonal are NaN. Functions never round
and never modify their inputs; they return plain floats and lists.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def as_matrix(acc_matrix: Sequence[Sequence[float | None]]) -> np.ndarray:
    """Return a float64 copy of a square accuracy matrix with None above the diagonal as NaN.

    Raises:
        ValueError: the matrix is not square or misses an entry on or below the diagonal.
    """
    rows = [[math.nan if v is None else float(v) for v in row] for row in acc_matrix]
    size = len(rows)
    if any(len(row) != size for row in rows):
        raise ValueError(f"accuracy matrix must be square, got row lengths {[len(r) for r in rows]}")
    matrix = np.array(rows, dtype=np.float64).reshape(size, size)
    lower = np.tril_indices(size)
    if np.isnan(matrix[lower]).any():
        raise ValueError("accuracy matrix has NaN on or below the diagonal; R[i][j] is needed for every j <= i")
    return matrix


def seen_accuracy(acc_matrix, test_counts: Sequence[int]) -> list[float]:
    """Return the accuracy over all seen classes after each task, weighted by test images."""
    matrix = as_matrix(acc_matrix)
    counts = np.asarray(test_counts, dtype=np.float64)
    return [float(np.dot(matrix[i, : i + 1], counts[: i + 1]) / counts[: i + 1].sum()) for i in range(len(matrix))]


def average_incremental_accuracy(acc_per_task: Sequence[float]) -> float:
    """Return the mean over tasks of the accuracy on all seen classes (Ā)."""
    return float(np.mean(np.asarray(acc_per_task, dtype=np.float64)))


def backward_transfer(acc_matrix) -> float | None:
    """Return BWT = 1/(T−1) Σ_{j<T} (R[T][j] − R[j][j]); None for a single task."""
    matrix = as_matrix(acc_matrix)
    last = len(matrix) - 1
    if last == 0:
        return None
    return float(np.mean([matrix[last, j] - matrix[j, j] for j in range(last)]))


def average_forgetting(acc_matrix) -> float | None:
    """Return the mean over old tasks j of max_{j≤i<T} R[i][j] − R[T][j]; None for one task."""
    matrix = as_matrix(acc_matrix)
    last = len(matrix) - 1
    if last == 0:
        return None
    return float(np.mean([matrix[j:last, j].max() - matrix[last, j] for j in range(last)]))


def old_new_accuracy(acc_matrix, test_counts: Sequence[int]) -> tuple[list[float | None], list[float]]:
    """Return the accuracy on old classes (tasks before i) and on new classes (task i) after each task.

    The old-class accuracy is weighted by test images and is None after the first task.
    """
    matrix = as_matrix(acc_matrix)
    counts = np.asarray(test_counts, dtype=np.float64)
    old: list[float | None] = [None]
    for i in range(1, len(matrix)):
        old.append(float(np.dot(matrix[i, :i], counts[:i]) / counts[:i].sum()))
    new = [float(matrix[i, i]) for i in range(len(matrix))]
    return old, new


def matrix_to_json(acc_matrix) -> list[list[float | None]]:
    """Return the matrix as nested lists with None above the diagonal."""
    matrix = as_matrix(acc_matrix)
    return [[float(v) if j <= i else None for j, v in enumerate(row)] for i, row in enumerate(matrix)]


def summarize(acc_matrix, test_counts: Sequence[int]) -> dict:
    """Return every accuracy metric of one predictor as a JSON-ready dict."""
    acc_per_task = seen_accuracy(acc_matrix, test_counts)
    a_old, a_new = old_new_accuracy(acc_matrix, test_counts)
    return {
        "acc_matrix": matrix_to_json(acc_matrix),
        "acc_per_task": acc_per_task,
        "avg_acc": average_incremental_accuracy(acc_per_task),
        "final_acc": acc_per_task[-1],
        "bwt": backward_transfer(acc_matrix),
        "forgetting": average_forgetting(acc_matrix),
        "a_old": a_old,
        "a_new": a_new,
    }
