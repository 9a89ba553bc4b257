"""Protect (MTL-UE): generators and per-sample baselines that make data unlearnable, and the
perturbation store that keys δ by sample id."""

from raymtl.protect import autoregressive as _autoregressive  # noqa: F401  (registers 'ar')
from raymtl.protect import patterns as _patterns  # noqa: F401  (registers 'lsp')
from raymtl.protect.bases import UE_BASES, SurrogateConfig
from raymtl.protect.run import UE_METHODS, ProtectConfig, ProtectResult, protect
from raymtl.protect.store import PerturbationStore, protect_split, write_store

__all__ = [
    "UE_BASES",
    "UE_METHODS",
    "PerturbationStore",
    "ProtectConfig",
    "ProtectResult",
    "SurrogateConfig",
    "protect",
    "protect_split",
    "write_store",
]
