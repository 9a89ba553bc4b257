"""Backbone registry: feature extractors returning a feature map [B, C, h, w].

torchvision architectures are built with random weights (never a download) and adapted to small
inputs: 3x3 stride-1 stems without the early max-pool, ViT with a smaller patch.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from raymtl.errors import ConfigError
from raymtl.registry import Registry


class Backbone(nn.Module):
    """A feature extractor; ``out_channels`` and ``reduction`` describe its output map."""

    out_channels: int
    reduction: int


BACKBONES: Registry[Backbone] = Registry("backbone")


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(Backbone):
    """A fast CPU backbone: four 3x3 conv blocks, two 2x2 poolings (output at H/4)."""

    def __init__(self, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, w),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_bn_relu(2 * w, 4 * w),
            *_conv_bn_relu(4 * w, 4 * w),
        )
        self.out_channels = 4 * w
        self.reduction = 4

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


@BACKBONES.register("small_cnn")
def small_cnn(in_channels: int = 3, image_size: int = 32, width: int = 32) -> Backbone:
    """Small CNN for CPU runs and tests (~0.3M parameters at width 32)."""
    return SmallCNN(in_channels, width)


class _Wrapped(Backbone):
    def __init__(self, body: nn.Module, out_channels: int, reduction: int) -> None:
        super().__init__()
        self.body = body
        self.out_channels = out_channels
        self.reduction = reduction

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def torchvision_models() -> ModuleType:
    """``torchvision.models``, imported when a torchvision backbone is built: importing
    torchvision loads torch._dynamo (~1.3 s), which a process that builds only the small CNN,
    such as each Ray Train worker of a small-CNN victim, need not pay."""
    import torchvision.models

    return torchvision.models


def _small_stem(in_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)


def _resnet(arch: str, in_channels: int, image_size: int) -> Backbone:
    net = getattr(torchvision_models(), arch)(weights=None)
    if image_size < 128:
        net.conv1, net.maxpool, reduction = _small_stem(in_channels), nn.Identity(), 8
    else:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        reduction = 32
    body = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )
    return _Wrapped(body, net.fc.in_features, reduction)


@BACKBONES.register("resnet18")
def resnet18(in_channels: int = 3, image_size: int = 32) -> Backbone:
    """torchvision ResNet-18 (random init), small-input stem below 128 px."""
    return _resnet("resnet18", in_channels, image_size)


@BACKBONES.register("resnet50")
def resnet50(in_channels: int = 3, image_size: int = 32) -> Backbone:
    """torchvision ResNet-50 (random init), small-input stem below 128 px."""
    return _resnet("resnet50", in_channels, image_size)


@BACKBONES.register("densenet121")
def densenet121(in_channels: int = 3, image_size: int = 32) -> Backbone:
    """torchvision DenseNet-121 (random init), small-input stem below 128 px."""
    net = torchvision_models().densenet121(weights=None)
    features = net.features
    if image_size < 128:
        features.conv0 = _small_stem(in_channels)
        features.pool0 = nn.Identity()
        reduction = 8
    else:
        features.conv0 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        reduction = 32
    return _Wrapped(
        nn.Sequential(features, nn.ReLU(inplace=True)), net.classifier.in_features, reduction
    )


@BACKBONES.register("vgg16")
def vgg16(in_channels: int = 3, image_size: int = 32) -> Backbone:
    """torchvision VGG-16 with batch norm (random init); the last pooling dropped for small inputs."""
    features = torchvision_models().vgg16_bn(weights=None).features
    features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
    if image_size < 128:
        return _Wrapped(features[:-1], 512, 16)
    return _Wrapped(features, 512, 32)


class ViTBackbone(Backbone):
    """torchvision ViT encoder; patch tokens are returned as a feature map [B, D, H/p, W/p]."""

    def __init__(self, in_channels: int, image_size: int, patch_size: int, **dims: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(
                f"vit: image_size {image_size} is not a multiple of patch_size {patch_size}"
            )
        self.vit = torchvision_models().VisionTransformer(
            image_size=image_size, patch_size=patch_size, num_classes=1, **dims
        )
        if in_channels != 3:
            self.vit.conv_proj = nn.Conv2d(in_channels, dims["hidden_dim"], patch_size, patch_size)
        self.vit.heads = nn.Identity()
        self.out_channels = dims["hidden_dim"]
        self.reduction = patch_size
        self.grid = image_size // patch_size

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.vit._process_input(x)
        cls = self.vit.class_token.expand(len(tokens), -1, -1)
        encoded = self.vit.encoder(torch.cat([cls, tokens], dim=1))[:, 1:]
        return encoded.transpose(1, 2).reshape(len(x), self.out_channels, self.grid, self.grid)


@BACKBONES.register("vit_b_16")
def vit_b_16(in_channels: int = 3, image_size: int = 32, patch_size: int | None = None) -> Backbone:
    """ViT-B (12 layers, 12 heads, 768 wide); patch 16 from 128 px up, else image_size // 8."""
    patch = patch_size or (16 if image_size >= 128 else max(2, image_size // 8))
    return ViTBackbone(
        in_channels, image_size, patch, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072
    )


def create_backbone(
    name: str, in_channels: int = 3, image_size: int = 32, **kwargs: Any
) -> Backbone:
    """Build a registered backbone by name."""
    return BACKBONES.create(name, in_channels=in_channels, image_size=image_size, **kwargs)
