"""Is the embedded synthetic set learnable but not trivial?

Trains the small CNN multi-task model (Ray-free engine) and a linear classifier on raw pixels on
the default synthetic set and prints both mean balanced accuracies on the test split, the gap, and
the CNN's wall time. Usage: python benchmarks/synthetic_difficulty.py [--epochs 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from raymtl.data import build_dataset
from raymtl.engine import TrainConfig, fit
from raymtl.models import create_model
from raymtl.probes import fit_linear_probe


def mean_balanced_accuracy(per_task: dict[str, dict[str, float]]) -> float:
    """Mean over tasks of balanced accuracy."""
    values = [m["balanced_accuracy"] for m in per_task.values()]
    return sum(values) / len(values)


def main() -> None:
    """Run both models and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    bundle = build_dataset("synthetic", seed=args.seed)
    data_seconds = time.perf_counter() - start
    print(
        f"data: synthetic, {len(bundle.train)} train / {len(bundle.test)} test, {len(bundle.tasks)} tasks, generated in {data_seconds:.1f}s"
    )

    model = create_model("small_cnn", bundle.tasks, bundle.in_channels, bundle.image_size)
    config = TrainConfig(epochs=args.epochs, seed=args.seed)
    config.eval_every = 0  # evaluate once, at the end
    cnn = fit(model, bundle.train, bundle.test, bundle.tasks, config)
    cnn_total = time.perf_counter() - start

    start = time.perf_counter()
    linear = fit_linear_probe(bundle.train, bundle.test, bundle.tasks, seed=args.seed)
    linear_seconds = time.perf_counter() - start

    cnn_score = mean_balanced_accuracy(cnn.test["tasks"])
    linear_score = mean_balanced_accuracy(linear["tasks"])
    print(f"{'task':<12}{'small CNN':>11}{'linear':>9}")
    for task in bundle.tasks:
        print(
            f"{task.name:<12}{cnn.test['tasks'][task.name]['balanced_accuracy']:>11.3f}{linear['tasks'][task.name]['balanced_accuracy']:>9.3f}"
        )
    print(
        f"small CNN (MTL, LS, {args.epochs} epochs, {args.threads} threads): mean balanced accuracy {cnn_score:.4f}; "
        f"training {cnn.seconds:.0f}s, data + training + evaluation {cnn_total:.0f}s"
    )
    print(
        f"linear classifier on raw pixels: mean balanced accuracy {linear_score:.4f} ({linear_seconds:.0f}s)"
    )
    print(f"gap: {100 * (cnn_score - linear_score):.1f} points")


if __name__ == "__main__":
    main()
