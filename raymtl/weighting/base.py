"""Task weighting strategies (LibMTL style).

Loss-based strategies (LS, UW, RLW, DWA) combine the per-task losses into one scalar.
Gradient-based ones (PCGrad, MGDA, Aligned-MTL, FairGrad) map the per-task gradient matrix
G [K, P] of the shared parameters to one update direction [P] with ``aggregate``; ``aggregate`` is
a pure function of G so a distributed caller can all-reduce G first and aggregate identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from raymtl.registry import Registry


class Weighting(nn.Module):
    """Base class. Subclasses override ``combine`` (loss-based) or ``aggregate`` (gradient-based)."""

    uses_task_gradients: bool = False

    def __init__(self, task_names: Sequence[str], seed: int = 0) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.num_tasks = len(task_names)
        self.generator = torch.Generator().manual_seed(seed)
        self.last_weights: Tensor = torch.ones(self.num_tasks)

    def combine(self, losses: Tensor) -> Tensor:
        """Scalar training loss from the per-task losses [K] (default: plain sum)."""
        return losses.sum()

    def aggregate(self, grads: Tensor, losses: Tensor | None = None) -> Tensor:
        """Shared-parameter update direction [P] from the task gradient matrix [K, P]."""
        return grads.sum(0)

    def on_epoch_end(self, epoch_mean_losses: Tensor) -> None:
        """Hook for strategies that adapt per epoch (DWA)."""

    def get_extra_state(self) -> dict[str, Any]:
        """Non-parameter state a resumed run needs (kept in ``state_dict``): the random stream."""
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``get_extra_state`` saved."""
        self.generator.set_state(state["generator"])


WEIGHTINGS: Registry[Weighting] = Registry("weighting strategy")


def create_weighting(name: str, task_names: Sequence[str], **kwargs: Any) -> Weighting:
    """Build a registered weighting strategy by name."""
    return WEIGHTINGS.create(name, task_names, **kwargs)


def weighted_sum(weights: Tensor, grads: Tensor) -> Tensor:
    """Σ_k w_k g_k for weights [K] and gradients [K, P]."""
    return (weights.to(grads).unsqueeze(1) * grads).sum(0)
