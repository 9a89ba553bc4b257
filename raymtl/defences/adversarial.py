"""PGD adversarial training (Madry et al. 2018): train on the worst case within an L-inf ball
(ε 8/255, step 2/255, 10 steps by default), which is known to blunt unlearnable examples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from raymtl.defences.base import DEFENCES, Defence
from raymtl.errors import ConfigError
from raymtl.tasks import TaskSpec


def fraction(value: float | str) -> float:
    """A number, or a string such as '8/255' (command-line options arrive as strings)."""
    if isinstance(value, str) and "/" in value:
        numerator, denominator = value.split("/", 1)
        return float(numerator) / float(denominator)
    return float(value)


@DEFENCES.register("pgd_at")
class PGDAdversarialTraining(Defence):
    """Replace each batch by PGD adversarial examples of the current model (random start)."""

    def __init__(
        self, epsilon: float | str = 8 / 255, step: float | str = 2 / 255, steps: int = 10
    ) -> None:
        epsilon, step = fraction(epsilon), fraction(step)
        if not 0 < epsilon <= 1 or not step > 0 or int(steps) < 1:
            raise ConfigError(
                f"defence pgd_at: need 0 < epsilon <= 1, step > 0, steps >= 1 (got {epsilon}, {step}, {steps})"
            )
        self.epsilon, self.step, self.steps = float(epsilon), float(step), int(steps)

    def __call__(
        self, images: Tensor, batch: dict[str, Any], model: nn.Module, tasks: Sequence[TaskSpec]
    ) -> Tensor:
        from raymtl.engine import task_losses  # the engine imports defences: import on use

        was_training = model.training
        model.eval()  # attack with frozen BatchNorm statistics
        clean = images.detach()
        delta = torch.empty_like(clean).uniform_(-self.epsilon, self.epsilon)
        delta = (clean + delta).clamp(0, 1) - clean
        for _ in range(self.steps):
            delta.requires_grad_(True)
            loss = task_losses(model(clean + delta), batch, tasks).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + self.step * grad.sign()).clamp(-self.epsilon, self.epsilon)
            delta = (clean + delta).clamp(0, 1) - clean
        model.train(was_training)
        return (clean + delta).detach()
