"""JPEG compression of the training images (quality 10 by default): removes fine, high-frequency
perturbations (Liu et al. 2023, image shortcut squeezing)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from raymtl.defences.base import DEFENCES, Defence
from raymtl.errors import ConfigError
from raymtl.tasks import TaskSpec


@DEFENCES.register("jpeg")
class JPEGCompression(Defence):
    """Encode each image as JPEG at ``quality`` and decode it again."""

    def __init__(self, quality: int = 10) -> None:
        if not 1 <= int(quality) <= 100:
            raise ConfigError(f"defence jpeg: quality must be in 1..100, got {quality}")
        self.quality = int(quality)

    def __call__(
        self, images: Tensor, batch: dict[str, Any], model: nn.Module, tasks: Sequence[TaskSpec]
    ) -> Tensor:
        pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        if pixels.shape[1] not in (1, 3):
            raise ConfigError(f"defence jpeg: needs 1 or 3 channels, got {pixels.shape[1]}")
        decoded = torch.stack([self.round_trip(image) for image in pixels])
        return decoded.to(images.device, images.dtype) / 255

    def round_trip(self, image: Tensor) -> Tensor:
        """One uint8 [C, H, W] image through a JPEG file in memory."""
        array = image.permute(1, 2, 0).numpy()
        picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=self.quality)
        back = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
        back = back[..., None] if back.ndim == 2 else back
        return torch.from_numpy(back.copy()).permute(2, 0, 1)
