"""Per-task training and test sets of a class-incremental experiment."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from spherical_cl.data.datasets import make_dataset
from spherical_cl.data.sources import DatasetSplits
from spherical_cl.data.split import ClassSplit


class IncrementalData:
    """The datasets of each task, with labels remapped to positions in the class order.

    The training set of task ``t`` contains only task ``t``'s classes. The test set after task
    ``t`` contains every class seen so far, so accuracy is measured over all of them.
    """

    def __init__(self, splits: DatasetSplits, class_split: ClassSplit, *, input_size: int,
                 augment: str = "none", max_train_per_class: int | None = None, subset_seed: int = 0) -> None:
        self.splits = splits
        self.class_split = class_split
        self.input_size = input_size
        self.augment = augment
        self.train_labels = class_split.relabel(splits.train.labels)
        self.test_labels = class_split.relabel(splits.test.labels)
        self.train_indices = self._capped_indices(self.train_labels, max_train_per_class, subset_seed)

    @staticmethod
    def _capped_indices(labels: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
        kept = np.flatnonzero(labels >= 0)
        if cap is None:
            return kept
        rng = np.random.default_rng(seed)
        chosen = []
        for label in np.unique(labels[kept]):
            members = kept[labels[kept] == label]
            chosen.append(np.sort(rng.permutation(members)[:cap]) if len(members) > cap else members)
        return np.sort(np.concatenate(chosen))

    def _capped_indices_among(self, indices: np.ndarray, cap: int, seed: int) -> np.ndarray:
        labels = np.full(len(self.train_labels), -1, dtype=np.int64)
        labels[indices] = self.train_labels[indices]
        return self._capped_indices(labels, cap, seed)

    def train_indices_of(self, task: int) -> np.ndarray:
        """Return the source indices of task ``task``'s training images."""
        classes = self.class_split.task_classes(task)
        labels = self.train_labels[self.train_indices]
        return self.train_indices[(labels >= classes.start) & (labels < classes.stop)]

    def train_set(self, task: int, *, augment: bool = True, max_per_class: int | None = None,
                  seed: int = 0) -> Dataset:
        """Return the training images of task ``task`` only, augmented or with test-time transforms.

        ``max_per_class`` keeps a seeded subset of at most that many images per class.
        """
        indices = self.train_indices_of(task)
        if max_per_class is not None:
            indices = self._capped_indices_among(indices, max_per_class, seed)
        return make_dataset(self.splits.train, indices, self.train_labels[indices], train=augment,
                            augment=self.augment if augment else "none", input_size=self.input_size)

    def test_set(self, task: int) -> Dataset:
        """Return the test images of every class seen up to and including task ``task``."""
        seen = self.class_split.seen_classes(task)
        indices = np.flatnonzero((self.test_labels >= 0) & (self.test_labels < seen.stop))
        return make_dataset(self.splits.test, indices, self.test_labels[indices], train=False,
                            augment="none", input_size=self.input_size)

    def test_counts(self) -> list[int]:
        """Return the number of test images of each task's classes."""
        task_of = self.class_split.task_of_label()
        labels = self.test_labels[self.test_labels >= 0]
        return np.bincount(task_of[labels], minlength=self.class_split.num_tasks).tolist()
