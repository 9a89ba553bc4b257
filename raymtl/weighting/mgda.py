"""MGDA: multiple-gradient descent, the min-norm point of the convex hull (Sener and Koltun 2018)."""

import torch
from torch import Tensor

from raymtl.weighting.base import WEIGHTINGS, Weighting, weighted_sum


def project_to_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of a vector onto the probability simplex (Duchi et al. 2008)."""
    u, _ = torch.sort(v, descending=True)
    cumulative = torch.cumsum(u, 0) - 1
    index = torch.arange(1, len(v) + 1, dtype=v.dtype)
    rho = int(torch.nonzero(u - cumulative / index > 0).max())
    theta = cumulative[rho] / (rho + 1)
    return (v - theta).clamp_min(0)


def min_norm_weights(grads: Tensor, max_iter: int = 5000, tol: float = 1e-12) -> Tensor:
    """Simplex weights α minimising ‖Σ α_k g_k‖² (accelerated projected gradient on αᵀMα)."""
    gram = (grads @ grads.t()).double()
    k = len(gram)
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    lipschitz = float(torch.linalg.eigvalsh(gram).max()) * 2
    if lipschitz <= 0:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    alpha = torch.full((k,), 1.0 / k, dtype=torch.float64)
    momentum_point, t = alpha.clone(), 1.0
    for _ in range(max_iter):
        new_alpha = project_to_simplex(momentum_point - 2 * gram @ momentum_point / lipschitz)
        if (new_alpha - alpha).abs().max() < tol:
            alpha = new_alpha
            break
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        momentum_point = new_alpha + (t - 1) / t_next * (new_alpha - alpha)
        if (new_alpha - alpha) @ (gram @ (new_alpha + alpha)) > 0:  # objective went up: restart
            momentum_point, t_next = new_alpha.clone(), 1.0
        alpha, t = new_alpha, t_next
    return alpha


@WEIGHTINGS.register("mgda")
class MGDA(Weighting):
    """Update along the minimum-norm convex combination of the task gradients."""

    uses_task_gradients = True

    def aggregate(self, grads: Tensor, losses: Tensor | None = None) -> Tensor:
        alpha = min_norm_weights(grads)
        self.last_weights = alpha.float()
        return weighted_sum(alpha, grads) * self.num_tasks
