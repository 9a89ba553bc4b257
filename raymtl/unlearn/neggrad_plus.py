"""Baseline: NegGrad+ (Kurmanji et al., 2023), ascent on forget pairs plus descent on retain data."""

from __future__ import annotations

from raymtl.models.mtl import MultiTaskModel
from raymtl.unlearn.base import (
    UNLEARN_METHODS,
    UnlearnData,
    UnlearnResult,
    forget_retain_descent,
)
from raymtl.unlearn.request import DeletionRequest


@UNLEARN_METHODS.register("neggrad_plus")
def neggrad_plus(
    original: MultiTaskModel,
    request: DeletionRequest,
    data: UnlearnData,
    steps: int = 30,
    lr: float = 5e-4,
    alpha: float = 0.8,
    forget_batch: int = 64,
    retain_batch: int = 64,
    max_norm: float = 5.0,
    optimizer: str = "adam",
) -> UnlearnResult:
    """SGD on (1−α)·(−forget loss) + α·retain loss."""
    return forget_retain_descent(
        original, request, data, steps=steps, lr=lr, alpha=alpha, objective="ascent",
        forget_batch=forget_batch, retain_batch=retain_batch, max_norm=max_norm, optimizer=optimizer,
    )  # fmt: skip
