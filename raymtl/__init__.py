"""raymtl: protect (unlearnable examples) and forget (unlearning) data in multi-task vision models.

The core package is plain PyTorch and Ray-free; Ray is imported only under ``raymtl.tune``.
"""

__version__ = "0.1.0"
