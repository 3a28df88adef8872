"""Dataset sources: each returns its train and test images with integer class labels.

Array sources (``digits``, ``npz``, ``cifar100``) keep every image in memory as uint8
(N, H, W, 3). The ``imagefolder`` source keeps file paths from fixed split files and decodes
on the fly. No source moves or rewrites files on disk, and none splits at random at run
time: the digits split is a fixed seeded stratified split, the others come from files.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spherical_cl.errors import DataError

logger = logging.getLogger(__name__)

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


@dataclass
class ImageArrays:
    """Images in memory: ``images`` uint8 (N, H, W, 3), ``labels`` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray


@dataclass
class ImageList:
    """Image files under ``root`` with int64 ``labels``; ``paths`` are relative to ``root``."""

    root: Path
    paths: list[str]
    labels: np.ndarray


ImageSource = ImageArrays | ImageList


@dataclass
class DatasetSplits:
    """The train and test sources of one dataset and its number of classes."""

    train: ImageSource
    test: ImageSource
    num_classes: int
    class_names: list[str]


def load_source(source: str, root: str | None, *, train_list: str = "train.txt", test_list: str = "test.txt",
                download: bool = False) -> DatasetSplits:
    """Load a dataset by source name; see :class:`~spherical_cl.config.DataConfig`.

    Raises:
        DataError: the files are missing or their contents are inconsistent.
    """
    if source == "digits":
        return load_digits()
    if source == "npz":
        return load_npz(Path(root))
    if source == "cifar100":
        return load_torchvision_cifar100(Path(root) if root else Path("data/cifar100"), download=download)
    if source == "imagefolder":
        return load_imagefolder(Path(root), train_list, test_list)
    raise DataError(f"unknown data source {source!r}; use digits, npz, cifar100 or imagefolder")


def load_digits() -> DatasetSplits:
    """Load scikit-learn's bundled 8x8 digits with a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    # Pixel values are 0..16; scale to the 0..255 range every other source uses.
    gray = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    return DatasetSplits(
        train=ImageArrays(rgb[train_idx], labels[train_idx]),
        test=ImageArrays(rgb[test_idx], labels[test_idx]),
        num_classes=10,
        class_names=[str(d) for d in range(10)],
    )


def load_npz(root: Path) -> DatasetSplits:
    """Load ``root/train.npz`` and ``root/test.npz`` with arrays ``x``, ``y`` and optional ``classes``."""
    if not root.is_dir():
        raise DataError(f"dataset root not found: {root}; set data.root to a directory with train.npz and test.npz")
    train, train_names = _read_npz(root / "train.npz")
    test, _ = _read_npz(root / "test.npz")
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    _check_classes_present(train.labels, num_classes, root / "train.npz")
    if train_names is not None and len(train_names) < num_classes:
        raise DataError(
            f"{root / 'train.npz'}: 'classes' names {len(train_names)} classes but labels go up to {num_classes - 1}"
        )
    names = list(train_names) if train_names is not None else [str(c) for c in range(num_classes)]
    return DatasetSplits(train=train, test=test, num_classes=num_classes, class_names=names)


def _read_npz(path: Path) -> tuple[ImageArrays, list[str] | None]:
    if not path.is_file():
        raise DataError(f"file not found: {path}; an npz dataset needs train.npz and test.npz in data.root")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ("x", "y") if key not in archive.files]
            if missing:
                raise DataError(f"{path} lacks array(s) {missing}; it has {archive.files}, needs x (N,H,W,C) and y (N,)")
            images, labels = archive["x"], archive["y"]
            names = [str(n) for n in archive["classes"]] if "classes" in archive.files else None
    except (OSError, ValueError, EOFError) as error:
        # numpy reports a file that is not an npz archive as pickled data, which misleads.
        raise DataError(f"cannot read {path} as an .npz archive of arrays x and y ({type(error).__name__}); "
                        "write it with numpy.savez") from None
    return ImageArrays(_checked_images(images, path), _checked_labels(labels, len(images), path)), names


def _checked_images(images: np.ndarray, path: Path) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(
            f"{path}: x has shape {images.shape}; expected (N, H, W, C) with C = 1 or 3, channels last"
        )
    if images.dtype != np.uint8:
        raise DataError(f"{path}: x has dtype {images.dtype}; expected uint8 pixels in 0..255")
    if len(images) == 0:
        raise DataError(f"{path}: x contains no images; each split needs at least one")
    if min(images.shape[1:3]) == 0:
        raise DataError(f"{path}: images have size {images.shape[1]}x{images.shape[2]}; both sides must be >= 1")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def _checked_labels(labels: np.ndarray, count: int, path: Path) -> np.ndarray:
    if labels.ndim != 1:
        raise DataError(f"{path}: y has shape {labels.shape}; expected (N,)")
    if len(labels) != count:
        raise DataError(f"{path}: x has {count} images but y has {len(labels)} labels; they must match")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: y has dtype {labels.dtype}; expected integer class ids")
    if count and labels.min() < 0:
        raise DataError(f"{path}: y contains negative label {int(labels.min())}; labels must be 0..C-1")
    return labels.astype(np.int64)


def _check_classes_present(labels: np.ndarray, num_classes: int, path: Path) -> None:
    # np.unique keeps memory bounded by the number of images even for a label of 10**9.
    present = np.unique(labels)
    if len(present) == num_classes:
        return
    first_missing: list[int] = []
    expected = 0
    # Walk the sorted labels instead of building 0..C-1, which a label of 10**9 would make huge.
    for value in [*present.tolist(), num_classes]:
        while expected < value and len(first_missing) < 5:
            first_missing.append(expected)
            expected += 1
        expected = value + 1
    raise DataError(
        f"{path}: labels go up to {num_classes - 1} but only {len(present)} classes have training images "
        f"(first missing: {first_missing}); labels must cover 0..C-1 without gaps"
    )


def load_torchvision_cifar100(root: Path, *, download: bool) -> DatasetSplits:
    """Load CIFAR-100 through torchvision, downloading into ``root`` when ``download`` is set."""
    from torchvision.datasets import CIFAR100

    try:
        train = CIFAR100(str(root), train=True, download=download)
        test = CIFAR100(str(root), train=False, download=download)
    except (RuntimeError, OSError) as error:
        raise DataError(
            f"CIFAR-100 not found in {root} and not downloaded ({type(error).__name__}: {error}); "
            "set data.download=true with network access, or use data.source=npz with local arrays"
        ) from error
    return DatasetSplits(
        train=ImageArrays(np.asarray(train.data), np.asarray(train.targets, dtype=np.int64)),
        test=ImageArrays(np.asarray(test.data), np.asarray(test.targets, dtype=np.int64)),
        num_classes=100,
        class_names=list(train.classes),
    )


def load_imagefolder(root: Path, train_list: str, test_list: str) -> DatasetSplits:
    """Load image paths and labels from split files under ``root``.

    Each split file has one ``relative/path label`` line per image; blank lines and lines
    starting with ``#`` are skipped. Paths may contain spaces, so the label is the last
    field of the line.
    """
    if not root.is_dir():
        raise DataError(f"dataset root not found: {root}; set data.root to the image directory")
    train = _read_split_file(root, root / train_list)
    test = _read_split_file(root, root / test_list)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    _check_classes_present(train.labels, num_classes, root / train_list)
    return DatasetSplits(train=train, test=test, num_classes=num_classes,
                         class_names=[str(c) for c in range(num_classes)])


def _read_split_file(root: Path, split_file: Path) -> ImageList:
    if not split_file.is_file():
        raise DataError(f"split file not found: {split_file}; see docs/data.md for the imagefolder layout")
    try:
        text = split_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{split_file} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    paths, labels = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, _, label = line.rpartition(" ")
        if not path or not re.fullmatch(r"-?[0-9]+", label):
            raise DataError(f"{split_file}:{number}: expected 'relative/path label' with an integer label, got {line!r}")
        if int(label) < 0:
            raise DataError(f"{split_file}:{number}: negative label {label}; labels must be 0..C-1")
        paths.append(path)
        labels.append(int(label))
    if not paths:
        raise DataError(f"{split_file} lists no images")
    missing = [p for p in paths if not (root / p).is_file()]
    if missing:
        raise DataError(f"{split_file}: {missing[0]!r} not found under {root} ({len(missing)} of {len(paths)} missing)")
    return ImageList(root=root, paths=paths, labels=np.asarray(labels, dtype=np.int64))
