"""Multi-task data containers shared by every data set, and the data set registry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from raymtl.errors import ConfigError
from raymtl.registry import Registry
from raymtl.tasks import TaskSpec

DATASETS: Registry[DatasetBundle] = Registry("dataset")


class MultiTaskArrays(Dataset):
    """In-memory multi-task split: uint8 images [N,C,H,W], per-task targets, stable int64 ids.

    Samples are dicts {"id", "image" (float in [0,1]), "targets": {task: tensor}}. Batched
    indexing (``__getitems__``) lets a DataLoader fetch a whole batch with one tensor gather.
    """

    def __init__(
        self,
        images: Tensor,
        targets: dict[str, Tensor],
        ids: Tensor,
        split: str,
        factors: dict[str, np.ndarray] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 tensor [N, C, H, W]")
        n = len(images)
        if len(ids) != n or any(len(t) != n for t in targets.values()):
            raise ValueError("images, ids and every target must have the same length")
        if len(torch.unique(ids)) != n:
            raise ValueError("sample ids must be unique")
        self.images = images
        self.targets = targets
        self.ids = ids.long()
        self.split = split
        self.factors = factors or {}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "id": self.ids[index],
            "image": self.images[index].float().div_(255.0),
            "targets": {name: t[index] for name, t in self.targets.items()},
        }

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return {
            "id": self.ids[index],
            "image": self.images[index].float().div_(255.0),
            "targets": {name: t[index] for name, t in self.targets.items()},
        }

    def subset(
        self, positions: Sequence[int] | Tensor, split: str | None = None
    ) -> MultiTaskArrays:
        """A new split holding only the given row positions (ids unchanged)."""
        index = torch.as_tensor(positions, dtype=torch.long)
        return MultiTaskArrays(
            self.images[index],
            {k: v[index] for k, v in self.targets.items()},
            self.ids[index],
            split or self.split,
            {k: v[index.numpy()] for k, v in self.factors.items()},
        )


def collate_batch(batch: Any) -> dict[str, Any] | None:
    """Collate for DataLoader: pass batches from ``__getitems__`` through, stack lists otherwise,
    dropping samples skipped as bad (None); None if every sample of the batch was bad."""
    if isinstance(batch, dict):
        return batch
    kept = [sample for sample in batch if sample is not None]
    return torch.utils.data.default_collate(kept) if kept else None


def materialise(
    dataset: Dataset, split: str = "train", batch_size: int = 256, progress: bool = True
) -> MultiTaskArrays:
    """A data set's samples decoded once, deterministically (no augmentation), into memory:
    protection and victims on real-format data work on the same model-size pixels. Samples
    skipped as bad (``on_bad_sample='skip'``) are left out."""
    if isinstance(dataset, MultiTaskArrays):
        return dataset
    if hasattr(dataset, "subset") and getattr(dataset, "train", False):
        dataset = dataset.subset(range(len(dataset)), split="materialise")  # no random crop/flip
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batch
    )
    images, ids, targets = [], [], {}
    for batch in tqdm(loader, desc=f"decoding {split}", unit="batch", disable=not progress):
        if batch is None:
            continue
        images.append((batch["image"] * 255).round().clamp(0, 255).to(torch.uint8))
        ids.append(batch["id"])
        for name, value in batch["targets"].items():
            targets.setdefault(name, []).append(value)
    if not images:
        raise ConfigError(f"{split} split: no readable sample to load")
    return MultiTaskArrays(
        torch.cat(images),
        {name: torch.cat(parts) for name, parts in targets.items()},
        torch.cat(ids),
        split,
    )


@dataclass
class DatasetBundle:
    """A data set: its tasks, train and test splits, and how it was built."""

    name: str
    tasks: list[TaskSpec]
    train: Dataset
    test: Dataset
    in_channels: int
    image_size: int
    options: dict[str, Any] = field(default_factory=dict)
    source: Any = None  # a files.FileSource for real-format data sets (used by Ray Data pipelines)

    def task(self, name: str) -> TaskSpec:
        """The task called ``name``."""
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)


def build_dataset(name: str, root: str | None = None, **options: Any) -> DatasetBundle:
    """Build a registered data set by name (``synthetic`` needs no root)."""
    return DATASETS.create(name, root=root, **options)


def split_validation(
    train: MultiTaskArrays, fraction: float, seed: int = 0
) -> tuple[MultiTaskArrays, MultiTaskArrays]:
    """Hold out a seeded ``fraction`` of a training split for model selection (ids unchanged)."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(fraction * len(train)))
    rest, held_out = (
        train.subset(order[n_val:].sort().values),
        train.subset(order[:n_val].sort().values),
    )
    held_out.split = "val"
    return rest, held_out


def reject_unknown_options(name: str, unknown: dict[str, Any], accepted: str) -> None:
    """ConfigError if a data set was given options it does not take."""
    if unknown:
        raise ConfigError(
            f"data set {name!r} does not take option(s) {', '.join(sorted(unknown))}; accepted: {accepted}"
        )
