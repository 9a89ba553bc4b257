"""Bit-depth reduction of the training images (2 bits by default: 4 levels per channel)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from raymtl.defences.base import DEFENCES, Defence
from raymtl.errors import ConfigError
from raymtl.tasks import TaskSpec


@DEFENCES.register("bdr")
class BitDepthReduction(Defence):
    """Quantise every channel to 2**bits evenly spaced levels in [0, 1]."""

    def __init__(self, bits: int = 2) -> None:
        if not 1 <= int(bits) <= 8:
            raise ConfigError(f"defence bdr: bits must be in 1..8, got {bits}")
        self.levels = 2 ** int(bits) - 1

    def __call__(
        self, images: Tensor, batch: dict[str, Any], model: nn.Module, tasks: Sequence[TaskSpec]
    ) -> Tensor:
        return (images.clamp(0, 1) * self.levels).round() / self.levels
