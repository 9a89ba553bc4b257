"""PCGrad: gradient surgery (Yu et al., NeurIPS 2020)."""

import torch
from torch import Tensor

from raymtl.weighting.base import WEIGHTINGS, Weighting


@WEIGHTINGS.register("pcgrad")
class PCGrad(Weighting):
    """Project each task gradient off every other task's gradient it conflicts with, then sum."""

    uses_task_gradients = True

    def aggregate(self, grads: Tensor, losses: Tensor | None = None) -> Tensor:
        projected = grads.clone()
        for i in range(self.num_tasks):
            order = torch.randperm(self.num_tasks, generator=self.generator).tolist()
            for j in order:
                if j == i:
                    continue
                dot = projected[i] @ grads[j]
                if dot < 0:
                    projected[i] -= dot / grads[j].pow(2).sum().clamp_min(1e-20) * grads[j]
        return projected.sum(0)
