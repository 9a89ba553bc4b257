"""FairGrad: α-fair task weighting (Ban and Ji, ICML 2024)."""

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from raymtl.weighting.base import WEIGHTINGS, Weighting, weighted_sum


def fairgrad_weights(grads: Tensor, alpha: float = 1.0) -> np.ndarray:
    """Weights w > 0 solving (G Gᵀ) w = w^(-1/α) elementwise, by bounded least squares."""
    gram = (grads @ grads.t()).double().cpu().numpy()
    k = len(gram)

    def residual(w: np.ndarray) -> np.ndarray:
        return gram @ w - np.power(1.0 / w, 1.0 / alpha)

    from scipy.optimize import least_squares  # here: scipy.optimize takes ~0.25 s to import

    start = np.ones(k) / k
    return least_squares(residual, start, bounds=(1e-12, np.inf)).x


@WEIGHTINGS.register("fairgrad")
class FairGrad(Weighting):
    """Update Σ w_k g_k with FairGrad's α-fair weights (α = 1: proportional fairness)."""

    uses_task_gradients = True

    def __init__(self, task_names: Sequence[str], seed: int = 0, alpha: float = 1.0) -> None:
        super().__init__(task_names, seed)
        self.alpha = alpha

    def aggregate(self, grads: Tensor, losses: Tensor | None = None) -> Tensor:
        weights = fairgrad_weights(grads, self.alpha)
        self.last_weights = Tensor(weights).float()
        return weighted_sum(Tensor(weights), grads)
