"""Generate protective perturbations: MTL-UE generators and per-sample PGD baselines.

``protect`` trains (or runs) the chosen method on a training split and returns the sample ids
with their integer δ. With a checkpoint folder, progress is saved every epoch/round and a re-run
with the same configuration resumes from it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from raymtl.data.base import MultiTaskArrays
from raymtl.distributed import GradientSync
from raymtl.errors import ConfigError
from raymtl.io import atomic_write_bytes
from raymtl.protect.bases import UE_BASES, SurrogateConfig, UEBase
from raymtl.protect.generator import (
    BOUNDS,
    VARIANTS,
    MTLUEGenerator,
    inter_task_loss,
    intra_task_loss,
)
from raymtl.protect.store import quantise_delta
from raymtl.registry import Registry
from raymtl.tasks import TaskSpec

CHECKPOINT = "checkpoint.pt"
COMBINE_MODES = ("average", "grid")  # how LSP combines per-task class patterns


@dataclass
class ProtectConfig:
    """What to generate and how (defaults: the paper's ε and the reference code's λs)."""

    method: str = "mtlue"  # mtlue | pgd
    base: str = "em"  # em | tap | sep
    epsilon: float = 8 / 255
    lambda1: float = 10.0
    lambda2: float = 200.0
    variant: str = "sample"  # sample | class | z_only
    protected_tasks: list[str] | None = None  # partial-task protection: these tasks only
    # Partial protection with TAP/SEP: weight of the clean model's true-label loss on the
    # unprotected tasks, so that δ leaves them learnable (0: only their labels are withheld).
    keep_unprotected: float = 1.0
    bound: str = "tanh"  # tanh | clamp: how the generator keeps δ within ε
    epochs: int = 20  # generator epochs (cap) / EM-PGD rounds (cap)
    samples_per_epoch: int = 0  # generator: training samples drawn per epoch (0 = all)
    batch_size: int = 128
    # Generator Adam lr. The paper's 1e-3 is for ~30k steps (100 epochs of CelebA); in the few
    # hundred steps of a CPU run the N(0, 1) label embeddings barely move at 1e-3, and at 3e-2
    # δ saturates at ±ε. 1e-2 protects best at that scale (see README, "Protect").
    lr: float = 1e-2
    weight_decay: float = 1e-4
    width: int = 32  # generator encoder width (64 = the paper's ResNet-18 stem)
    pgd_steps: int = 20
    pgd_step_size: float = 0.8 / 255
    combine: str = "average"  # lsp: how per-task class patterns are combined (average | grid)
    patch_size: int = 8  # lsp: side of one colour patch, in pixels
    seed: int = 0
    device: str = "cpu"
    surrogate: SurrogateConfig = field(default_factory=SurrogateConfig)

    def validate(self) -> ProtectConfig:
        """ConfigError naming the first impossible value or unknown name."""
        method = UE_METHODS.get(self.method)
        if getattr(method, "uses_base", True):
            UE_BASES.get(self.base)
        if not (0 < self.epsilon <= 1) or math.isnan(self.epsilon):
            raise ConfigError(
                f"epsilon must be in (0, 1] (e.g. 8/255 = {8 / 255:.4f}), got {self.epsilon}"
            )
        for name in ("lambda1", "lambda2", "keep_unprotected"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.bound not in BOUNDS:
            raise ConfigError(f"unknown bound {self.bound!r}; available: {', '.join(BOUNDS)}")
        if self.variant not in VARIANTS:
            raise ConfigError(
                f"unknown generator variant {self.variant!r}; available: {', '.join(VARIANTS)}"
            )
        if self.combine not in COMBINE_MODES:
            raise ConfigError(
                f"combine must be one of {', '.join(COMBINE_MODES)}, got {self.combine!r}"
            )
        for name in ("epochs", "batch_size", "width", "pgd_steps", "patch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.surrogate.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for metadata."""
        return asdict(self)

    def fingerprint(self) -> str:
        """Hash of the configuration (a checkpoint resumes only the same configuration)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ProtectResult:
    """Sample ids, their integer δ, and a per-epoch log."""

    ids: np.ndarray
    deltas: np.ndarray
    log: list[dict[str, float]]
    seconds: float


ProtectFn = Callable[..., ProtectResult]
UE_METHODS: Registry[ProtectFn] = Registry("protection method")


def _save(folder: Path | None, state: dict[str, Any]) -> None:
    if folder is None:
        return
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(folder / CHECKPOINT, buffer.getvalue())


def _load(folder: Path | None, fingerprint: str) -> dict[str, Any] | None:
    if folder is None or not (folder / CHECKPOINT).is_file():
        return None
    state = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{folder / CHECKPOINT}: checkpoint of another configuration; choose another output folder"
        )
    return state


def _batches(n: int, batch_size: int, seed: int, epoch: int, limit: int = 0) -> list[Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    if limit:
        order = order[:limit]
    return list(order.split(batch_size))


@torch.no_grad()
def _all_deltas(
    perturb: Callable[[Tensor, dict[str, Tensor], Tensor], Tensor],
    train: MultiTaskArrays,
    batch_size: int,
    epsilon: float,
) -> np.ndarray:
    parts = []
    for start in range(0, len(train), batch_size):
        batch = train.__getitems__(list(range(start, min(start + batch_size, len(train)))))
        parts.append(
            quantise_delta(perturb(batch["image"], batch["targets"], batch["id"]), epsilon)
        )
    return np.concatenate(parts)


@UE_METHODS.register("mtlue")
def protect_mtlue(
    train: MultiTaskArrays,
    tasks: Sequence[TaskSpec],
    in_channels: int,
    image_size: int,
    config: ProtectConfig,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    *,
    sync: GradientSync | None = None,
    resume_state: dict[str, Any] | None = None,
    epoch_hook: Callable[[dict[str, Any], Callable[..., Tensor]], None] | None = None,
    compute_deltas: bool = True,
    clean_models: list[torch.nn.Module] | None = None,
) -> ProtectResult:
    """Train an MTL-UE generator against the base loss (+ λ1, λ2 regularisers); δ for every sample.
    With partial-task protection the base loss covers the protected tasks only, and each
    unprotected task feeds the decoder the mean of its class embeddings (its labels never enter δ).

    Data parallel (``sync`` over several ranks): each rank takes its share of every batch and the
    generator's gradients are averaged, so ranks stay identical; the surrogate or ensemble is held
    on every rank. ``resume_state`` / ``epoch_hook`` let a runner (Ray Train) own checkpointing:
    the hook gets the checkpoint state and the perturb function after every epoch."""
    sync = sync or GradientSync()
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    protected = protected_subset(tasks, config.protected_tasks)
    generator = MTLUEGenerator(
        tasks,
        in_channels,
        image_size,
        config.epsilon,
        config.variant,
        config.width,
        unprotected=[t.name for t in tasks if t not in protected],
        bound=config.bound,
    )
    optimizer = torch.optim.Adam(
        generator.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    milestones = sorted({max(1, round(config.epochs * f)) for f in (0.6, 0.8)})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, 0.1)
    base = create_base(config, tasks, protected, in_channels, image_size)
    base.clean_models = clean_models
    sync.broadcast_(generator)
    state = resume_state or _load(checkpoint_dir, config.fingerprint())
    log: list[dict[str, float]] = []
    first_epoch, stopped = 0, False
    if state is not None:
        generator.load_state_dict(state["generator"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        base.prepare_for_resume(train)
        base.load_state_dict(state["base"])
        first_epoch, stopped, log = state["epoch"], state["stopped"], state["log"]
    else:
        base.prepare(train)

    def perturb(images: Tensor, targets: dict[str, Tensor], ids: Tensor) -> Tensor:
        generator.eval()
        return generator(images, targets)

    bar = tqdm(
        total=config.epochs,
        initial=first_epoch,
        desc=f"MTL-UE+{config.base.upper()}",
        unit="epoch",
        disable=not progress,
    )
    for epoch in range(first_epoch, config.epochs):
        if stopped:
            break
        generator.train()
        totals = torch.zeros(3)
        batches = _batches(
            len(train), config.batch_size, config.seed, epoch, config.samples_per_epoch
        )
        for index in batches:
            batch = train.__getitems__(sync.shard(index).tolist())
            delta = generator(batch["image"], batch["targets"])
            base_loss = base.loss(batch["image"] + delta, batch["targets"])
            intra, inter = intra_task_loss(generator), inter_task_loss(generator)
            loss = base_loss + config.lambda1 * intra + config.lambda2 * inter
            optimizer.zero_grad()
            loss.backward()
            sync.mean_grads_(generator.parameters())
            optimizer.step()
            totals += torch.stack([base_loss.detach(), intra.detach(), inter.detach()])
        scheduler.step()
        sync.mean_(totals)
        sync.mean_buffers_(generator)
        stopped = base.after_epoch(perturb, train)
        totals /= max(1, len(batches))
        log.append(
            {
                "epoch": epoch + 1,
                "base_loss": float(totals[0]),
                "intra": float(totals[1]),
                "inter": float(totals[2]),
            }
        )
        epoch_state = {
            "fingerprint": config.fingerprint(),
            "epoch": epoch + 1,
            "stopped": stopped,
            "log": log,
            "generator": generator.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "base": base.state_dict(),
        }
        _save(checkpoint_dir, epoch_state)
        if epoch_hook is not None:
            epoch_hook(epoch_state, perturb)
        bar.update(1)
        bar.set_postfix(base_loss=f"{float(totals[0]):.3f}")
    bar.close()
    if not compute_deltas:
        empty = np.zeros((0, in_channels, image_size, image_size), np.int16)
        return ProtectResult(np.zeros(0, np.int64), empty, log, time.perf_counter() - start)
    deltas = _all_deltas(perturb, train, 256, config.epsilon)
    return ProtectResult(train.ids.numpy().copy(), deltas, log, time.perf_counter() - start)


@UE_METHODS.register("pgd")
def protect_pgd(
    train: MultiTaskArrays,
    tasks: Sequence[TaskSpec],
    in_channels: int,
    image_size: int,
    config: ProtectConfig,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
) -> ProtectResult:
    """Per-sample PGD baseline: ``pgd_steps`` signed steps of ``pgd_step_size`` within ε that
    minimise the base loss. EM alternates a few surrogate steps (Huang et al.: 10) with a PGD
    pass over every sample until the surrogate's error <= em_stop_error (at most ``epochs``
    rounds), so the noise leads the surrogate; TAP/SEP run one pass."""
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    protected = protected_subset(tasks, config.protected_tasks)
    base = create_base(config, tasks, protected, in_channels, image_size)
    state = _load(checkpoint_dir, config.fingerprint())
    if state is not None:
        delta = state["delta"]
        base.prepare_for_resume(train)
        base.load_state_dict(state["base"])
        first_round, stopped, log = state["round"], state["stopped"], state["log"]
    else:
        base.prepare(train)
        delta = torch.zeros(train.images.shape, dtype=torch.float32)
        first_round, stopped, log = 0, False, []
    position = {int(i): p for p, i in enumerate(train.ids.tolist())}

    def perturb(images: Tensor, targets: dict[str, Tensor], ids: Tensor) -> Tensor:
        return delta[[position[int(i)] for i in ids]]

    rounds = config.epochs if config.base == "em" else 1
    bar = tqdm(
        total=rounds,
        initial=first_round,
        desc=f"PGD-{config.base.upper()}",
        unit="round",
        disable=not progress,
    )
    for round_number in range(first_round, rounds):
        if stopped:
            break
        if config.base == "em":
            base.train_surrogate(perturb, train, config.surrogate.em_pgd_surrogate_steps)
        for index in _batches(len(train), config.batch_size, config.seed, round_number):
            batch = train.__getitems__(index.tolist())
            d = delta[index].clone()
            for _ in range(config.pgd_steps):
                d.requires_grad_(True)
                loss = base.loss(batch["image"] + d, batch["targets"])
                (grad,) = torch.autograd.grad(loss, d)
                d = (d.detach() - config.pgd_step_size * grad.sign()).clamp(
                    -config.epsilon, config.epsilon
                )
                d = (batch["image"] + d).clamp(0, 1) - batch["image"]
            delta[index] = d.detach()
        stopped = base.after_epoch(perturb, train) if config.base == "em" else True
        log.append({"round": round_number + 1})
        _save(
            checkpoint_dir,
            {
                "fingerprint": config.fingerprint(),
                "round": round_number + 1,
                "stopped": stopped,
                "log": log,
                "delta": delta,
                "base": base.state_dict(),
            },
        )
        bar.update(1)
    bar.close()
    return ProtectResult(
        train.ids.numpy().copy(),
        quantise_delta(delta, config.epsilon),
        log,
        time.perf_counter() - start,
    )


def create_base(
    config: ProtectConfig,
    tasks: Sequence[TaskSpec],
    protected: Sequence[TaskSpec],
    in_channels: int,
    image_size: int,
) -> UEBase:
    """The configured base method over the protected tasks; the other tasks are kept (TAP/SEP
    hold their predictions with weight ``keep_unprotected``)."""
    kept = [t for t in tasks if t not in protected]
    return UE_BASES.create(
        config.base,
        protected,
        in_channels,
        image_size,
        config.surrogate,
        kept,
        config.keep_unprotected,
    )


def protected_subset(tasks: Sequence[TaskSpec], names: Sequence[str] | None) -> list[TaskSpec]:
    """The tasks to protect (all when ``names`` is None); ConfigError on an unknown name."""
    if names is None:
        return list(tasks)
    known = {t.name for t in tasks}
    for name in names:
        if name not in known:
            raise ConfigError(
                f"protected task {name!r} is not a task of this data set; tasks: {', '.join(t.name for t in tasks)}"
            )
    if not names:
        raise ConfigError("protected_tasks is empty: name at least one task to protect")
    return [t for t in tasks if t.name in set(names)]


def protect(
    train: MultiTaskArrays,
    tasks: Sequence[TaskSpec],
    in_channels: int,
    image_size: int,
    config: ProtectConfig,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> ProtectResult:
    """Run the configured protection method on a training split."""
    config.validate()
    protected_subset(tasks, config.protected_tasks)  # unknown task names fail before any work
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    return UE_METHODS.create(
        config.method, train, tasks, in_channels, image_size, config, folder, progress
    )
