"""The multi-task model: shared encoder + shared neck + one head per task."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raymtl.models.backbones import Backbone, create_backbone
from raymtl.tasks import TaskSpec


class DenseHead(nn.Module):
    """A light decoder: 3x3 conv, bilinear upsampling to the input size, 3x3 conv, 1x1 output."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 32) -> None:
        super().__init__()
        self.pre = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
        )
        self.post = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 1),
        )

    def forward(self, features: Tensor, size: tuple[int, int]) -> Tensor:
        x = F.interpolate(self.pre(features), size=size, mode="bilinear", align_corners=False)
        return self.post(x)


class MultiTaskModel(nn.Module):
    """Hard parameter sharing: classification heads read a pooled neck, dense heads a conv neck."""

    def __init__(
        self, encoder: Backbone, tasks: Sequence[TaskSpec], neck_dim: int = 256, dense_dim: int = 64
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.encoder = encoder
        channels = encoder.out_channels
        self.neck = (
            nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, neck_dim), nn.ELU()
            )
            if any(not t.dense for t in tasks)
            else None
        )
        self.dense_neck = (
            nn.Sequential(
                nn.Conv2d(channels, dense_dim, 1, bias=False), nn.BatchNorm2d(dense_dim), nn.ReLU()
            )
            if any(t.dense for t in tasks)
            else None
        )
        self.heads = nn.ModuleDict(
            {
                t.name: DenseHead(dense_dim, t.out_channels)
                if t.dense
                else nn.Linear(neck_dim, t.out_channels)
                for t in tasks
            }
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encoder(x), (x.shape[-2], x.shape[-1]))

    def decode(self, features: Tensor, size: tuple[int, int]) -> dict[str, Tensor]:
        """Every task's output from the encoder's features (dense heads upsample to ``size``):
        the part after the encoder, so per-sample gradients of the necks and heads need not
        run the encoder once per sample."""
        pooled = self.neck(features) if self.neck is not None else None
        dense = self.dense_neck(features) if self.dense_neck is not None else None
        return {
            t.name: self.heads[t.name](dense, size) if t.dense else self.heads[t.name](pooled)
            for t in self.tasks
        }

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters every task uses: encoder and necks."""
        for module in (self.encoder, self.neck, self.dense_neck):
            if module is not None:
                yield from module.parameters()

    def task_parameters(self, name: str | None = None) -> Iterator[nn.Parameter]:
        """Head parameters of one task, or of all tasks when ``name`` is None."""
        heads = [self.heads[name]] if name is not None else list(self.heads.values())
        for head in heads:
            yield from head.parameters()


# PyTorch 2.14's CPU backward of a 1x1, stride-2 convolution on channels-last input with 2 to 7
# input channels returns wrong gradients and corrupts the heap ("double free or corruption") on
# AVX2 machines (measured here, 1 and 2 threads; 8 or more channels, other kernels and strides are
# exact). ResNet downsampling convolutions are exactly that in narrow networks.
_UNSAFE_NHWC_CHANNELS = range(2, 8)


def channels_last_is_safe(module: nn.Module) -> bool:
    """False when ``module`` holds a convolution whose channels-last backward is wrong (above)."""
    return not any(
        isinstance(m, nn.Conv2d)
        and m.kernel_size == (1, 1)
        and m.stride != (1, 1)
        and m.in_channels in _UNSAFE_NHWC_CHANNELS
        for m in module.modules()
    )


def to_channels_last(module: nn.Module) -> nn.Module:
    """``module`` with its weights in channels-last layout where that is safe, else unchanged:
    oneDNN and cuDNN convolve NHWC faster, and a contiguous input is converted on the way."""
    return module.to(memory_format=torch.channels_last) if channels_last_is_safe(module) else module


def create_model(
    backbone: str,
    tasks: Sequence[TaskSpec],
    in_channels: int = 3,
    image_size: int = 32,
    **kwargs: Any,
) -> MultiTaskModel:
    """Build a multi-task model on a registered backbone (random init), its convolution weights
    in channels-last layout where that is safe: oneDNN and cuDNN convolve NHWC faster (training
    steps here: small CNN 1.6x, ResNet-18 1.4x on 2 CPU cores; benchmarks/memory_format.py)."""
    model = MultiTaskModel(create_backbone(backbone, in_channels, image_size, **kwargs), tasks)
    return to_channels_last(model)
