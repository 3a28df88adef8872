"""The class-incremental split: which classes each task introduces, in which order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spherical_cl.errors import ConfigError


@dataclass(frozen=True)
class ClassSplit:
    """A class order and its partition into tasks.

    Attributes:
        class_order: original class ids in the order they are learned. Position ``i`` in
            this list is the label the model uses for that class.
        task_sizes: number of classes each task introduces.
    """

    class_order: tuple[int, ...]
    task_sizes: tuple[int, ...]

    @property
    def num_tasks(self) -> int:
        return len(self.task_sizes)

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    def task_classes(self, task: int) -> range:
        """Return the model labels (positions in ``class_order``) of task ``task`` (0-based)."""
        start = sum(self.task_sizes[:task])
        return range(start, start + self.task_sizes[task])

    def seen_classes(self, task: int) -> range:
        """Return the model labels of every class up to and including task ``task``."""
        return range(0, sum(self.task_sizes[: task + 1]))

    def task_of_label(self) -> np.ndarray:
        """Return an array mapping each model label to the 0-based task that introduces it."""
        return np.repeat(np.arange(self.num_tasks), self.task_sizes)

    def relabel(self, original_labels: np.ndarray) -> np.ndarray:
        """Map original class ids to model labels; classes outside the order map to -1."""
        lookup = np.full(max(max(self.class_order), int(original_labels.max(initial=0))) + 1, -1, dtype=np.int64)
        lookup[list(self.class_order)] = np.arange(self.num_classes)
        return lookup[original_labels]


def build_class_split(
    num_classes: int,
    *,
    num_tasks: int | None = None,
    classes_per_task: int | None = None,
    first_task_classes: int | None = None,
    remainder: str = "error",
    class_order: str = "permutation",
    class_list: list[int] | None = None,
    order_seed: int = 1993,
) -> ClassSplit:
    """Partition ``num_classes`` classes into tasks.

    ``classes_per_task`` takes precedence over ``num_tasks``. With ``first_task_classes``
    the first task is that large and the rest is divided evenly. Classes left over by an
    uneven division go to the first or last task when ``remainder`` is ``first`` or ``last``.

    Raises:
        ConfigError: the numbers do not partition the classes, or the explicit order is
            not a permutation of a subset of the classes.
    """
    order = _class_order(num_classes, class_order, class_list, order_seed)
    total = len(order)
    first = first_task_classes or 0
    if first > total:
        raise ConfigError(f"data.first_task_classes={first} exceeds the {total} classes available")
    rest = total - first

    if classes_per_task is not None:
        if classes_per_task > max(rest, 1):
            raise ConfigError(
                f"data.classes_per_task={classes_per_task} exceeds the {rest} classes to divide; lower it"
            )
        count = rest // classes_per_task if rest else 0
        sizes = [classes_per_task] * count
        left = rest - count * classes_per_task
    else:
        tasks_after_first = num_tasks - (1 if first else 0)
        if tasks_after_first < 0 or (tasks_after_first == 0 and rest > 0):
            raise ConfigError(f"data.num_tasks={num_tasks} leaves no task for the {rest} classes after the first task")
        if tasks_after_first > rest:
            if first:
                raise ConfigError(
                    f"data.num_tasks={num_tasks} with data.first_task_classes={first} leaves {rest} classes for "
                    f"{tasks_after_first} tasks; use at most {rest + 1} tasks or a smaller first task"
                )
            raise ConfigError(f"data.num_tasks={num_tasks} is more than the {total} classes allow; use at most "
                              f"{total} tasks")
        per_task = rest // tasks_after_first if tasks_after_first else 0
        sizes = [per_task] * tasks_after_first
        left = rest - per_task * tasks_after_first

    if left:
        if remainder == "error" or not sizes:
            raise ConfigError(
                f"{rest} classes do not divide into tasks of {sizes[0] if sizes else 0} classes ({left} left over); "
                "set data.remainder=first or data.remainder=last, or change the task count"
            )
        index = 0 if remainder == "first" else -1
        sizes[index] += left
    if first:
        sizes.insert(0, first)
    return ClassSplit(class_order=tuple(int(c) for c in order), task_sizes=tuple(sizes))


def _class_order(num_classes: int, mode: str, class_list: list[int] | None, seed: int) -> list[int]:
    if mode == "identity":
        return list(range(num_classes))
    if mode == "permutation":
        # The legacy RandomState stream, as PyCIL and LAMDA-PILOT draw it: with seed 1993 the
        # CIFAR-100 order starts 68, 56, 78, 8, 23, the order most published tables use.
        return np.random.RandomState(seed).permutation(num_classes).tolist()
    if not class_list:
        raise ConfigError("data.class_order is 'explicit' but data.class_list is empty")
    bad = [c for c in class_list if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"data.class_list has ids outside 0..{num_classes - 1}: {bad[:5]}")
    if len(set(class_list)) != len(class_list):
        duplicates = sorted({c for c in class_list if class_list.count(c) > 1})
        raise ConfigError(f"data.class_list repeats class ids {duplicates[:5]}; list each class once")
    return list(class_list)
