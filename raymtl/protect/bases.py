"""Base methods MTL-UE plugs into (and the per-sample PGD baselines use): EM, TAP, SEP.

Each base gives a loss on (perturbed images, labels) that generating δ *minimises*, and an
end-of-epoch hook that may train its surrogate and says when to stop.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from raymtl.data.base import MultiTaskArrays
from raymtl.engine import TrainConfig, fit
from raymtl.errors import ConfigError
from raymtl.models import create_model
from raymtl.registry import Registry
from raymtl.tasks import IGNORE_INDEX, TaskSpec

PerturbFn = Callable[[Tensor, dict[str, Tensor], Tensor], Tensor]  # (images, targets, ids) -> δ


@dataclass
class SurrogateConfig:
    """How the surrogate / clean models are built and trained."""

    backbone: str = "small_cnn"
    clean_epochs: int = 8
    batch_size: int = 128
    lr: float = 2e-3
    em_steps_per_epoch: int = 2  # MTL-UE+EM: surrogate steps after each generator epoch
    em_pgd_surrogate_steps: int = 10  # per-sample EM: surrogate steps before each PGD round
    em_stop_error: float = 0.01
    # EM: fresh surrogates that must fit x+δ again before the stop rule may end generation. A
    # surrogate trained for long also knows the images' own features, so noise tuned to it alone
    # need not be what a victim learning from scratch picks up first (0 = the paper's EM).
    em_restarts: int = 0
    tap_stop_error: float = 0.9
    sep_checkpoints: int = 4
    sep_stop_error: float = 0.99
    device: str = "cpu"
    seed: int = 0

    def validate(self) -> SurrogateConfig:
        """ConfigError naming the first impossible value."""
        for name in ("clean_epochs", "batch_size", "em_steps_per_epoch", "sep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"surrogate {name} must be >= 1, got {getattr(self, name)}")
        for name in ("em_pgd_surrogate_steps", "em_restarts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"surrogate {name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"surrogate lr must be > 0, got {self.lr}")
        return self


def target_labels(task: TaskSpec, labels: Tensor) -> Tensor:
    """TAP's targets: binary -> flipped label; C classes -> (y + ⌊C/2⌋) mod C (per pixel for
    segmentation, ignored pixels kept); depth -> mirrored within each sample's valid range
    (near becomes far); normals -> reversed. Unknown pixels stay unknown."""
    if task.kind == "binary":
        return 1 - labels
    if task.kind in ("multiclass", "segmentation"):
        shifted = (labels + task.num_classes // 2) % task.num_classes
        return torch.where(labels == IGNORE_INDEX, labels, shifted)
    if task.kind == "depth":
        valid = labels > 0
        far = torch.where(valid, labels, torch.full_like(labels, -torch.inf))
        near = torch.where(valid, labels, torch.full_like(labels, torch.inf))
        dims = tuple(range(1, labels.dim()))
        high, low = far.amax(dims, keepdim=True), near.amin(dims, keepdim=True)
        return torch.where(valid, high + low - labels, labels)
    return -labels


def mean_task_loss(
    model: nn.Module, images: Tensor, targets: dict[str, Tensor], tasks: Sequence[TaskSpec]
) -> Tensor:
    """Mean over tasks of each task's mean loss."""
    return mean_output_loss(model(images), targets, tasks)


def mean_output_loss(
    outputs: dict[str, Tensor], targets: dict[str, Tensor], tasks: Sequence[TaskSpec]
) -> Tensor:
    """Mean over tasks of each task's mean loss, from outputs already computed."""
    return torch.stack([t.loss(outputs[t.name], targets[t.name]).mean() for t in tasks]).mean()


@torch.no_grad()
def mean_error(
    models: Sequence[nn.Module],
    perturb: PerturbFn,
    data: MultiTaskArrays,
    tasks: Sequence[TaskSpec],
    limit: int = 1024,
) -> float:
    """Mean over tasks (and models) of the error on true labels of x+δ for the first ``limit``
    samples; a dense task's error is 1 − its primary metric (mIoU, δ<1.25, % within 30°)."""
    batch = data.__getitems__(list(range(min(limit, len(data)))))
    images = batch["image"] + perturb(batch["image"], batch["targets"], batch["id"])
    errors = []
    for model in models:
        model.eval()
        outputs = model(images)
        for t in tasks:
            out, truth = outputs[t.name], batch["targets"][t.name]
            if t.dense:
                meter = t.new_meter()
                meter.update(out, truth)
                errors.append(1.0 - torch.tensor(meter.compute()[t.primary_metric]))
                continue
            predicted = (out.squeeze(1) > 0).long() if t.kind == "binary" else out.argmax(1)
            errors.append((predicted != truth).float().mean())
    return float(torch.stack(errors).mean())


DELTA_CACHE_BYTES = 1 << 29  # at most this much δ is held at once while a surrogate trains


def batch_deltas(
    perturb: PerturbFn,
    train: MultiTaskArrays,
    draws: Sequence[Tensor],
    chunk: int = 256,
) -> Iterator[Tensor]:
    """δ of each batch of ``draws`` (index tensors into ``train``), in order. Random batches
    draw many samples more than once; each distinct sample's δ is computed once, in chunks of
    ``chunk``, when all of them fit in ``DELTA_CACHE_BYTES`` (else batch by batch, as drawn)."""
    if not draws:
        return
    unique, where = torch.unique(torch.cat(draws), return_inverse=True)
    sample_bytes = train.images[0].numel() * 4
    if len(unique) * sample_bytes > DELTA_CACHE_BYTES:
        for index in draws:
            batch = train.__getitems__(index.tolist())
            with torch.no_grad():  # not around the yield: the caller's step needs autograd
                delta = perturb(batch["image"], batch["targets"], batch["id"])
            yield delta
        return
    parts = []
    with torch.no_grad():
        for part in unique.split(chunk):
            batch = train.__getitems__(part.tolist())
            parts.append(perturb(batch["image"], batch["targets"], batch["id"]))
    cached = torch.cat(parts)
    for rows in where.split([len(index) for index in draws]):
        yield cached[rows]


class UEBase(ABC):
    """A base method: ``loss`` to minimise over δ; ``after_epoch`` trains surrogates / stops."""

    name = "base"

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        in_channels: int,
        image_size: int,
        config: SurrogateConfig,
        kept: Sequence[TaskSpec] = (),
        keep_weight: float = 0.0,
    ) -> None:
        self.tasks, self.in_channels, self.image_size, self.config = (
            list(tasks),
            in_channels,
            image_size,
            config,
        )
        self.kept = list(kept)  # partial protection: the unprotected tasks
        self.keep_weight = keep_weight  # TAP/SEP: weight of keeping the kept tasks' predictions

    clean_models: list[nn.Module] | None = None  # a clean run trained elsewhere (TAP/SEP reuse it)

    @property
    def model_tasks(self) -> list[TaskSpec]:
        """The heads a surrogate / clean model has: the protected tasks, then the kept ones."""
        return self.tasks + self.kept

    def new_model(self) -> nn.Module:
        """A fresh surrogate network."""
        return create_model(
            self.config.backbone, self.model_tasks, self.in_channels, self.image_size
        )

    def prepare(self, train: MultiTaskArrays) -> None:
        """Train whatever the base needs before generation starts."""
        return None  # optional hook: nothing to do by default

    def prepare_for_resume(self, train: MultiTaskArrays) -> None:
        """Build (untrained) surrogates whose weights ``load_state_dict`` will restore."""
        return None  # optional hook: nothing to do by default

    @abstractmethod
    def loss(self, perturbed: Tensor, targets: dict[str, Tensor]) -> Tensor:
        """The quantity generation minimises."""

    def after_epoch(self, perturb: PerturbFn, train: MultiTaskArrays) -> bool:
        """Called after each generation epoch; return True to stop early."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (surrogates)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict``."""
        return None  # optional hook: nothing to do by default


UE_BASES: Registry[UEBase] = Registry("base method")


_CLEAN_RUNS: dict[tuple, list[nn.Module]] = {}  # the last clean run, shared by TAP and SEP


def _train_clean(base: UEBase, train: MultiTaskArrays) -> list[nn.Module]:
    """One clean training run's ``sep_checkpoints`` evenly spaced snapshots (the last is the
    final model). The run is cached in memory, so TAP, SEP and their MTL-UE versions on the same
    data and surrogate settings share it instead of each training a clean model."""
    cfg = base.config
    key = (
        id(train.images),
        train.images.data_ptr(),
        len(train),
        repr(cfg),
        tuple(t.name for t in base.model_tasks),
        base.in_channels,
        base.image_size,
    )
    if key in _CLEAN_RUNS:
        return _CLEAN_RUNS[key]
    torch.manual_seed(cfg.seed)
    model = base.new_model()
    epochs, keep = cfg.clean_epochs, max(1, cfg.sep_checkpoints)
    wanted = {round(epochs * (i + 1) / keep) for i in range(keep)}
    snapshots: list[nn.Module] = []

    def snapshot(epoch: int, row: dict[str, float]) -> None:
        if epoch in wanted:
            frozen = copy.deepcopy(model).eval()
            for p in frozen.parameters():
                p.requires_grad_(False)
            snapshots.append(frozen)

    config = TrainConfig(
        epochs=epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        device=cfg.device,
        seed=cfg.seed,
        eval_every=0,
    )
    fit(model, train, None, base.model_tasks, config, snapshot)
    _CLEAN_RUNS.clear()
    _CLEAN_RUNS[key] = snapshots
    return snapshots


def clean_run(
    tasks: Sequence[TaskSpec],
    in_channels: int,
    image_size: int,
    config: SurrogateConfig,
    train: MultiTaskArrays,
) -> list[nn.Module]:
    """The clean training run TAP and SEP attack (its evenly spaced snapshots), trained once so
    that many generations (e.g. the trials of a study) can share it via ``clean_models``."""
    return _train_clean(TargetedAdversarialPoisoning(tasks, in_channels, image_size, config), train)


@UE_BASES.register("em")
class ErrorMinimising(UEBase):
    """EM (Huang et al. 2021): minimise a surrogate's loss on the true labels; the surrogate is
    trained alternately on x+δ; stop when its train error <= em_stop_error. With
    ``em_restarts`` the first fits each start a fresh surrogate instead of stopping."""

    name = "em"

    def prepare(self, train: MultiTaskArrays) -> None:
        self.restarts_done = 0
        self._new_surrogate()
        self._generator = torch.Generator().manual_seed(self.config.seed)

    def _new_surrogate(self) -> None:
        """A freshly initialised surrogate and its optimiser (seeded by the restart count)."""
        torch.manual_seed(self.config.seed + 1_000_003 * self.restarts_done)
        self.surrogate = self.new_model().to(self.config.device)
        self.optimizer = torch.optim.Adam(self.surrogate.parameters(), lr=self.config.lr)

    def prepare_for_resume(self, train: MultiTaskArrays) -> None:
        self.prepare(train)  # a fresh surrogate and optimiser; the checkpoint fills them in

    def loss(self, perturbed: Tensor, targets: dict[str, Tensor]) -> Tensor:
        self.surrogate.eval()
        return mean_task_loss(self.surrogate, perturbed, targets, self.tasks)

    def train_surrogate(self, perturb: PerturbFn, train: MultiTaskArrays, steps: int) -> None:
        """``steps`` optimiser steps of the surrogate on random batches of x+δ. δ is fixed while
        the surrogate trains, so each sample drawn is perturbed once (see ``batch_deltas``)."""
        self.surrogate.train()
        draws = [
            torch.randint(0, len(train), (self.config.batch_size,), generator=self._generator)
            for _ in range(steps)
        ]
        for index, delta in zip(draws, batch_deltas(perturb, train, draws), strict=True):
            batch = train.__getitems__(index.tolist())
            loss = mean_task_loss(
                self.surrogate, batch["image"] + delta, batch["targets"], self.tasks
            )
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()

    def after_epoch(self, perturb: PerturbFn, train: MultiTaskArrays) -> bool:
        self.train_surrogate(perturb, train, self.config.em_steps_per_epoch)
        fitted = (
            mean_error([self.surrogate], perturb, train, self.tasks) <= self.config.em_stop_error
        )
        if fitted and self.restarts_done < self.config.em_restarts:
            self.restarts_done += 1
            self._new_surrogate()
            return False
        return fitted

    def state_dict(self) -> dict[str, Any]:
        return {
            "surrogate": self.surrogate.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "restarts_done": self.restarts_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restarts_done = state.get("restarts_done", 0)
        self.surrogate.load_state_dict(state["surrogate"])
        self.optimizer.load_state_dict(state["optimizer"])


@UE_BASES.register("tap")
class TargetedAdversarialPoisoning(UEBase):
    """TAP (Fowl et al. 2021): push a frozen clean model toward target labels; stop when its
    error on true labels >= tap_stop_error. With partial protection (``kept`` tasks and a
    ``keep_weight``) the same model's loss on the unprotected tasks' TRUE labels is added, so δ
    does not carry the protected tasks' damage into the tasks that should stay learnable."""

    name = "tap"

    def prepare(self, train: MultiTaskArrays) -> None:
        self.models = (self.clean_models or _train_clean(self, train))[-1:]

    def loss(self, perturbed: Tensor, targets: dict[str, Tensor]) -> Tensor:
        wanted = {t.name: target_labels(t, targets[t.name]) for t in self.tasks}
        losses = []
        for model in self.models:
            outputs = model(perturbed)
            loss = mean_output_loss(outputs, wanted, self.tasks)
            if self.kept and self.keep_weight > 0:  # the unprotected tasks stay as they were
                loss = loss + self.keep_weight * mean_output_loss(outputs, targets, self.kept)
            losses.append(loss)
        return torch.stack(losses).sum()

    def stop_error(self) -> float:
        """Error on true labels at which generation may stop."""
        return self.config.tap_stop_error

    def after_epoch(self, perturb: PerturbFn, train: MultiTaskArrays) -> bool:
        return mean_error(self.models, perturb, train, self.tasks) >= self.stop_error()

    def state_dict(self) -> dict[str, Any]:
        return {"models": [m.state_dict() for m in self.models]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.models = []
        for weights in state["models"]:
            model = self.new_model()
            model.load_state_dict(weights)
            self.models.append(model.eval().requires_grad_(False))


@UE_BASES.register("sep")
class SelfEnsembleProtection(TargetedAdversarialPoisoning):
    """SEP (Chen et al. 2023): the TAP loss summed over checkpoints of one clean training run,
    kept in memory; stop when the ensemble's error >= sep_stop_error."""

    name = "sep"

    def prepare(self, train: MultiTaskArrays) -> None:
        self.models = list(self.clean_models or _train_clean(self, train))

    def stop_error(self) -> float:
        return self.config.sep_stop_error
