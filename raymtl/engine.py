"""Ray-free training and evaluation of multi-task (MTL) or single-task (STL) models.

``fit`` trains one model on all tasks with a weighting strategy; ``fit_stl`` trains one model per
task. Batches may carry ``masks`` {task: [B] float} to drop (sample, task) pairs from the losses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from raymtl.data.base import collate_batch
from raymtl.defences import create_defence
from raymtl.distributed import GradientSync
from raymtl.errors import ConfigError
from raymtl.models.mtl import MultiTaskModel
from raymtl.tasks import TaskSpec, mean_primary
from raymtl.weighting import Weighting, create_weighting

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainConfig:
    """Victim/original-model training recipe (defaults: a quick CPU run on the synthetic set)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    weighting: str = "ls"
    weighting_options: dict[str, Any] = field(default_factory=dict)
    defence: str | None = None  # a DEFENCES name applied to every training batch
    defence_options: dict[str, Any] = field(default_factory=dict)
    lr_milestones: tuple[float, ...] = (0.6, 0.8)  # fractions of the epochs (paper: 36/60, 48/60)
    lr_gamma: float = 0.1
    device: str = "auto"
    amp: bool = False
    num_workers: int = 0
    seed: int = 0
    eval_every: int = 1

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming the first bad field."""
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0 and math.isfinite(self.lr),
            "weight_decay": self.weight_decay >= 0,
            "lr_gamma": 0 < self.lr_gamma <= 1,
            "num_workers": self.num_workers >= 0,
            "eval_every": self.eval_every >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"invalid {name}={getattr(self, name)!r}")
        if self.defence is not None:
            create_defence(self.defence, **self.defence_options)  # names and options checked
        if any(not 0 < m <= 1 for m in self.lr_milestones):
            raise ConfigError("lr_milestones must be fractions of the epochs in (0, 1]")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for configs."""
        out = asdict(self)
        out["lr_milestones"] = list(self.lr_milestones)
        return out


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; any torch device string is accepted."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"invalid device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    pin: bool = False,
) -> DataLoader:
    """A DataLoader with seeded shuffling; batched fetch for in-memory splits."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        pin_memory=pin,
        collate_fn=collate_batch,
        persistent_workers=num_workers > 0,
    )


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a batch's tensors (nested one level) to ``device``."""
    non_blocking = device.type == "cuda"
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, dict):
            out[key] = {k: v.to(device, non_blocking=non_blocking) for k, v in value.items()}
        elif isinstance(value, Tensor):
            out[key] = value.to(device, non_blocking=non_blocking)
        else:
            out[key] = value
    return out


def task_losses(
    outputs: dict[str, Tensor], batch: dict[str, Any], tasks: Sequence[TaskSpec]
) -> Tensor:
    """Per-task mean losses [K]; a task's loss averages only samples whose mask is 1."""
    masks = batch.get("masks") or {}
    losses = []
    for task in tasks:
        per_sample = task.loss(outputs[task.name].float(), batch["targets"][task.name])
        mask = masks.get(task.name)
        if mask is None:
            losses.append(per_sample.mean())
        else:
            mask = mask.to(per_sample)
            losses.append((per_sample * mask).sum() / mask.sum().clamp_min(1.0))
    return torch.stack(losses)


def backward_with_weighting(
    model: MultiTaskModel,
    losses: Tensor,
    weighting: Weighting,
    sync: GradientSync | None = None,
) -> None:
    """Fill .grad: loss-based strategies back-propagate their scalar; gradient-based ones set the
    shared parameters' gradient to ``aggregate`` of the per-task gradient matrix.

    With a multi-rank ``sync`` (data parallel), the gradients, the task-gradient matrix and the
    losses are averaged over ranks before aggregation, so every rank takes the step one process
    would take on the whole global batch."""
    sync = sync or GradientSync()
    if not weighting.uses_task_gradients:
        weighting.combine(losses).backward()
        sync.mean_grads_([*model.parameters(), *weighting.parameters()])
        return
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    rows = []
    for k in range(len(losses)):
        grads = torch.autograd.grad(losses[k], shared, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).flatten()
                    for g, p in zip(grads, shared, strict=True)
                ]
            )
        )
    matrix = sync.mean_(torch.stack(rows))
    direction = weighting.aggregate(matrix, sync.mean_(losses.detach().clone()))
    task_params = list(model.task_parameters())
    losses.sum().backward(inputs=task_params)
    sync.mean_grads_([*task_params, *weighting.parameters()])
    offset = 0
    for p in shared:
        n = p.numel()
        p.grad = direction[offset : offset + n].view_as(p).to(p.dtype).clone()
        offset += n


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    tasks: Sequence[TaskSpec],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Per-task metrics {task: {metric: value}}, the mean primary score, and per-task mean loss."""
    device = torch.device(device)
    model.eval()
    meters = {t.name: t.new_meter() for t in tasks}
    loss_sums = torch.zeros(len(tasks), dtype=torch.float64)
    count = 0
    for batch in make_loader(dataset, batch_size, shuffle=False, pin=device.type == "cuda"):
        if batch is None:  # every sample of the batch was skipped as bad
            continue
        batch = to_device(batch, device)
        outputs = model(batch["image"])
        n = len(batch["image"])
        for k, task in enumerate(tasks):
            target = batch["targets"][task.name]
            meters[task.name].update(outputs[task.name], target)
            loss_sums[k] += task.loss(outputs[task.name].float(), target).sum().item()
        count += n
    per_task = {name: meter.compute() for name, meter in meters.items()}
    return {
        "tasks": per_task,
        "mean_score": mean_primary(per_task, list(tasks)),
        "loss": {t.name: loss_sums[k].item() / max(count, 1) for k, t in enumerate(tasks)},
    }


def flatten_metrics(prefix: str, evaluation: dict[str, Any]) -> dict[str, float]:
    """{'<prefix>/<task>/<metric>': v, '<prefix>/mean_score': v} for loggers and Tune."""
    flat = {f"{prefix}/mean_score": evaluation["mean_score"]}
    for task, values in evaluation["tasks"].items():
        for metric, value in values.items():
            flat[f"{prefix}/{task}/{metric}"] = value
    return flat


def train_epoch(
    model: MultiTaskModel,
    batches: Iterable[dict[str, Any] | None],
    tasks: Sequence[TaskSpec],
    weighting: Weighting,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    defence: Callable[..., Tensor] | None = None,
    amp: bool = False,
    sync: GradientSync | None = None,
) -> Tensor:
    """One pass over ``batches``; returns the per-task mean training losses [K] (float64, CPU).

    The one training step of every runner (``fit``, Ray Train workers). With a multi-rank
    ``sync`` each rank passes its own shard; gradients, BatchNorm statistics and the epoch's losses
    are averaged over ranks, so the weighting's epoch hook sees the same values everywhere."""
    sync = sync or GradientSync()
    model.train()
    epoch_losses = torch.zeros(len(tasks), dtype=torch.float64)
    count = 0
    for batch in batches:
        if batch is None:
            continue
        batch = to_device(batch, device)
        if defence is not None:
            batch["image"] = defence(batch["image"], batch, model, tasks)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = model(batch["image"])
        losses = task_losses(outputs, batch, tasks)
        optimizer.zero_grad(set_to_none=True)
        backward_with_weighting(model, losses, weighting, sync)
        optimizer.step()
        epoch_losses += losses.detach().double().cpu()
        count += 1
    mean_losses = epoch_losses / max(count, 1)
    sync.mean_(mean_losses)
    sync.mean_buffers_(model)
    weighting.on_epoch_end(mean_losses)
    return mean_losses


def loss_row(mean_losses: Tensor, tasks: Sequence[TaskSpec]) -> dict[str, float]:
    """{'train/loss': Σ_k L_k, 'train/loss/<task>': L_k} for a per-task loss vector."""
    row = {"train/loss": float(mean_losses.sum())}
    row.update({f"train/loss/{t.name}": float(mean_losses[k]) for k, t in enumerate(tasks)})
    return row


@dataclass
class FitResult:
    """What ``fit`` returns: the trained model, per-epoch history and the final test evaluation."""

    model: nn.Module
    history: list[dict[str, float]]
    test: dict[str, Any]
    seconds: float


def fit(
    model: MultiTaskModel,
    train: Dataset,
    test: Dataset | None,
    tasks: Sequence[TaskSpec],
    config: TrainConfig,
    callback: EpochCallback | None = None,
) -> FitResult:
    """Train ``model`` on ``train`` with ``config``; evaluate on ``test`` every ``eval_every`` epochs."""
    config.validate()
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    model.to(device)
    weighting = create_weighting(
        config.weighting, [t.name for t in tasks], seed=config.seed, **config.weighting_options
    ).to(device)
    params = list(model.parameters()) + list(weighting.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    milestones = sorted({max(1, round(m * config.epochs)) for m in config.lr_milestones})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=config.lr_gamma)
    loader = make_loader(
        train, config.batch_size, True, config.seed, config.num_workers, pin=device.type == "cuda"
    )
    amp = config.amp and device.type == "cuda"
    defence = create_defence(config.defence, **config.defence_options) if config.defence else None
    history: list[dict[str, float]] = []
    test_eval: dict[str, Any] = {}
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        mean_losses = train_epoch(
            model, loader, tasks, weighting, optimizer, device, defence=defence, amp=amp
        )
        scheduler.step()
        row: dict[str, float] = {"epoch": epoch, "seconds": time.perf_counter() - start}
        row.update(loss_row(mean_losses, tasks))
        last = epoch == config.epochs
        if test is not None and (last or (config.eval_every and epoch % config.eval_every == 0)):
            test_eval = evaluate(model, test, tasks, max(config.batch_size, 256), device)
            row.update(flatten_metrics("test", test_eval))
        history.append(row)
        if callback is not None:
            callback(epoch, row)
    return FitResult(model, history, test_eval, time.perf_counter() - start)


def fit_stl(
    make_model: Callable[[list[TaskSpec]], MultiTaskModel],
    train: Dataset,
    test: Dataset | None,
    tasks: Sequence[TaskSpec],
    config: TrainConfig,
    callback: EpochCallback | None = None,
) -> FitResult:
    """Single-task learning: one model per task, trained with the same recipe; metrics merged."""
    models = nn.ModuleDict()
    merged: dict[str, dict[str, float]] = {}
    history: list[dict[str, float]] = [{"epoch": e} for e in range(1, config.epochs + 1)]
    start = time.perf_counter()
    stl_config = replace(config, weighting="ls", weighting_options={})
    for task in tasks:
        result = fit(make_model([task]), train, test, [task], stl_config)
        models[task.name] = result.model
        for row, merged_row in zip(result.history, history, strict=True):
            merged_row.update(
                {
                    k: v
                    for k, v in row.items()
                    if k not in ("epoch", "seconds", "train/loss", "test/mean_score")
                }
            )
        if result.test:
            merged.update(result.test["tasks"])
    test_eval = {"tasks": merged, "mean_score": mean_primary(merged, list(tasks))} if merged else {}
    for row in history:
        row["seconds"] = time.perf_counter() - start
        if any(key.startswith("test/") for key in row):
            per_task = {
                t.name: {t.primary_metric: row.get(f"test/{t.name}/{t.primary_metric}", math.nan)}
                for t in tasks
            }
            row["test/mean_score"] = mean_primary(per_task, list(tasks))
        if callback is not None:
            callback(int(row["epoch"]), row)
    return FitResult(models, history, test_eval, time.perf_counter() - start)


def train_and_evaluate(
    mode: str,
    make_model: Callable[[list[TaskSpec]], MultiTaskModel],
    train: Dataset,
    test: Dataset | None,
    tasks: Sequence[TaskSpec],
    config: TrainConfig,
    callback: EpochCallback | None = None,
) -> FitResult:
    """``mode`` 'mtl': one model on all tasks (``fit``); 'stl': one model per task (``fit_stl``)."""
    if mode == "mtl":
        return fit(make_model(list(tasks)), train, test, tasks, config, callback)
    if mode == "stl":
        return fit_stl(make_model, train, test, tasks, config, callback)
    raise ConfigError(f"unknown mode {mode!r}; expected mtl or stl")
