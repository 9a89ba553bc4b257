"""The defence interface: a training-time rewrite of a batch's images (test images stay clean)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from raymtl.errors import ConfigError
from raymtl.registry import Registry
from raymtl.tasks import TaskSpec


class Defence(ABC):
    """Maps a training batch's images (float, [0, 1], [B, C, H, W]) to the images trained on."""

    @abstractmethod
    def __call__(
        self, images: Tensor, batch: dict[str, Any], model: nn.Module, tasks: Sequence[TaskSpec]
    ) -> Tensor:
        """The defended images; ``batch`` (labels, masks) and ``model`` serve adversarial training."""


DEFENCES: Registry[Defence] = Registry("defence")


def create_defence(name: str, **options: Any) -> Defence:
    """Build a registered defence; unknown options give a ConfigError naming them."""
    factory = DEFENCES.get(name)
    try:
        return factory(**options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"defence {name}: bad option ({err})") from None
