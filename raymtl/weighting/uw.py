"""UW: homoscedastic uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018)."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from raymtl.weighting.base import WEIGHTINGS, Weighting


@WEIGHTINGS.register("uw")
class UncertaintyWeighting(Weighting):
    """L = Σ_k L_k / (2 exp(s_k)) + s_k / 2 with learned log-variances s_k (trained with the model)."""

    def __init__(self, task_names: Sequence[str], seed: int = 0) -> None:
        super().__init__(task_names, seed)
        self.log_variance = nn.Parameter(torch.zeros(self.num_tasks))

    def combine(self, losses: Tensor) -> Tensor:
        s = self.log_variance.to(losses)
        self.last_weights = (0.5 * torch.exp(-s)).detach().cpu()
        return (losses * 0.5 * torch.exp(-s) + 0.5 * s).sum()
