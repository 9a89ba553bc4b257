"""LS: linear scalarisation with equal weights (the MTL-UE paper's default)."""

from raymtl.weighting.base import WEIGHTINGS, Weighting


@WEIGHTINGS.register("ls")
class LinearScalarization(Weighting):
    """Sum of the task losses, each with weight 1."""
