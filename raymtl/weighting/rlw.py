"""RLW: random loss weighting (Lin et al., TMLR 2022)."""

import torch
from torch import Tensor

from raymtl.weighting.base import WEIGHTINGS, Weighting


@WEIGHTINGS.register("rlw")
class RandomLossWeighting(Weighting):
    """Each step, weights = softmax of standard normal draws (seeded), times the number of tasks."""

    def combine(self, losses: Tensor) -> Tensor:
        draws = torch.randn(self.num_tasks, generator=self.generator)
        weights = torch.softmax(draws, dim=0)
        self.last_weights = weights
        return (weights.to(losses) * losses).sum() * self.num_tasks
