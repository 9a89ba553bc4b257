"""Data sets, looked up by name in ``DATASETS``; each lives in its own module here."""

from raymtl.data.base import DATASETS, DatasetBundle, MultiTaskArrays, build_dataset, collate_batch
from raymtl.registry import import_submodules

import_submodules(__name__)

__all__ = ["DATASETS", "DatasetBundle", "MultiTaskArrays", "build_dataset", "collate_batch"]
