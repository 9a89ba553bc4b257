"""Task weighting strategies, looked up by name in ``WEIGHTINGS``; one module per strategy."""

from raymtl.registry import import_submodules
from raymtl.weighting.base import WEIGHTINGS, Weighting, create_weighting

import_submodules(__name__)

__all__ = ["WEIGHTINGS", "Weighting", "create_weighting"]
