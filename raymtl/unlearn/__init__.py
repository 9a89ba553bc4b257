"""Forget: multi-task unlearning (full-task and partial-task) and its measurement against retraining.

Every method is registered in ``UNLEARN_METHODS`` with one signature
``method(original, request, data, **options) -> UnlearnResult``; ``run_method`` checks options.
"""

from raymtl.registry import import_submodules
from raymtl.unlearn.base import (
    UNLEARN_METHODS,
    UnlearnData,
    UnlearnResult,
    default_options,
    run_method,
)
from raymtl.unlearn.request import (
    DeletionRequest,
    class_request,
    load_request,
    random_request,
    retain_split,
)

import_submodules(__name__)  # one file per method registers it

__all__ = [
    "UNLEARN_METHODS",
    "DeletionRequest",
    "UnlearnData",
    "UnlearnResult",
    "class_request",
    "default_options",
    "load_request",
    "random_request",
    "retain_split",
    "run_method",
]
