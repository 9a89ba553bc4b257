"""The two parts of ours as methods of their own (also baselines in the literature):
``projected_gradient`` (task-aware subspace projection only, PGU/GPM style) and
``orthogonalisation_only`` (per-sample gradient orthogonalisation only, OrthoGrad style)."""

from __future__ import annotations

import inspect
from typing import Any

from raymtl.unlearn.base import UNLEARN_METHODS, UnlearnResult
from raymtl.unlearn.interference import interference_aware


def _variant(name: str, fixed: dict[str, Any], doc: str) -> None:
    def method(original: Any, request: Any, data: Any, **options: Any) -> UnlearnResult:
        return interference_aware(original, request, data, **{**options, **fixed})

    signature = inspect.signature(interference_aware)
    method.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for p in signature.parameters.values() if p.name not in fixed]
    )
    method.__doc__ = doc
    method.__name__ = name
    UNLEARN_METHODS.register(name)(method)


_variant(
    "projected_gradient",
    {"instance_orthogonal": False, "anchor_forget_instances": False},
    "Ours without instance-level orthogonalisation: the task-aware projection alone.",
)
_variant(
    "orthogonalisation_only",
    {"task_projection": False},
    "Ours without the task-aware projection: per-sample orthogonalisation alone.",
)
