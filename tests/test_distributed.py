"""Data-parallel training: 2 ranks on a split batch take the same step as 1 process on the whole
batch, for every task weighting strategy (the gradient-based ones all-reduce the task-gradient
matrix instead of relying on one all-reduce of a combined loss)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from raymtl.data import build_dataset
from raymtl.distributed import GradientSync
from raymtl.engine import train_epoch
from raymtl.models import create_model
from raymtl.weighting import WEIGHTINGS, create_weighting

METHODS = sorted(WEIGHTINGS.names())
EPOCHS = 2  # a second epoch exercises optimiser state and epoch-adaptive weights (DWA)


def _without_batchnorm(module: nn.Module) -> nn.Module:
    """BatchNorm uses per-rank batch statistics (as DDP does); drop it for an exact comparison."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.Identity())
        else:
            _without_batchnorm(child)
    return module


def _batches():
    bundle = build_dataset("synthetic", n_train=48, n_test=8, image_size=16, seed=3)
    whole = [bundle.train.__getitems__(list(range(s, s + 16))) for s in (0, 16, 32)]
    return bundle, whole


def _shard(batch, sync: GradientSync):
    out = {}
    for key, value in batch.items():
        if isinstance(value, dict):
            out[key] = {k: sync.shard(v) for k, v in value.items()}
        else:
            out[key] = sync.shard(value)
    return out


def _train(method: str, sync: GradientSync) -> dict[str, torch.Tensor]:
    bundle, whole = _batches()
    torch.manual_seed(0)
    model = _without_batchnorm(create_model("small_cnn", bundle.tasks, 3, 16, width=8))
    weighting = create_weighting(method, [t.name for t in bundle.tasks], seed=5)
    optimizer = torch.optim.Adam([*model.parameters(), *weighting.parameters()], lr=1e-2)
    sync.broadcast_(model)
    for _ in range(EPOCHS):
        batches = [_shard(b, sync) for b in whole]
        train_epoch(
            model, batches, bundle.tasks, weighting, optimizer, torch.device("cpu"), sync=sync
        )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.update(
        {
            f"weighting.{k}": v.detach().clone()
            for k, v in weighting.state_dict().items()
            if isinstance(v, torch.Tensor)
        }
    )
    return state


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sync = GradientSync.current()
        for method in METHODS:
            state = _train(method, sync)
            torch.save(state, os.path.join(out_dir, f"{method}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_states(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank_main, args=(2, str(folder / "init"), str(folder)), nprocs=2, join=True)
    return folder


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_on_a_split_batch_match_one_process_on_the_whole_batch(two_rank_states, method):
    single = _train(method, GradientSync())
    for rank in (0, 1):
        parallel = torch.load(two_rank_states / f"{method}-rank{rank}.pt")
        for name, value in single.items():
            assert torch.allclose(parallel[name], value, atol=2e-5, rtol=1e-4), (method, rank, name)
    torch.manual_seed(0)
    untrained = _without_batchnorm(create_model("small_cnn", _batches()[0].tasks, 3, 16, width=8))
    moved = any(
        not torch.allclose(value, single[name]) for name, value in untrained.state_dict().items()
    )
    assert moved  # the comparison is about a real update


def test_the_split_matters_without_synchronisation():
    """Control: ranks that do not average would each follow their own half batch."""
    sync = GradientSync(world_size=2, rank=0)
    sync.mean_ = lambda tensor: tensor  # type: ignore[method-assign]
    sync.mean_grads_ = lambda parameters: None  # type: ignore[method-assign]
    sync.mean_buffers_ = lambda module: None  # type: ignore[method-assign]
    sync.broadcast_ = lambda module: None  # type: ignore[method-assign]
    half = _train("pcgrad", sync)
    whole = _train("pcgrad", GradientSync())
    assert any(not torch.allclose(half[k], whole[k], atol=2e-5) for k in whole)
