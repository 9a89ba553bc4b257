"""Grayscale training images (ITU-R 601 luma, repeated over the channels): removes colour-coded
perturbations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from raymtl.defences.base import DEFENCES, Defence
from raymtl.tasks import TaskSpec

LUMA = (0.299, 0.587, 0.114)


@DEFENCES.register("grayscale")
class Grayscale(Defence):
    """Replace RGB by its luma on every channel (single-channel images pass unchanged)."""

    def __call__(
        self, images: Tensor, batch: dict[str, Any], model: nn.Module, tasks: Sequence[TaskSpec]
    ) -> Tensor:
        if images.shape[1] != 3:
            return images
        weights = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images * weights).sum(1, keepdim=True).expand_as(images).contiguous()
