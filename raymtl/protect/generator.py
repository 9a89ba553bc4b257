"""The MTL-UE generator (Yu et al., ICML 2025, Algorithm 1) and its embedding regularisers.

δ = ε·tanh(D([e_{1,y1} … e_{K,yK}, E(x)])) (or the reference's hard clamp to [-ε, ε]): a
ResNet-18-stem encoder E, one learned label-prior embedding per (task, class) and a
transposed-convolution decoder D. Variants:
'sample' (embeddings + E(x), the default), 'class' (embeddings only), 'z_only' (E(x) only).
Dense tasks (segmentation, depth, normals) have no classes to embed: their label map is encoded
instead (see ``DenseLabelEncoder``) and the embedding regularisers skip them, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raymtl.errors import ConfigError
from raymtl.models.backbones import torchvision_models
from raymtl.models.mtl import to_channels_last
from raymtl.tasks import IGNORE_INDEX, TaskSpec

VARIANTS = ("sample", "class", "z_only")
# How the decoder's output is bounded. 'clamp' is the reference code's hard clamp; at
# initialisation it saturates ~93 % of the pixels (measured on the synthetic set), whose
# gradients are then zero. 'tanh' (ε·tanh) keeps every pixel trainable; it is the default.
BOUNDS = ("tanh", "clamp")
EMBEDDING_CHANNELS = 16


def _encoder(in_channels: int, large_input: bool, width: int) -> nn.Sequential:
    """ResNet-18 stem + layer1 + layer2 (2·width channels), at H/2 (small) or H/8 (large)."""
    models = torchvision_models()
    net = models.resnet18(weights=None)
    block = models.resnet.BasicBlock
    net.inplanes = width
    layer1 = net._make_layer(block, width, 2)
    layer2 = net._make_layer(block, 2 * width, 2, stride=2)
    if large_input:
        stem = [
            nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        ]
    else:
        stem = [
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*stem, layer1, layer2)


def dense_label_channels(task: TaskSpec) -> int:
    """Channels of a dense task's label map as the generator reads it."""
    return {"segmentation": task.num_classes, "depth": 2, "normals": 3}[task.kind]


def dense_label_map(task: TaskSpec, target: Tensor) -> Tensor:
    """A dense label as a float map [B, C, H, W]: one-hot classes (ignored pixels all zero),
    log(1 + depth) with a validity channel, or the normal vectors (zero where unknown)."""
    if task.kind == "segmentation":
        valid = target != IGNORE_INDEX
        onehot = F.one_hot(torch.where(valid, target, 0).long(), task.num_classes)
        return (onehot * valid.unsqueeze(-1)).permute(0, 3, 1, 2).float()
    if task.kind == "depth":
        depth = target.float().reshape(len(target), 1, *target.shape[-2:])
        valid = (depth > 0).float()
        return torch.cat([torch.log1p(depth.clamp_min(0)) * valid, valid], dim=1)
    return target.float()


class DenseLabelEncoder(nn.Module):
    """The dense counterpart of a label-prior embedding: a learned map from a task's label map,
    pooled to the encoder's resolution, to ``EMBEDDING_CHANNELS`` channels."""

    def __init__(self, task: TaskSpec) -> None:
        super().__init__()
        self.task = task
        self.net = nn.Conv2d(dense_label_channels(task), EMBEDDING_CHANNELS, 3, padding=1)

    def forward(self, target: Tensor | None, batch: int, size: tuple[int, int]) -> Tensor:
        """[B, 16, *size]; ``target=None`` (an unprotected task) encodes an all-zero label map."""
        if target is None:
            zeros = torch.zeros(batch, self.net.in_channels, *size, device=self.net.weight.device)
            return self.net(zeros)
        return self.net(F.adaptive_avg_pool2d(dense_label_map(self.task, target), size))


def instance_norm(channels: int) -> nn.GroupNorm:
    """Affine instance normalisation, as GroupNorm with one group per channel: the same
    statistics and parameters as ``nn.InstanceNorm2d(channels, affine=True)``, but its CPU
    kernel keeps channels-last tensors channels-last (~5x faster forward; no layout copies)."""
    return nn.GroupNorm(channels, channels)


def _up(cin: int, cout: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(cin, cout, 4, 2, 1), instance_norm(cout), nn.ReLU(inplace=True)]


class MTLUEGenerator(nn.Module):
    """Maps (image, labels of every task) to an ε-bounded perturbation."""

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        in_channels: int,
        image_size: int,
        epsilon: float,
        variant: str = "sample",
        width: int = 64,
        unprotected: Sequence[str] = (),
        bound: str = "tanh",
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(
                f"unknown generator variant {variant!r}; available: {', '.join(VARIANTS)}"
            )
        if not 0 < epsilon <= 1:
            raise ConfigError(f"epsilon must be in (0, 1], got {epsilon}")
        if bound not in BOUNDS:
            raise ConfigError(f"unknown bound {bound!r}; available: {', '.join(BOUNDS)}")
        self.tasks, self.epsilon, self.variant, self.bound = list(tasks), epsilon, variant, bound
        self.unprotected = set(unprotected)
        large = image_size >= 128
        self.scale = 8 if large else 2
        if image_size % self.scale:
            raise ConfigError(f"image_size {image_size} must be a multiple of {self.scale}")
        side = image_size // self.scale
        self.encoder = _encoder(in_channels, large, width) if variant != "class" else None
        # Classification tasks: one 16×S×S embedding per class, N(0, 1) as in the paper.
        # Dense tasks: a label-map encoder. Both are absent in the z_only variant.
        self.embeddings = (
            nn.ParameterDict(
                {
                    t.name: nn.Parameter(
                        torch.randn(max(2, t.num_classes), EMBEDDING_CHANNELS, side, side)
                    )
                    for t in tasks
                    if not t.dense
                }
            )
            if variant != "z_only"
            else None
        )
        self.dense_encoders = (
            nn.ModuleDict({t.name: DenseLabelEncoder(t) for t in tasks if t.dense})
            if variant != "z_only"
            else None
        )
        channels = (2 * width if self.encoder is not None else 0) + (
            EMBEDDING_CHANNELS * len(tasks) if self.embeddings is not None else 0
        )
        # A 1x1 channel mix, then the reference's transposed convolutions (x2 for small inputs,
        # x8 for large ones) with InstanceNorm + ReLU; no tanh/sigmoid: the clamp bounds δ.
        ups = _up(2 * width, 2 * width) + (
            _up(2 * width, width) + _up(width, width) if large else []
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(channels, 2 * width, 1),
            instance_norm(2 * width),
            nn.ReLU(inplace=True),
            *ups,
            nn.Conv2d(width if large else 2 * width, in_channels, 3, padding=1),
        )
        to_channels_last(self)  # NHWC convolutions: ~1.1x faster steps on CPU (not below width 8)

    def label_embeddings(
        self, targets: dict[str, Tensor], batch: int, size: tuple[int, int]
    ) -> list[Tensor]:
        """The embedding chosen by each task's label (unprotected tasks: the mean over classes;
        dense tasks: their encoded label map at ``size``, or an all-zero map when unprotected)."""
        chosen = []
        for task in self.tasks:
            if task.dense:
                chosen.append(self.dense_code(task, targets, batch, size))
                continue
            table = self.embeddings[task.name]
            if task.name in self.unprotected:
                chosen.append(table.mean(0, keepdim=True).expand(batch, -1, -1, -1))
            else:
                chosen.append(table[targets[task.name].long()])
        return chosen

    def dense_code(
        self, task: TaskSpec, targets: dict[str, Tensor], batch: int, size: tuple[int, int]
    ) -> Tensor:
        """A dense task's encoded label map (all-zero map when the task is unprotected)."""
        hidden = None if task.name in self.unprotected else targets[task.name]
        return self.dense_encoders[task.name](hidden, batch, size)

    def concatenated_input(self, images: Tensor, targets: dict[str, Tensor]) -> Tensor:
        """The decoder's input as the paper defines it: the chosen embeddings and E(x),
        concatenated along the channels (``forward`` computes its 1x1 mix without building it)."""
        parts = []
        size = (images.shape[-2] // self.scale, images.shape[-1] // self.scale)
        if self.embeddings is not None:
            parts += self.label_embeddings(targets, len(images), size)
        if self.encoder is not None:
            parts.append(self.encoder(images))
        return torch.cat(parts, dim=1)

    def mixed_input(self, images: Tensor, targets: dict[str, Tensor]) -> Tensor:
        """The decoder's first layer (a 1x1 convolution) applied to ``concatenated_input``,
        computed part by part: each class embedding is mixed once per batch, and each sample
        then takes the sum of its classes' mixed embeddings (one matrix product), so the
        [B, 16·K + 2·width, S, S] concatenation and its per-sample copies are never built."""
        mix = self.decoder[0]
        weight = mix.weight.flatten(1)  # [out, in]: the 1x1 kernel
        batch = len(images)
        size = (images.shape[-2] // self.scale, images.shape[-1] // self.scale)
        terms = []
        offset = 0
        tables, rows = [], []
        if self.embeddings is not None:
            for task in self.tasks:
                part = weight[:, offset : offset + EMBEDDING_CHANNELS]
                offset += EMBEDDING_CHANNELS
                if task.dense:
                    code = self.dense_code(task, targets, batch, size)
                    terms.append(F.conv2d(code, part[:, :, None, None]))
                    continue
                table = self.embeddings[task.name]
                tables.append(torch.einsum("oc,nchw->nhwo", part, table))  # [C, S, S, out]
                if task.name in self.unprotected:  # the mean of its class embeddings
                    rows.append(table.new_full((batch, len(table)), 1 / len(table)))
                else:
                    rows.append(F.one_hot(targets[task.name].long(), len(table)).to(table))
        if tables:
            mixed = torch.cat(tables).flatten(1)  # [Σ classes, S·S·out]
            choice = torch.cat(rows, dim=1)  # [B, Σ classes]: which classes each sample adds
            terms.append((choice @ mixed).view(batch, *size, -1).permute(0, 3, 1, 2))  # NHWC
        if self.encoder is not None:  # E(x) takes the kernel's last input channels
            terms.append(F.conv2d(self.encoder(images), weight[:, offset:, None, None]))
        # summed in the order the committed figures were measured with, the bias last
        return sum(terms[1:], terms[0]) + mix.bias.view(1, -1, 1, 1)

    def forward(self, images: Tensor, targets: dict[str, Tensor]) -> Tensor:
        """δ for a batch, within [-ε, ε] (not added to the images)."""
        return self.bounded(self.decoder[1:](self.mixed_input(images, targets)), images)

    def bounded(self, raw: Tensor, images: Tensor) -> Tensor:
        """The decoder's output at the images' size, bounded to [-ε, ε] (ε·tanh or the clamp)."""
        if raw.shape[-2:] != images.shape[-2:]:
            raw = F.interpolate(raw, size=images.shape[-2:], mode="bilinear", align_corners=False)
        if self.bound == "tanh":
            return self.epsilon * torch.tanh(raw)
        return raw.clamp(-self.epsilon, self.epsilon)


def _flat_normalised(table: Tensor) -> Tensor:
    return F.normalize(table.flatten(1), dim=1)


def intra_task_loss(generator: MTLUEGenerator) -> Tensor:
    """λ1 term: per task, mean cosine similarity (+1) between different classes' embeddings."""
    if not generator.embeddings:  # z_only, or dense tasks only (no regulariser for those)
        return torch.zeros(())
    terms = []
    for table in generator.embeddings.values():
        z = _flat_normalised(table)
        cosine = z @ z.t()
        k = len(z)
        off_diagonal = cosine[~torch.eye(k, dtype=torch.bool, device=z.device)]
        terms.append((off_diagonal + 1).mean())
    return torch.stack(terms).mean()


def inter_task_loss(generator: MTLUEGenerator) -> Tensor:
    """λ2 term: mean |cosine| over all pairs of embeddings that belong to different tasks."""
    if generator.embeddings is None or len(generator.embeddings) < 2:
        return torch.zeros(())
    tables = [_flat_normalised(t) for t in generator.embeddings.values()]
    owner = torch.cat([torch.full((len(t),), i) for i, t in enumerate(tables)])
    z = torch.cat(tables)
    different = owner[:, None] != owner[None, :]
    return (z @ z.t()).abs()[different.to(z.device)].mean()
