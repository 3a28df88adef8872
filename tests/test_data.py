import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CIFAR100_NPZ
from spherical_cl.data import BatchPreprocessor, IncrementalData, build_class_split, load_source
from spherical_cl.errors import DataError


def test_digits_split_is_fixed_and_stratified():
    first = load_source("digits", None)
    second = load_source("digits", None)
    assert first.num_classes == 10
    assert np.array_equal(first.train.labels, second.train.labels)
    assert first.train.images.shape[1:] == (8, 8, 3)
    assert first.train.images.dtype == np.uint8
    assert len(first.train.labels) + len(first.test.labels) == 1797
    counts = np.bincount(first.test.labels)
    assert counts.min() >= 35


def test_training_set_holds_only_task_classes(npz_dataset):
    splits = load_source("npz", str(npz_dataset))
    split = build_class_split(splits.num_classes, num_tasks=3, order_seed=5)
    data = IncrementalData(splits, split, input_size=16, augment="pad_crop_flip")
    for task in range(3):
        labels = {int(label) for _, label in data.train_set(task)}
        assert labels == set(split.task_classes(task))
        test_labels = {int(label) for _, label in data.test_set(task)}
        assert test_labels == set(split.seen_classes(task))
    assert data.test_counts() == [8, 8, 8]


def test_max_train_per_class_is_seeded(npz_dataset):
    splits = load_source("npz", str(npz_dataset))
    split = build_class_split(splits.num_classes, num_tasks=2)
    first = IncrementalData(splits, split, input_size=16, max_train_per_class=5, subset_seed=1)
    second = IncrementalData(splits, split, input_size=16, max_train_per_class=5, subset_seed=1)
    assert np.array_equal(first.train_indices, second.train_indices)
    assert len(first.train_indices) == 6 * 5


def _write(path, **arrays):
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    "train_arrays, message",
    [
        (dict(y=np.zeros(4, dtype=np.int64)), "lacks array"),
        (dict(x=np.zeros((4, 8, 8, 3), np.uint8), y=np.zeros(3, dtype=np.int64)), "4 images but y has 3"),
        (dict(x=np.zeros((4, 8, 8, 3), np.uint8), y=np.zeros(4, dtype=np.float32)), "integer class ids"),
        (dict(x=np.zeros((4, 8, 8, 3), np.uint8), y=np.array([0, 1, -1, 2])), "negative label -1"),
        (dict(x=np.zeros((4, 8, 8, 2), np.uint8), y=np.zeros(4, dtype=np.int64)), "expected (N, H, W, C)"),
        (dict(x=np.zeros((4, 8), np.uint8), y=np.zeros(4, dtype=np.int64)), "expected (N, H, W, C)"),
        (dict(x=np.zeros((4, 8, 8, 3), np.float32), y=np.zeros(4, dtype=np.int64)), "uint8"),
    ],
)
def test_npz_errors_name_the_problem(tmp_path, train_arrays, message):
    _write(tmp_path / "train.npz", **train_arrays)
    _write(tmp_path / "test.npz", x=np.zeros((2, 8, 8, 3), np.uint8), y=np.zeros(2, dtype=np.int64))
    with pytest.raises(DataError) as caught:
        load_source("npz", str(tmp_path))
    assert message in str(caught.value)
    assert "train.npz" in str(caught.value)


def test_missing_root_and_files(tmp_path):
    with pytest.raises(DataError, match="dataset root not found"):
        load_source("npz", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="train.npz"):
        load_source("npz", str(tmp_path))


def test_imagefolder_reads_split_files(tmp_path):
    rng = np.random.default_rng(0)
    lines = {"train.txt": [], "test.txt": []}
    for label in range(3):
        for index in range(3):
            relative = f"class {label}/img_{index}.png"
            (tmp_path / f"class {label}").mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / relative)
            lines["train.txt" if index < 2 else "test.txt"].append(f"{relative} {label}")
    for name, content in lines.items():
        (tmp_path / name).write_text("# comment\n" + "\n".join(content) + "\n")
    splits = load_source("imagefolder", str(tmp_path))
    assert splits.num_classes == 3
    split = build_class_split(3, num_tasks=3, class_order="identity")
    data = IncrementalData(splits, split, input_size=24, augment="random_resized_crop_flip")
    image, label = data.train_set(1)[0]
    assert image.shape == (3, 24, 24)
    assert image.dtype == torch.uint8
    assert label == 1
    (tmp_path / "test.txt").write_text("missing.png 0\n")
    with pytest.raises(DataError, match="'missing.png' not found"):
        load_source("imagefolder", str(tmp_path))
    (tmp_path / "test.txt").write_text("no_label_here\n")
    with pytest.raises(DataError, match="test.txt:1"):
        load_source("imagefolder", str(tmp_path))


def test_batch_preprocessor_resizes_and_normalises():
    preprocess = BatchPreprocessor(16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    images = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    output = preprocess(images)
    assert output.shape == (2, 3, 16, 16)
    torch.testing.assert_close(output, torch.full_like(output, 2.0))


@pytest.mark.skipif(not (CIFAR100_NPZ / "train.npz").is_file(), reason="shared CIFAR-100 arrays not present")
def test_shared_cifar100_npz_loads():
    splits = load_source("npz", str(CIFAR100_NPZ))
    assert splits.num_classes == 100
    assert splits.train.images.shape == (50000, 32, 32, 3)
    assert splits.class_names[0] == "apple"
    assert np.bincount(splits.test.labels).tolist() == [100] * 100
