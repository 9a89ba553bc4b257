"""The gold standard: retrain from scratch with the withdrawn pairs masked out of the losses."""

from __future__ import annotations

from dataclasses import replace

from raymtl.engine import fit
from raymtl.models.mtl import MultiTaskModel
from raymtl.unlearn.base import UNLEARN_METHODS, UnlearnData, UnlearnResult, check_common
from raymtl.unlearn.request import DeletionRequest, retain_split


@UNLEARN_METHODS.register("retrain")
def retrain(
    original: MultiTaskModel, request: DeletionRequest, data: UnlearnData, epochs: int = 0
) -> UnlearnResult:
    """A fresh model trained with the original recipe (``epochs`` 0: the original's count) on
    the retain data: full requests drop the instances, partial ones mask only their pairs."""
    config = data.train_config
    if epochs:
        check_common(epochs=epochs)
        config = replace(config, epochs=epochs)
    retain = retain_split(data.train, request)
    result = fit(data.make_model(data.tasks), retain, None, data.tasks, config)
    result.model.eval()
    return UnlearnResult(
        result.model, {"epochs": config.epochs, "sample_passes": config.epochs * len(retain)}
    )
