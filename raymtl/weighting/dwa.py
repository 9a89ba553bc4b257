"""DWA: dynamic weight average (Liu, Johns and Davison, CVPR 2019)."""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from raymtl.weighting.base import WEIGHTINGS, Weighting


@WEIGHTINGS.register("dwa")
class DynamicWeightAverage(Weighting):
    """w_k = K softmax_k(r_k / T) with r_k = L_k(t-1) / L_k(t-2) over epoch mean losses; 1 at first."""

    def __init__(self, task_names: Sequence[str], seed: int = 0, temperature: float = 2.0) -> None:
        super().__init__(task_names, seed)
        self.temperature = temperature
        self.history: list[Tensor] = []

    def current_weights(self) -> Tensor:
        """The weights for this epoch, from the last two epochs' mean losses."""
        if len(self.history) < 2:
            return torch.ones(self.num_tasks)
        ratio = self.history[-1] / self.history[-2].clamp_min(1e-12)
        return self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)

    def combine(self, losses: Tensor) -> Tensor:
        weights = self.current_weights()
        self.last_weights = weights
        return (weights.to(losses) * losses).sum()

    def on_epoch_end(self, epoch_mean_losses: Tensor) -> None:
        self.history = [*self.history[-1:], epoch_mean_losses.detach().double().cpu()]

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "history": list(self.history)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.history = list(state["history"])
