"""Baseline: SCRUB (Kurmanji et al., NeurIPS 2023): a student that starts as the original model
(the teacher) is pushed away from the teacher on the forget pairs (max steps, the first
``max_steps`` iterations) and kept close to it, and accurate, on retain data (min steps)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from raymtl.models.mtl import MultiTaskModel
from raymtl.tasks import IGNORE_INDEX, TaskSpec
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


def output_distance(
    task: TaskSpec, student: Tensor, teacher: Tensor, target: Tensor, temperature: float = 4.0
) -> Tensor:
    """Per-sample distance of the student's output from the teacher's: KL(teacher‖student) of the
    tempered class distributions (Bernoulli for binary tasks, per pixel for segmentation), or the
    mean squared difference for regression tasks."""
    student, teacher = student.float(), teacher.float()
    if task.kind == "binary":
        s, t = (
            student.reshape(len(student)) / temperature,
            teacher.reshape(len(teacher)) / temperature,
        )
        p = torch.sigmoid(t)
        return p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (
            F.logsigmoid(-t) - F.logsigmoid(-s)
        )
    if task.kind in ("multiclass", "segmentation"):
        log_s = F.log_softmax(student / temperature, 1)
        log_t = F.log_softmax(teacher / temperature, 1)
        kl = (log_t.exp() * (log_t - log_s)).sum(1)
        if task.kind == "multiclass":
            return kl
        valid = (target != IGNORE_INDEX).float()
        return (kl * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1.0)
    return (student - teacher).pow(2).flatten(1).mean(1)


def task_distance(
    tasks: list[TaskSpec], student: dict, teacher: dict, batch: dict, masks: dict | None
) -> Tensor:
    """Sum over tasks of the mean distance over the pairs whose mask is 1."""
    return sum(
        masked_mean(
            output_distance(t, student[t.name], teacher[t.name], batch["targets"][t.name]),
            None if masks is None else masks[t.name],
        )
        for t in tasks
    )


@UNLEARN_METHODS.register("scrub")
def scrub(
    original: MultiTaskModel,
    request: DeletionRequest,
    data: UnlearnData,
    steps: int = 30,
    max_steps: int = 10,
    lr: float = 5e-4,
    alpha: float = 0.5,
    forget_batch: int = 32,
    retain_batch: int = 64,
    optimizer: str = "adam",
) -> UnlearnResult:
    """Max steps: raise the distance on forget pairs; min steps: distance + α·task loss on retain."""
    check_common(
        steps=steps, lr=lr, alpha=alpha, forget_batch=forget_batch, retain_batch=retain_batch
    )
    device = data.device
    teacher = copy.deepcopy(original).to(device).eval()
    student = clone_for_unlearning(original, device)
    step = make_optimizer(student, optimizer, lr)
    forget = endless(forget_split(data.train, request), forget_batch, data.seed)
    retain = retain_batches(data.train, request, retain_batch, data.seed)
    passes = 0
    for number in range(steps):
        if number < max_steps:
            batch = batch_to(next(forget), device)
            with torch.no_grad():
                reference = teacher(batch["image"])
            loss = -task_distance(
                data.tasks, student(batch["image"]), reference, batch, batch["masks"]
            )
            step.zero_grad(set_to_none=True)
            loss.backward()
            step.step()
            passes += len(batch["image"])
        kept = batch_to(next(retain), device)
        with torch.no_grad():
            reference = teacher(kept["image"])
        outputs = student(kept["image"])
        masks = kept.get("masks")
        loss = task_distance(data.tasks, outputs, reference, kept, masks) + alpha * retain_loss(
            outputs, kept, data.tasks
        )
        step.zero_grad(set_to_none=True)
        loss.backward()
        step.step()
        passes += len(kept["image"])
    return UnlearnResult(student, {"steps": steps, "sample_passes": passes})
