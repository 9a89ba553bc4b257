"""Baseline: ℓ1-sparse fine-tuning (Jia et al., 2023, "Model sparsity can simplify machine
unlearning"): fine-tune on retain data with an ℓ1 penalty that decays linearly to zero."""

from __future__ import annotations

import torch

from raymtl.models.mtl import MultiTaskModel
from raymtl.unlearn.base import (
    UNLEARN_METHODS,
    UnlearnData,
    UnlearnResult,
    batch_to,
    check_common,
    clone_for_unlearning,
    make_optimizer,
    retain_batches,
    retain_loss,
)
from raymtl.unlearn.request import DeletionRequest


@UNLEARN_METHODS.register("l1_sparse")
def l1_sparse(
    original: MultiTaskModel,
    request: DeletionRequest,
    data: UnlearnData,
    steps: int = 30,
    lr: float = 5e-4,
    gamma: float = 1e-5,
    retain_batch: int = 64,
    optimizer: str = "adam",
) -> UnlearnResult:
    """``steps`` steps on retain loss + γ_t·‖θ‖₁, with γ_t falling linearly from ``gamma`` to 0."""
    check_common(steps=steps, lr=lr, retain_batch=retain_batch)
    device = data.device
    model = clone_for_unlearning(original, device)
    step = make_optimizer(model, optimizer, lr)
    retain = retain_batches(data.train, request, retain_batch, data.seed)
    passes = 0
    for number in range(steps):
        batch = batch_to(next(retain), device)
        weight = gamma * (1 - number / steps)
        penalty = sum(p.abs().sum() for p in model.parameters())
        loss = retain_loss(model(batch["image"]), batch, data.tasks) + weight * penalty
        step.zero_grad(set_to_none=True)
        loss.backward()
        step.step()
        passes += len(batch["image"])
    with torch.no_grad():
        norm = float(sum(p.abs().sum() for p in model.parameters()))
    return UnlearnResult(model, {"steps": steps, "sample_passes": passes, "l1_norm": norm})
