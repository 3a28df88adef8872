import numpy as np
import pytest

from spherical_cl.data.split import build_class_split
from spherical_cl.errors import ConfigError


def test_even_split_identity():
    split = build_class_split(10, num_tasks=5, class_order="identity")
    assert split.task_sizes == (2, 2, 2, 2, 2)
    assert split.class_order == tuple(range(10))
    assert list(split.task_classes(2)) == [4, 5]
    assert list(split.seen_classes(2)) == [0, 1, 2, 3, 4, 5]
    assert split.task_of_label().tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_permutation_is_seeded():
    first = build_class_split(100, num_tasks=10, order_seed=1993)
    second = build_class_split(100, num_tasks=10, order_seed=1993)
    other = build_class_split(100, num_tasks=10, order_seed=7)
    assert first.class_order == second.class_order
    assert first.class_order != other.class_order
    assert sorted(first.class_order) == list(range(100))
    assert first.class_order[:5] == (68, 56, 78, 8, 23)


def test_larger_first_task_and_classes_per_task():
    split = build_class_split(100, classes_per_task=10, first_task_classes=50, class_order="identity")
    assert split.task_sizes == (50, 10, 10, 10, 10, 10)
    split = build_class_split(100, num_tasks=6, first_task_classes=50, class_order="identity")
    assert split.task_sizes == (50, 10, 10, 10, 10, 10)


def test_explicit_order_subset():
    split = build_class_split(10, num_tasks=2, class_order="explicit", class_list=[9, 3, 5, 1])
    assert split.class_order == (9, 3, 5, 1)
    assert split.task_sizes == (2, 2)
    labels = split.relabel(np.array([1, 9, 0, 5]))
    assert labels.tolist() == [3, 0, -1, 2]


def test_remainder_policies():
    with pytest.raises(ConfigError, match="do not divide"):
        build_class_split(10, num_tasks=3)
    assert build_class_split(10, num_tasks=3, remainder="first").task_sizes == (4, 3, 3)
    assert build_class_split(10, num_tasks=3, remainder="last").task_sizes == (3, 3, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_tasks=11), "more than the 10 classes"),
        (dict(classes_per_task=20), "exceeds"),
        (dict(num_tasks=2, first_task_classes=20), "exceeds the 10 classes"),
        (dict(num_tasks=2, class_order="explicit", class_list=[1, 1]), "repeats"),
        (dict(num_tasks=2, class_order="explicit", class_list=[0, 12]), "outside"),
    ],
)
def test_invalid_splits(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_class_split(10, **kwargs)
