"""Ray Train overhead on victim training: images/s of the Ray-free engine's training step against
a TorchTrainer with 1 worker (same model, data, batch size, threads), and with 2 workers sharing
the machine's cores, measured side by side in one run.

Steady state: the first epoch of every runner is a warm-up and is not counted; evaluation is off.
Also printed: each TorchTrainer run's wall time from fit() to result (worker start included).
Target: TorchTrainer 1 worker >= 0.95x the engine.

Usage: python benchmarks/train_overhead.py [--n-train 4000] [--epochs 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from raymtl.data import build_dataset
from raymtl.distributed import GradientSync
from raymtl.engine import TrainConfig, train_epoch
from raymtl.models import create_model
from raymtl.scale.train import shard_batches
from raymtl.weighting import create_weighting


def engine_images_per_second(bundle, config: TrainConfig, threads: int) -> float:
    """The engine's training step in this process, on the same batches a 1-worker run sees."""
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    model = create_model("small_cnn", bundle.tasks, bundle.in_channels, bundle.image_size)
    weighting = create_weighting(config.weighting, [t.name for t in bundle.tasks])
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    sync = GradientSync()
    rates = []
    for epoch in range(1, config.epochs + 1):
        batches = list(shard_batches(bundle.train, config.batch_size, sync, config.seed, epoch))
        start = time.perf_counter()
        train_epoch(model, iter(batches), bundle.tasks, weighting, optimizer, torch.device("cpu"))
        rates.append(len(bundle.train) / (time.perf_counter() - start))
    return sum(rates[1:]) / len(rates[1:])


def train_images_per_second(bundle, config: TrainConfig, workers: int, cpus: float) -> tuple:
    """(steady-state images/s reported by the workers, wall seconds of fit())."""
    from raymtl.scale.train import WorkerSpec, train_victim

    history = []
    loop = {
        "data": {"train": bundle.train, "val": None, "test": None},
        "tasks": bundle.tasks,
        "backbone": "small_cnn",
        "in_channels": bundle.in_channels,
        "image_size": bundle.image_size,
        "train": config.to_dict(),
        "threads": cpus,
    }
    with tempfile.TemporaryDirectory() as storage:
        start = time.perf_counter()
        result = train_victim(loop, WorkerSpec(workers, cpus), f"overhead-{workers}", storage)
        wall = time.perf_counter() - start
        history = result.metrics_dataframe["train/images_per_second"].tolist()
    return sum(history[1:]) / len(history[1:]), wall


def main() -> None:
    """Measure the engine, then 1 and 2 TorchTrainer workers, and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    bundle = build_dataset("synthetic", n_train=args.n_train, n_test=16)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, eval_every=0)

    engine = engine_images_per_second(bundle, config, args.threads)
    import ray

    ray.init(num_cpus=args.threads, include_dashboard=False, logging_level="WARNING")
    try:
        one, one_wall = train_images_per_second(bundle, config, 1, float(args.threads))
        two, two_wall = train_images_per_second(bundle, config, 2, args.threads / 2)
    finally:
        ray.shutdown()
    print(f"\nvictim training, small CNN, {args.n_train} images, batch {args.batch_size}, "
          f"{args.threads} threads, epochs 2..{args.epochs} (epoch 1 is warm-up)")  # fmt: skip
    print("| runner | images/s | vs engine | wall time of fit() |")
    print("|---|---|---|---|")
    print(f"| Ray-free engine (train_epoch) | {engine:.0f} | 1.00x | - |")
    print(f"| TorchTrainer, 1 worker x {args.threads} CPU | {one:.0f} | {one / engine:.2f}x | {one_wall:.1f} s |")  # fmt: skip
    print(f"| TorchTrainer, 2 workers x {args.threads / 2:g} CPU | {two:.0f} | {two / engine:.2f}x | {two_wall:.1f} s |")  # fmt: skip
    verdict = "met" if one / engine >= 0.95 else "NOT met"
    print(f"\nTarget TorchTrainer 1 worker >= 0.95x the engine: {one / engine:.2f}x ({verdict})")


if __name__ == "__main__":
    main()
