"""Baseline: fine-tune the original model on the retain data only (catastrophic forgetting)."""

from __future__ import annotations

import copy
from dataclasses import replace

from raymtl.engine import fit
from raymtl.models.mtl import MultiTaskModel
from raymtl.unlearn.base import UNLEARN_METHODS, UnlearnData, UnlearnResult, check_common
from raymtl.unlearn.request import DeletionRequest, retain_split


@UNLEARN_METHODS.register("finetune")
def finetune(
    original: MultiTaskModel,
    request: DeletionRequest,
    data: UnlearnData,
    epochs: int = 1,
    lr: float = 1e-3,
) -> UnlearnResult:
    """``epochs`` of the original recipe on the retain data, at learning rate ``lr``."""
    check_common(epochs=epochs, lr=lr)
    config = replace(data.train_config, epochs=epochs, lr=lr, lr_milestones=(1.0,))
    retain = retain_split(data.train, request)
    result = fit(copy.deepcopy(original), retain, None, data.tasks, config)
    result.model.eval()
    return UnlearnResult(result.model, {"epochs": epochs, "sample_passes": epochs * len(retain)})
