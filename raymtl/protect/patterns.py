"""Surrogate-free baseline: LSP, linearly separable class-wise patches (Yu et al., KDD 2022),
combined across tasks per sample.

Every (task, class) gets a pattern: a grid of ``patch_size``-pixel patches, each filled with one
random colour in [-1, 1]^C. A sample's δ combines the patterns of its labels:
- ``average``: the mean of its tasks' class patterns, rescaled so that max |δ| = ε;
- ``grid``: the image is cut into one region per task; region k shows task k's class pattern at ±ε.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from raymtl.data.base import MultiTaskArrays
from raymtl.errors import ConfigError
from raymtl.protect.run import UE_METHODS, ProtectConfig, ProtectResult, protected_subset
from raymtl.protect.store import quantise_delta
from raymtl.tasks import TaskSpec


def class_patterns(
    tasks: Sequence[TaskSpec], in_channels: int, image_size: int, patch_size: int, seed: int
) -> dict[str, Tensor]:
    """Per task, a [classes, C, H, W] tensor of random patch-colour patterns in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    cells = math.ceil(image_size / patch_size)
    patterns = {}
    for task in tasks:
        colours = torch.rand(
            max(2, task.num_classes), in_channels, cells, cells, generator=generator
        )
        grid = F.interpolate(colours * 2 - 1, scale_factor=patch_size, mode="nearest")
        patterns[task.name] = grid[..., :image_size, :image_size]
    return patterns


def grid_regions(num_tasks: int, image_size: int) -> list[tuple[slice, slice]]:
    """One rectangular region per task, on the smallest square grid that holds them all."""
    side = math.ceil(math.sqrt(num_tasks))
    edges = np.linspace(0, image_size, side + 1).round().astype(int)
    regions = []
    for k in range(num_tasks):
        row, col = divmod(k, side)
        regions.append((slice(edges[row], edges[row + 1]), slice(edges[col], edges[col + 1])))
    return regions


def combine_patterns(
    patterns: dict[str, Tensor],
    tasks: Sequence[TaskSpec],
    targets: dict[str, Tensor],
    epsilon: float,
    mode: str,
) -> Tensor:
    """δ [B, C, H, W] with max |δ| <= ε for a batch of labels."""
    chosen = [patterns[t.name][targets[t.name].long()] for t in tasks]
    if mode == "average":
        mean = torch.stack(chosen).mean(0)
        peak = mean.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        return epsilon * mean / peak
    delta = torch.zeros_like(chosen[0])
    size = delta.shape[-1]
    for pattern, (rows, cols) in zip(chosen, grid_regions(len(tasks), size), strict=True):
        delta[..., rows, cols] = epsilon * pattern[..., rows, cols].sign()
    return delta


def class_wise_deltas(
    train: MultiTaskArrays,
    tasks: Sequence[TaskSpec],
    patterns: dict[str, Tensor],
    epsilon: float,
    mode: str,
) -> np.ndarray:
    """Integer δ for every training sample from per-task class patterns (batches of 1,024)."""
    parts = []
    for first in range(0, len(train), 1024):
        rows = list(range(first, min(first + 1024, len(train))))
        targets = {t.name: train.targets[t.name][rows] for t in tasks}
        parts.append(
            quantise_delta(combine_patterns(patterns, tasks, targets, epsilon, mode), epsilon)
        )
    return np.concatenate(parts)


def protect_class_wise(
    method: str,
    train: MultiTaskArrays,
    tasks: Sequence[TaskSpec],
    config: ProtectConfig,
    make_patterns: Callable[[list[TaskSpec]], dict[str, Tensor]],
    mode: str,
) -> ProtectResult:
    """Shared body of the surrogate-free methods: patterns for the protected tasks, δ per sample."""
    if any(t.dense for t in tasks):
        raise ConfigError(
            f"{method}: class-wise patterns need classification tasks, not dense maps"
        )
    start = time.perf_counter()
    protected = protected_subset(tasks, config.protected_tasks)
    deltas = class_wise_deltas(train, protected, make_patterns(protected), config.epsilon, mode)
    return ProtectResult(train.ids.numpy().copy(), deltas, [], time.perf_counter() - start)


@UE_METHODS.register("lsp")
def protect_lsp(
    train: MultiTaskArrays,
    tasks: Sequence[TaskSpec],
    in_channels: int,
    image_size: int,
    config: ProtectConfig,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
) -> ProtectResult:
    """Class-wise patch patterns per task, combined per sample (no surrogate, no training)."""
    return protect_class_wise(
        "lsp",
        train,
        tasks,
        config,
        lambda chosen: class_patterns(
            chosen, in_channels, image_size, config.patch_size, config.seed
        ),
        config.combine,
    )


protect_lsp.uses_base = False  # type: ignore[attr-defined]
