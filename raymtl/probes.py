"""Reference baselines on raw inputs: a linear classifier on pixels shows how hard a data set is."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from raymtl.data.base import MultiTaskArrays
from raymtl.engine import evaluate
from raymtl.tasks import TaskSpec


class LinearProbe(nn.Module):
    """One linear map from standardised, flattened pixels to every task's logits."""

    def __init__(
        self, tasks: Sequence[TaskSpec], num_inputs: int, mean: torch.Tensor, std: torch.Tensor
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.heads = nn.ModuleDict({t.name: nn.Linear(num_inputs, t.out_channels) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = (x.flatten(1) - self.mean) / self.std
        return {name: head(z) for name, head in self.heads.items()}


def fit_linear_probe(
    train: MultiTaskArrays,
    test: MultiTaskArrays,
    tasks: Sequence[TaskSpec],
    epochs: int = 30,
    lr: float = 1e-3,
    weight_decay: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Train per-task logistic/softmax regression on raw pixels (Adam, L2); return test metrics."""
    if any(t.dense for t in tasks):
        raise ValueError("the linear probe is for classification tasks")
    torch.manual_seed(seed)
    x = train.images.flatten(1).float() / 255.0
    mean, std = x.mean(0), x.std(0).clamp_min(1e-3)
    model = LinearProbe(tasks, x.shape[1], mean, std)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    targets = train.targets
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            outputs = model(x[index].view(len(index), *train.images.shape[1:]))
            loss = sum(t.loss(outputs[t.name], targets[t.name][index]).mean() for t in tasks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return evaluate(model, test, tasks)
