"""Task specifications: what a head outputs, its per-sample loss, its metrics and its headline score.

Losses are per sample (shape [B]) so callers can mask (sample, task) pairs, e.g. for unlearning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from raymtl import metrics as M
from raymtl.errors import ConfigError

TASK_KINDS = ("binary", "multiclass", "segmentation", "depth", "normals")

# The higher-is-better metric that summarises each kind (means over tasks use it).
PRIMARY_METRIC = {
    "binary": "balanced_accuracy",
    "multiclass": "balanced_accuracy",
    "segmentation": "miou",
    "depth": "delta1",
    "normals": "within_30",
}
IGNORE_INDEX = 255


@dataclass(frozen=True)
class TaskSpec:
    """One task of a multi-task data set.

    kind: binary | multiclass | segmentation | depth | normals; num_classes for the class-based kinds;
    headline: a higher-is-better metric that replaces the kind's default primary metric (e.g. roc_auc).
    """

    name: str
    kind: str
    num_classes: int = 2
    headline: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ConfigError(
                f"task {self.name!r}: unknown kind {self.kind!r}; expected one of {TASK_KINDS}"
            )
        if self.kind in ("multiclass", "segmentation") and self.num_classes < 2:
            raise ConfigError(f"task {self.name!r}: num_classes must be >= 2")

    @property
    def dense(self) -> bool:
        """True for per-pixel tasks."""
        return self.kind in ("segmentation", "depth", "normals")

    @property
    def out_channels(self) -> int:
        """Channels the task head must produce."""
        return {
            "binary": 1,
            "multiclass": self.num_classes,
            "segmentation": self.num_classes,
            "depth": 1,
            "normals": 3,
        }[self.kind]

    @property
    def primary_metric(self) -> str:
        """Name of the headline, higher-is-better metric."""
        return self.headline or PRIMARY_METRIC[self.kind]

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-sample loss, shape [B]."""
        if self.kind == "binary":
            return F.binary_cross_entropy_with_logits(
                output.reshape(len(output)), target.float(), reduction="none"
            )
        if self.kind == "multiclass":
            return F.cross_entropy(output, target.long(), reduction="none")
        if self.kind == "segmentation":
            pixel = F.cross_entropy(
                output, target.long(), ignore_index=IGNORE_INDEX, reduction="none"
            )
            valid = (target != IGNORE_INDEX).float()
            return _per_sample_mean(pixel, valid)
        if self.kind == "depth":
            valid = (target > 0).float()
            return _per_sample_mean((output.squeeze(1) - target).abs(), valid)
        # normals: 1 - cosine similarity at pixels with a true normal
        valid = (target.norm(dim=1) > 0).float()
        cosine = F.cosine_similarity(output, target, dim=1, eps=1e-6)
        return _per_sample_mean(1.0 - cosine, valid)

    def new_meter(self) -> TaskMeter:
        """A fresh streaming accumulator for this task's metrics."""
        return TaskMeter(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for configs and logs."""
        return asdict(self)


def _per_sample_mean(values: Tensor, valid: Tensor) -> Tensor:
    dims = tuple(range(1, values.dim()))
    return (values * valid).sum(dims) / valid.sum(dims).clamp_min(1.0)


class TaskMeter:
    """Accumulates one task's predictions over batches and computes its metrics at the end."""

    def __init__(self, task: TaskSpec) -> None:
        self.task = task
        self._scores: list[Tensor] = []
        self._targets: list[Tensor] = []
        self._sums: Tensor | None = None

    def update(self, output: Tensor, target: Tensor) -> None:
        """Add one batch of head outputs and targets."""
        kind = self.task.kind
        output = output.detach().float()
        if kind == "binary":
            self._scores.append(output.reshape(len(output)).cpu())
            self._targets.append(target.detach().reshape(len(target)).cpu())
            return
        if kind in ("multiclass", "segmentation"):
            add = M.confusion_matrix(output.argmax(1), target, self.task.num_classes)
        elif kind == "depth":
            add = M.depth_metric_sums(output.squeeze(1), target)
        else:
            add = M.normal_metric_sums(output, target)
        self._sums = add if self._sums is None else self._sums + add

    def compute(self) -> dict[str, float]:
        """Metrics of everything seen so far."""
        kind = self.task.kind
        if kind == "binary":
            if not self._scores:
                return M.binary_metrics(torch.zeros(0), torch.zeros(0))
            return M.binary_metrics(torch.cat(self._scores), torch.cat(self._targets))
        if self._sums is None:
            raise ValueError(f"task {self.task.name!r}: no batch was seen")
        if kind == "multiclass":
            return M.multiclass_metrics_from_confusion(self._sums)
        if kind == "segmentation":
            return M.segmentation_metrics_from_confusion(self._sums)
        if kind == "depth":
            return M.depth_metrics_from_sums(self._sums)
        return M.normal_metrics_from_sums(self._sums)


def mean_primary(task_metrics: dict[str, dict[str, float]], tasks: list[TaskSpec]) -> float:
    """Mean over tasks of each task's primary (higher-is-better) metric."""
    values = [task_metrics[t.name][t.primary_metric] for t in tasks if t.name in task_metrics]
    return float(sum(values) / len(values)) if values else float("nan")
