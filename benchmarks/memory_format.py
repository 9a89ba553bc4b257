"""Channels-last against the default (contiguous NCHW) layout: seconds per training step of the
multi-task model (small CNN, ResNet-18) and of the MTL-UE generator, timed side by side in one
run on the embedded data set. raymtl builds its models channels-last (``create_model``,
``MTLUEGenerator``); this script shows what that buys on the machine at hand.

Usage: python benchmarks/memory_format.py [--threads 2] [--batch-size 128] [--steps 10]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from raymtl.data import build_dataset
from raymtl.models import create_model
from raymtl.protect.bases import mean_output_loss
from raymtl.protect.generator import MTLUEGenerator
from raymtl.tasks import TaskSpec


def seconds_per_step(step: Callable[[], None], steps: int) -> float:
    """Mean wall time of ``step`` after two warm-up calls."""
    step()
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def training_step(
    model: nn.Module, loss: Callable[[nn.Module], torch.Tensor]
) -> Callable[[], None]:
    """One Adam step of ``model`` on ``loss``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad()
        loss(model).backward()
        optimizer.step()

    return step


def add_timing_arguments(parser: argparse.ArgumentParser, steps: int = 10) -> None:
    """Threads, batch size, image size and timed steps (shared with generator_mix.py)."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=steps)


def timing_batch(args: argparse.Namespace) -> tuple[Tensor, dict[str, Tensor], list[TaskSpec]]:
    """One synthetic batch (images, targets, tasks) at the options' size; sets the threads."""
    torch.set_num_threads(args.threads)
    bundle = build_dataset(
        "synthetic", n_train=args.batch_size, n_test=8, image_size=args.image_size, seed=0
    )
    batch = bundle.train.__getitems__(list(range(args.batch_size)))
    return batch["image"], batch["targets"], bundle.tasks


def main(argv: list[str] | None = None) -> list[dict]:
    """Time each model in both layouts and print seconds per step and the speed-up."""
    parser = argparse.ArgumentParser(description=__doc__)
    add_timing_arguments(parser)
    parser.add_argument("--models", default="small_cnn,resnet18,generator")
    args = parser.parse_args(argv)
    images, targets, tasks = timing_batch(args)

    def build(name: str) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
        torch.manual_seed(0)
        if name == "generator":
            generator = MTLUEGenerator(tasks, 3, args.image_size, 8 / 255, "sample", 16)
            return generator, lambda g: g(images, targets).square().mean()
        model = create_model(name, tasks, 3, args.image_size)
        return model, lambda m: mean_output_loss(m(images), targets, tasks)

    rows = []
    for name in args.models.split(","):
        timings = {}
        for layout in (torch.contiguous_format, torch.channels_last):
            model, loss = build(name)
            model.to(memory_format=layout)
            timings[str(layout)] = seconds_per_step(training_step(model, loss), args.steps)
        nchw, nhwc = timings["torch.contiguous_format"], timings["torch.channels_last"]
        rows.append(
            {"model": name, "nchw_s": nchw, "channels_last_s": nhwc, "speedup": nchw / nhwc}
        )
        print(
            f"{name:<10} NCHW {nchw * 1000:7.1f} ms/step   channels-last {nhwc * 1000:7.1f} ms/step"
            f"   speed-up {nchw / nhwc:.2f}x  (batch {args.batch_size}, {args.image_size} px,"
            f" {args.threads} threads)",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
