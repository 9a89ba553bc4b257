"""Baseline: SalUn (Fan et al., ICLR 2024): a weight-saliency mask from the forget loss's gradient,
then training with random labels on the forget pairs (random targets for regression tasks) plus
the retain loss, updating only the salient weights."""

from __future__ import annotations

import torch
from torch import Tensor

from raymtl.errors import ConfigError
from raymtl.models.mtl import MultiTaskModel
from raymtl.tasks import TaskSpec
from raymtl.unlearn.base import (
    UNLEARN_METHODS,
    UnlearnData,
    UnlearnResult,
    batch_to,
    check_common,
    clone_for_unlearning,
    endless,
    forget_split,
    make_optimizer,
    masked_mean,
    retain_batches,
    retain_loss,
)
from raymtl.unlearn.request import DeletionRequest


def saliency_mask(
    model: MultiTaskModel, batches: list[dict], tasks: list[TaskSpec], fraction: float
) -> dict[str, Tensor]:
    """1 for the ``fraction`` of weights with the largest |∇ forget loss| (over all tensors)."""
    model.zero_grad(set_to_none=True)
    for batch in batches:
        outputs = model(batch["image"])
        loss = sum(
            masked_mean(
                t.loss(outputs[t.name].float(), batch["targets"][t.name]), batch["masks"][t.name]
            )
            for t in tasks
        )
        loss.backward()
    magnitudes = {
        n: p.grad.abs() if p.grad is not None else torch.zeros_like(p)
        for n, p in model.named_parameters()
    }
    model.zero_grad(set_to_none=True)
    flat = torch.cat([m.flatten() for m in magnitudes.values()])
    keep = max(1, round(fraction * len(flat)))
    threshold = torch.topk(flat, keep).values.min()
    return {n: (m >= threshold).float() for n, m in magnitudes.items()}


def random_targets(task: TaskSpec, target: Tensor, generator: torch.Generator) -> Tensor:
    """Random labels (a different class where possible) or, for regression, the targets of other
    samples of the batch (a random permutation)."""
    if task.kind in ("binary", "multiclass", "segmentation"):
        classes = task.num_classes if task.kind != "binary" else 2
        shift = torch.randint(1, classes, target.shape, generator=generator).to(target.device)
        shifted = (target.long() + shift) % classes
        if task.kind == "segmentation":
            shifted = torch.where(target == 255, target.long(), shifted)
        return shifted.to(target.dtype)
    order = torch.randperm(len(target), generator=generator).to(target.device)
    return target[order]


@UNLEARN_METHODS.register("salun")
def salun(
    original: MultiTaskModel,
    request: DeletionRequest,
    data: UnlearnData,
    steps: int = 30,
    lr: float = 5e-5,
    fraction: float = 0.5,
    alpha: float = 0.8,
    forget_batch: int = 32,
    retain_batch: int = 64,
    optimizer: str = "adam",
) -> UnlearnResult:
    """Random-label training on the forget pairs + α·retain loss, masked to salient weights."""
    check_common(
        steps=steps, lr=lr, alpha=alpha, forget_batch=forget_batch, retain_batch=retain_batch
    )
    if not 0 < fraction <= 1:
        raise ConfigError(f"unlearning option fraction={fraction!r} must be in (0, 1]")
    device = data.device
    model = clone_for_unlearning(original, device)
    split = forget_split(data.train, request)
    forget = endless(split, forget_batch, data.seed)
    first = [batch_to(next(endless(split, len(split), data.seed)), device)]
    mask = saliency_mask(model, first, data.tasks, fraction)
    step = make_optimizer(model, optimizer, lr)
    retain = retain_batches(data.train, request, retain_batch, data.seed)
    generator = torch.Generator().manual_seed(data.seed)
    passes = len(split)
    for _ in range(steps):
        batch = batch_to(next(forget), device)
        outputs = model(batch["image"])
        loss = (1 - alpha) * sum(
            masked_mean(
                t.loss(
                    outputs[t.name].float(), random_targets(t, batch["targets"][t.name], generator)
                ),
                batch["masks"][t.name],
            )
            for t in data.tasks
        )
        kept = batch_to(next(retain), device)
        loss = loss + alpha * retain_loss(model(kept["image"]), kept, data.tasks)
        step.zero_grad(set_to_none=True)
        loss.backward()
        for name, param in model.named_parameters():
            if param.grad is not None:
                param.grad.mul_(mask[name])
        step.step()
        passes += len(batch["image"]) + len(kept["image"])
    return UnlearnResult(
        model, {"steps": steps, "sample_passes": passes, "salient_fraction": fraction}
    )
