"""``python -m raymtl.train``: train and evaluate one multi-task (or STL) model, Ray-free."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from raymtl.cli import (
    OneLineArgumentParser,
    add_data_arguments,
    add_model_arguments,
    add_training_arguments,
    check_names,
    data_options,
    run_main,
    train_config,
    write_test_results,
)
from raymtl.data import build_dataset
from raymtl.engine import train_and_evaluate
from raymtl.models import create_model
from raymtl.rundir import RunDir

PROG = "python -m raymtl.train"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = OneLineArgumentParser(prog=PROG, description=__doc__)
    add_data_arguments(parser)
    add_model_arguments(parser)
    add_training_arguments(parser, "train")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Train, evaluate on the clean test split, and save everything into the run directory."""
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)  # models built before training start from the same weights
    check_names(args.dataset, args.backbone)
    config = train_config(args)
    bundle = build_dataset(args.dataset, args.data_root, **data_options(args))
    run = RunDir.create(args.run_dir, "train")
    run.write_config(
        {
            "dataset": {"name": bundle.name, "root": args.data_root, **bundle.options},
            "tasks": [t.to_dict() for t in bundle.tasks],
            "backbone": args.backbone,
            "mode": args.mode,
            "train": config.to_dict(),
        }
    )

    def report(epoch: int, row: dict[str, float]) -> None:
        run.log_metrics(epoch, row)
        score = row.get("test/mean_score")
        shown = f"  test mean score {score:.4f}" if score is not None else ""
        print(
            f"epoch {epoch}/{config.epochs}  train loss {row.get('train/loss', float('nan')):.4f}{shown}  ({row['seconds']:.0f}s)",
            flush=True,
        )

    def make_model(tasks: list) -> object:
        return create_model(args.backbone, tasks, bundle.in_channels, bundle.image_size)

    result = train_and_evaluate(
        args.mode, make_model, bundle.train, bundle.test, bundle.tasks, config, report
    )
    write_test_results(run, result.test, bundle.tasks, result.seconds)
    print(f"mean score (mean of each task's primary metric): {result.test['mean_score']:.4f}")
    print(f"run directory: {run.path}")
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
