import math

import pytest

from spherical_cl import metrics

# After task 1: 90 on task 1. After task 2: 70 on task 1, 80 on task 2.
# After task 3: 60, 50, 100.
R = [[90.0, None, None], [70.0, 80.0, None], [60.0, 50.0, 100.0]]
COUNTS = [100, 100, 200]


def test_seen_accuracy_weights_by_test_images():
    assert metrics.seen_accuracy(R, COUNTS) == pytest.approx([90.0, 75.0, (60 * 100 + 50 * 100 + 100 * 200) / 400])


def test_bwt_and_forgetting_hand_computed():
    # BWT = ((60 - 90) + (50 - 80)) / 2 = -30; forgetting = ((90 - 60) + (80 - 50)) / 2 = 30.
    assert metrics.backward_transfer(R) == pytest.approx(-30.0)
    assert metrics.average_forgetting(R) == pytest.approx(30.0)


def test_forgetting_uses_best_earlier_accuracy():
    matrix = [[50.0, None, None], [80.0, 60.0, None], [70.0, 60.0, 90.0]]
    # Task 1 peaked at 80 after task 2: forgetting (80-70) and (60-60) -> 5; BWT (70-50 + 60-60)/2 = 10.
    assert metrics.average_forgetting(matrix) == pytest.approx(5.0)
    assert metrics.backward_transfer(matrix) == pytest.approx(10.0)


def test_old_new_accuracy():
    old, new = metrics.old_new_accuracy(R, COUNTS)
    assert old == [None, pytest.approx(70.0), pytest.approx(55.0)]
    assert new == [90.0, 80.0, 100.0]


def test_single_task_has_no_bwt():
    summary = metrics.summarize([[42.5]], [10])
    assert summary["bwt"] is None
    assert summary["forgetting"] is None
    assert summary["final_acc"] == 42.5
    assert summary["avg_acc"] == 42.5


def test_no_rounding_and_no_mutation():
    matrix = [[33.333333333, None], [12.3456789, 66.6666666]]
    snapshot = [list(row) for row in matrix]
    summary = metrics.summarize(matrix, [3, 3])
    assert matrix == snapshot
    assert summary["acc_matrix"][1][0] == 12.3456789
    assert summary["final_acc"] == pytest.approx((12.3456789 + 66.6666666) / 2, abs=1e-12)
    assert summary["avg_acc"] == pytest.approx((33.333333333 + summary["final_acc"]) / 2, abs=1e-12)


def test_invalid_matrix():
    with pytest.raises(ValueError, match="square"):
        metrics.as_matrix([[1.0, None], [1.0]])
    with pytest.raises(ValueError, match="NaN on or below"):
        metrics.as_matrix([[1.0, None], [None, 2.0]])
    assert math.isnan(metrics.as_matrix([[1.0, None], [2.0, 3.0]])[0, 1])
