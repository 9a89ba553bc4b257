"""Backbones (looked up by name in ``BACKBONES``) and the multi-task model."""

from raymtl.models.backbones import BACKBONES, Backbone, create_backbone
from raymtl.models.mtl import DenseHead, MultiTaskModel, create_model

__all__ = [
    "BACKBONES",
    "Backbone",
    "DenseHead",
    "MultiTaskModel",
    "create_backbone",
    "create_model",
]
