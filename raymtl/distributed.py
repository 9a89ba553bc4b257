"""Data-parallel gradient averaging over ``torch.distributed`` (Ray-free; a no-op in one process).

raymtl does not wrap models in DDP: per-task gradient weighting needs the task-gradient matrix of
the whole global batch, which DDP's single all-reduce of a combined loss cannot give. Instead every
rank averages what it computed locally (gradients, the task-gradient matrix, losses) with one
all-reduce each and then applies the same aggregation, so every rank takes the same step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn


class GradientSync:
    """Averages tensors across the ranks of the default process group (no-op when world is 1)."""

    def __init__(self, world_size: int = 1, rank: int = 0) -> None:
        self.world_size, self.rank = world_size, rank

    @classmethod
    def current(cls) -> GradientSync:
        """The sync for the running process group, or a single-process no-op."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_world_size(), dist.get_rank())
        return cls()

    @property
    def active(self) -> bool:
        """True when there is more than one rank to talk to."""
        return self.world_size > 1

    def mean_(self, tensor: Tensor) -> Tensor:
        """Average ``tensor`` over ranks in place (and return it)."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(self.world_size)
        return tensor

    def mean_grads_(self, parameters: Iterable[nn.Parameter]) -> None:
        """Average the ``.grad`` of ``parameters`` over ranks with one flat all-reduce.
        A parameter without a gradient on this rank counts as a zero gradient."""
        if not self.active:
            return
        params = list(parameters)
        if not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        self.mean_(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n

    def mean_buffers_(self, module: nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running statistics) so ranks stay identical."""
        if not self.active:
            return
        for buffer in module.buffers():
            if buffer.is_floating_point():
                self.mean_(buffer.data)

    def broadcast_(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (the same start everywhere)."""
        if not self.active:
            return
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)

    def shard(self, items: Tensor) -> Tensor:
        """This rank's interleaved share of ``items`` (every rank gets a disjoint slice)."""
        return items[self.rank :: self.world_size]
