"""Baseline: gradient ascent on the withdrawn pairs' losses (unbounded, no retain term)."""

from __future__ import annotations

from raymtl.models.mtl import MultiTaskModel
from raymtl.unlearn.base import (
    UNLEARN_METHODS,
    UnlearnData,
    UnlearnResult,
    forget_retain_descent,
)
from raymtl.unlearn.request import DeletionRequest


@UNLEARN_METHODS.register("gradient_ascent")
def gradient_ascent(
    original: MultiTaskModel,
    request: DeletionRequest,
    data: UnlearnData,
    steps: int = 5,
    lr: float = 2e-5,
    forget_batch: int = 64,
    max_norm: float = 5.0,
    optimizer: str = "adam",
) -> UnlearnResult:
    """``steps`` SGD steps that raise each target task's loss on its withdrawn pairs."""
    return forget_retain_descent(
        original, request, data, steps=steps, lr=lr, alpha=0.0, objective="ascent",
        forget_batch=forget_batch, retain_batch=1, max_norm=max_norm, optimizer=optimizer,
    )  # fmt: skip
