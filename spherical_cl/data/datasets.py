"""Torch datasets over a source and the batched preprocessing that runs on the device.

A dataset item is a uint8 image tensor (3, H, W) and its model label. Per-sample work stays
small: augmentation at the stored resolution for arrays, decoding and cropping for files.
Conversion to float, resizing to the backbone's input size and normalisation run on whole
batches on the training device (:class:`BatchPreprocessor`), so a 32 px image is not
upsampled to 224 px in a loader worker.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

from spherical_cl.data.sources import ImageArrays, ImageList, ImageSource
from spherical_cl.errors import DataError

# Test-time resize of file images before the centre crop (the usual 224/256 ratio).
CENTER_CROP_FRACTION = 0.875


class ArrayImageDataset(Dataset):
    """Selected rows of an :class:`ImageArrays` with model labels."""

    def __init__(self, arrays: ImageArrays, indices: np.ndarray, labels: np.ndarray,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.arrays = arrays
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.arrays.images[self.indices[item]]).permute(2, 0, 1).contiguous()
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[item])


class FileImageDataset(Dataset):
    """Selected files of an :class:`ImageList`, decoded with PIL and cropped to a fixed size."""

    def __init__(self, files: ImageList, indices: np.ndarray, labels: np.ndarray,
                 transform: Callable) -> None:
        self.files = files
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path = self.files.root / self.files.paths[self.indices[item]]
        try:
            with Image.open(path) as image:
                tensor = self.transform(image.convert("RGB"))
        except (OSError, Image.DecompressionBombError) as error:
            raise DataError(f"cannot decode image {path}: {error}; remove it from the split file or replace it") from None
        return tensor, int(self.labels[item])


def make_dataset(source: ImageSource, indices: np.ndarray, labels: np.ndarray, *, train: bool,
                 augment: str, input_size: int) -> Dataset:
    """Build the dataset of ``source[indices]`` with training or test-time transforms."""
    if isinstance(source, ImageArrays):
        stored_size = source.images.shape[1]
        transform = array_augmentation(augment, stored_size) if train else None
        return ArrayImageDataset(source, indices, labels, transform)
    return FileImageDataset(source, indices, labels, file_transform(augment if train else "none", input_size, train))


def array_augmentation(augment: str, size: int) -> Callable | None:
    """Return the per-sample augmentation of uint8 (3, H, W) images at their stored size."""
    flip = v2.RandomHorizontalFlip()
    if augment == "none":
        return None
    if augment == "flip":
        return flip
    if augment == "pad_crop_flip":
        return v2.Compose([v2.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"), flip])
    if augment == "random_resized_crop_flip":
        return v2.Compose([v2.RandomResizedCrop(size, antialias=True), flip])
    raise ValueError(f"unknown augmentation {augment!r}")


def file_transform(augment: str, input_size: int, train: bool) -> Callable:
    """Return the decode-time transform of file images to uint8 (3, input_size, input_size)."""
    resize = int(round(input_size / CENTER_CROP_FRACTION))
    center_crop = [v2.Resize(resize, antialias=True), v2.CenterCrop(input_size)]
    if not train or augment == "none":
        steps = center_crop
    elif augment == "flip":
        steps = [*center_crop, v2.RandomHorizontalFlip()]
    else:
        # Files have no fixed stored size, so both crop augmentations become a random resized crop.
        steps = [v2.RandomResizedCrop(input_size, antialias=True), v2.RandomHorizontalFlip()]
    return v2.Compose([*steps, v2.PILToTensor()])


class BatchPreprocessor(nn.Module):
    """Convert uint8 (B, 3, h, w) batches to normalised float (B, 3, S, S) on their device."""

    def __init__(self, input_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=x.shape[-1] > self.input_size)
        return (x - self.mean) / self.std
