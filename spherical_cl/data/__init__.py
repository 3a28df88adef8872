"""Datasets, the class-incremental split and per-task data."""

from spherical_cl.data.datasets import BatchPreprocessor, make_dataset
from spherical_cl.data.sources import DatasetSplits, ImageArrays, ImageList, load_source
from spherical_cl.data.split import ClassSplit, build_class_split
from spherical_cl.data.tasks import IncrementalData

__all__ = [
    "BatchPreprocessor",
    "ClassSplit",
    "DatasetSplits",
    "ImageArrays",
    "ImageList",
    "IncrementalData",
    "build_class_split",
    "load_source",
    "make_dataset",
]
