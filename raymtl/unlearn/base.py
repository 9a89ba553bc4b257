"""The unlearning method registry and what every method shares.

A method has one signature: ``method(original, request, data, **options) -> UnlearnResult``. It
returns a new model (the original is never modified) and a log with its cost: wall time and the
number of per-sample forward+backward passes, comparable with retraining's.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raymtl.data.base import MultiTaskArrays
from raymtl.engine import TrainConfig, make_loader, resolve_device, to_device
from raymtl.errors import ConfigError
from raymtl.models.mtl import MultiTaskModel
from raymtl.registry import Registry
from raymtl.tasks import IGNORE_INDEX, TaskSpec
from raymtl.unlearn.request import DeletionRequest, MaskedSplit, retain_split

FORGET_OBJECTIVES = ("bounded", "ascent", "uninformed")


@dataclass
class UnlearnData:
    """What a method may use besides the model and the request."""

    train: MultiTaskArrays
    tasks: list[TaskSpec]
    make_model: Callable[[list[TaskSpec]], MultiTaskModel]
    train_config: TrainConfig  # the original model's recipe (retraining repeats it)
    reference_losses: dict[str, float]  # the original model's mean test loss per task
    seed: int = 0

    @property
    def device(self) -> torch.device:
        """Where methods run (the training recipe's device)."""
        return resolve_device(self.train_config.device)

    def mean_targets(self) -> dict[str, Tensor]:
        """Per dense regression task, the training set's mean target map (an uninformed output)."""
        out = {}
        for task in self.tasks:
            if task.kind in ("depth", "normals"):
                out[task.name] = self.train.targets[task.name].float().mean(0)
        return out


@dataclass
class UnlearnResult:
    """An unlearned model and what it cost."""

    model: MultiTaskModel
    log: dict[str, Any] = field(default_factory=dict)


UnlearnFn = Callable[..., UnlearnResult]
UNLEARN_METHODS: Registry[UnlearnFn] = Registry("unlearning method")


def run_method(
    name: str,
    original: MultiTaskModel,
    request: DeletionRequest,
    data: UnlearnData,
    options: dict[str, Any] | None = None,
) -> UnlearnResult:
    """Look up ``name``, check its options, run it, and add the wall time to its log."""
    method = UNLEARN_METHODS.get(name)
    options = dict(options or {})
    accepted = [
        p for p in inspect.signature(method).parameters if p not in ("original", "request", "data")
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"unlearning method {name}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
    defaults = default_options(name)
    for key, value in options.items():
        expected = type(defaults[key])
        numeric = (
            expected in (int, float)
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        )
        if not (isinstance(value, expected) or (expected is float and numeric)):
            raise ConfigError(
                f"unlearning method {name}: option {key} must be {expected.__name__}, got {value!r}"
            )
    torch.manual_seed(data.seed)
    start = time.perf_counter()
    result = method(original, request, data, **options)
    result.log.setdefault("sample_passes", 0)
    result.log["seconds"] = time.perf_counter() - start
    result.log["options"] = {**default_options(name), **options}
    return result


def default_options(name: str) -> dict[str, Any]:
    """A method's options with their default values."""
    signature = inspect.signature(UNLEARN_METHODS.get(name))
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.default is not inspect.Parameter.empty
    }


def clone_for_unlearning(original: MultiTaskModel, device: torch.device) -> MultiTaskModel:
    """A copy of the original on ``device`` in eval mode: BatchNorm statistics stay frozen, so
    forget data never enters them and per-sample gradients stay per-sample."""
    model = copy.deepcopy(original).to(device)
    model.eval()
    return model


def forget_split(train: MultiTaskArrays, request: DeletionRequest) -> MaskedSplit:
    """The instances that lose a label, with masks marking which of their pairs are withdrawn."""
    rows = torch.nonzero(torch.isin(train.ids, torch.from_numpy(request.forget_ids))).flatten()
    subset = train.subset(rows, split="forget")
    masks = {t: request.withdrawn(subset.ids, t).float() for t in request.task_names}
    return MaskedSplit(subset, masks)


def endless(dataset: Any, batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
    """Shuffled batches forever (a new order each pass)."""
    epoch = 0
    while True:
        for batch in make_loader(dataset, batch_size, True, seed + epoch):
            if batch is not None:
                yield batch
        epoch += 1


def retain_batches(
    train: MultiTaskArrays, request: DeletionRequest, batch_size: int, seed: int
) -> Iterator[dict[str, Any]]:
    """Endless retain batches; partial requests carry masks that drop the withdrawn pairs."""
    return endless(retain_split(train, request), batch_size, seed)


def masked_mean(per_sample: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of a per-sample loss over the samples whose mask is 1 (all when mask is None)."""
    if mask is None:
        return per_sample.mean()
    mask = mask.to(per_sample)
    return (per_sample * mask).sum() / mask.sum().clamp_min(1.0)


def retain_loss(outputs: dict[str, Tensor], batch: dict[str, Any], tasks: list[TaskSpec]) -> Tensor:
    """Sum over tasks of each task's mean loss on its retained pairs."""
    masks = batch.get("masks") or {}
    return sum(
        masked_mean(t.loss(outputs[t.name].float(), batch["targets"][t.name]), masks.get(t.name))
        for t in tasks
    )


def uninformed_loss(
    task: TaskSpec, output: Tensor, target: Tensor, mean_target: Tensor | None
) -> Tensor:
    """Per-sample distance to an uninformed prediction: the uniform class distribution for class
    tasks, the training set's mean map for regression tasks."""
    output = output.float()
    if task.kind == "binary":
        return F.binary_cross_entropy_with_logits(
            output.reshape(len(output)),
            torch.full((len(output),), 0.5, device=output.device),
            reduction="none",
        )
    if task.kind == "multiclass":
        return -F.log_softmax(output, 1).mean(1)
    if task.kind == "segmentation":
        pixel = -F.log_softmax(output, 1).mean(1)
        valid = (target != IGNORE_INDEX).float()
        return (pixel * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1.0)
    assert mean_target is not None
    return task.loss(output, mean_target.to(output.device).expand_as(target))


def forget_objective(
    outputs: dict[str, Tensor],
    batch: dict[str, Any],
    tasks: list[TaskSpec],
    data: UnlearnData,
    kind: str,
    mean_targets: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Per target task, a scalar to MINIMISE that makes the model forget that task's withdrawn
    pairs in ``batch``: ``ascent`` = −loss (unbounded), ``bounded`` = −min(loss, the original
    model's test loss) (no push once forget data looks like unseen data), ``uninformed`` = the
    distance to an uninformed prediction. Tasks without a withdrawn pair in the batch are left out."""
    if kind not in FORGET_OBJECTIVES:
        raise ConfigError(
            f"forget objective must be one of {', '.join(FORGET_OBJECTIVES)}, got {kind!r}"
        )
    masks = batch["masks"]
    out = {}
    for task in tasks:
        mask = masks[task.name]
        if float(mask.sum()) == 0:
            continue
        output, target = outputs[task.name], batch["targets"][task.name]
        if kind == "uninformed":
            per_sample = uninformed_loss(task, output, target, (mean_targets or {}).get(task.name))
            out[task.name] = masked_mean(per_sample, mask)
            continue
        loss = masked_mean(task.loss(output.float(), target), mask)
        if kind == "bounded":
            loss = torch.minimum(loss, loss.new_tensor(data.reference_losses[task.name]))
        out[task.name] = -loss
    return out


def make_optimizer(model: nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    """'adam' (default for every gradient-based method, as in fine-tuning) or plain 'sgd'."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    raise ConfigError(f"optimizer must be adam or sgd, got {name!r}")


def apply_direction(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    direction: dict[str, Tensor],
    max_norm: float,
) -> None:
    """One optimizer step along the descent direction ``direction`` (by parameter name), first
    rescaled to at most ``max_norm`` (0: no clipping). Parameters absent from it get no gradient."""
    scale = 1.0
    if max_norm > 0 and direction:
        norm = torch.sqrt(sum((d.float() ** 2).sum() for d in direction.values()))
        scale = min(1.0, max_norm / (float(norm) + 1e-12))
    for name, param in model.named_parameters():
        param.grad = (direction[name] * scale).to(param.dtype) if name in direction else None
    optimizer.step()


def batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch on ``device`` (masks included)."""
    moved = to_device({k: v for k, v in batch.items() if k != "masks"}, device)
    if "masks" in batch:
        moved["masks"] = {k: v.to(device) for k, v in batch["masks"].items()}
    return moved


def forget_retain_descent(
    original: MultiTaskModel,
    request: DeletionRequest,
    data: UnlearnData,
    *,
    steps: int,
    lr: float,
    alpha: float,
    objective: str,
    forget_batch: int,
    retain_batch: int,
    max_norm: float,
    optimizer: str = "adam",
) -> UnlearnResult:
    """Descent on (1−α)·forget objective + α·retain loss: gradient ascent (α = 0) and NegGrad+."""
    check_common(
        steps=steps, lr=lr, alpha=alpha, forget_batch=forget_batch, retain_batch=retain_batch
    )
    device = data.device
    model = clone_for_unlearning(original, device)
    params = dict(model.named_parameters())
    step = make_optimizer(model, optimizer, lr)
    forget = endless(forget_split(data.train, request), forget_batch, data.seed)
    retain = retain_batches(data.train, request, retain_batch, data.seed) if alpha > 0 else None
    mean_targets = data.mean_targets()
    passes = 0
    for _ in range(steps):
        batch = batch_to(next(forget), device)
        terms = forget_objective(
            model(batch["image"]), batch, data.tasks, data, objective, mean_targets
        )
        loss = (1 - alpha) * sum(terms.values()) if terms else torch.zeros((), device=device)
        passes += len(batch["image"])
        if retain is not None:
            kept = batch_to(next(retain), device)
            loss = loss + alpha * retain_loss(model(kept["image"]), kept, data.tasks)
            passes += len(kept["image"])
        if not loss.requires_grad:
            continue
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        direction = {n: g for n, g in zip(params, grads, strict=True) if g is not None}
        apply_direction(model, step, direction, max_norm)
    return UnlearnResult(model, {"steps": steps, "sample_passes": passes})


def check_common(**values: float) -> None:
    """ConfigError naming the first out-of-range common option."""
    rules = {
        "steps": lambda v: v >= 1,
        "lr": lambda v: v > 0,
        "alpha": lambda v: 0 <= v <= 1,
        "forget_batch": lambda v: v >= 1,
        "retain_batch": lambda v: v >= 1,
        "epochs": lambda v: v >= 1,
    }
    for name, value in values.items():
        if not rules[name](value):
            raise ConfigError(f"unlearning option {name}={value!r} is out of range")
