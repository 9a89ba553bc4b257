"""Surrogate-free baseline: AR, autoregressive perturbations (Sandoval-Segura et al., NeurIPS
2022), combined across tasks per sample.

Every (task, class) gets its own 3×3 causal AR filter; its pattern starts from Gaussian noise in
the first two rows and columns and continues by the recurrence
p[i, j] = Σ_(a,b) w[a, b] · p[i-2+a, j-2+b] over the 8 earlier window positions. A network can
detect such a pattern with one convolution (the filter annihilates it), which makes it a shortcut.
A sample's δ is the mean of its tasks' class patterns, rescaled so that max |δ| = ε.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from raymtl.data.base import MultiTaskArrays
from raymtl.protect.patterns import protect_class_wise
from raymtl.protect.run import UE_METHODS, ProtectConfig, ProtectResult
from raymtl.tasks import TaskSpec


def ar_coefficients(rng: np.random.Generator) -> np.ndarray:
    """A 3×3 window of AR weights; the centre-right-bottom position [2, 2] is the predicted pixel
    (weight 0 there); the other 8 weights sum to 1, so flat regions continue flat."""
    weights = rng.normal(size=(3, 3))
    weights[2, 2] = 0.0
    return weights / weights.sum()


def ar_pattern(
    weights: np.ndarray, channels: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """One [C, size, size] pattern following the AR recurrence, scaled to max |p| = 1."""
    pattern = np.zeros((channels, size, size))
    pattern[:, :2, :] = rng.normal(size=(channels, 2, size))
    pattern[:, :, :2] = rng.normal(size=(channels, size, 2))
    for i in range(2, size):
        for j in range(2, size):
            pattern[:, i, j] = np.einsum(
                "ab,cab->c", weights, pattern[:, i - 2 : i + 1, j - 2 : j + 1]
            )
    return pattern / np.abs(pattern).max()


def ar_patterns(
    tasks: Sequence[TaskSpec], in_channels: int, image_size: int, seed: int
) -> tuple[dict[str, Tensor], dict[str, np.ndarray]]:
    """Per task, a [classes, C, H, W] pattern tensor and the classes' AR weights [classes, 3, 3].
    Unstable draws are redrawn: a pattern whose growth leaves most of the image near zero once
    scaled (fewer than half its values above 5 % of the peak) would hide nothing."""
    rng = np.random.default_rng(seed)
    patterns, weights = {}, {}
    for task in tasks:
        rows, task_weights = [], []
        for _ in range(max(2, task.num_classes)):
            while True:
                w = ar_coefficients(rng)
                with np.errstate(over="ignore", invalid="ignore"):
                    p = ar_pattern(w, in_channels, image_size, rng)
                if np.isfinite(p).all() and (np.abs(p) > 0.05).mean() >= 0.5:
                    break
            rows.append(p)
            task_weights.append(w)
        patterns[task.name] = torch.from_numpy(np.stack(rows)).float()
        weights[task.name] = np.stack(task_weights)
    return patterns, weights


@UE_METHODS.register("ar")
def protect_ar(
    train: MultiTaskArrays,
    tasks: Sequence[TaskSpec],
    in_channels: int,
    image_size: int,
    config: ProtectConfig,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
) -> ProtectResult:
    """Class-wise AR patterns per task, averaged per sample (no surrogate, no training)."""
    return protect_class_wise(
        "ar",
        train,
        tasks,
        config,
        lambda chosen: ar_patterns(chosen, in_channels, image_size, config.seed)[0],
        "average",
    )


protect_ar.uses_base = False  # type: ignore[attr-defined]
