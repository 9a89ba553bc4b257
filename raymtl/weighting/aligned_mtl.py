"""Aligned-MTL: align the task gradients' principal components (Senushkin et al., CVPR 2023)."""

import torch
from torch import Tensor

from raymtl.weighting.base import WEIGHTINGS, Weighting, weighted_sum


def aligned_weights(grads: Tensor) -> Tensor:
    """Task weights that make the aligned gradient system's singular values all equal to σ_min."""
    gram = (grads @ grads.t()).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    tol = eigenvalues.max() * len(gram) * torch.finfo(torch.float64).eps
    keep = eigenvalues > tol
    eigenvalues, eigenvectors = eigenvalues[keep], eigenvectors[:, keep]
    if len(eigenvalues) == 0:
        return torch.zeros(len(gram), dtype=torch.float64)
    sigma_inv = torch.diag(eigenvalues.rsqrt())
    balance = eigenvalues.min().sqrt() * (eigenvectors @ sigma_inv @ eigenvectors.t())
    return balance.sum(0)


@WEIGHTINGS.register("aligned_mtl")
class AlignedMTL(Weighting):
    """Weighted sum of task gradients with Aligned-MTL's stability-preserving weights."""

    uses_task_gradients = True

    def aggregate(self, grads: Tensor, losses: Tensor | None = None) -> Tensor:
        weights = aligned_weights(grads)
        self.last_weights = weights.float()
        return weighted_sum(weights, grads)
