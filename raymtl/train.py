"""``python -m raymtl.train``: train and evaluate one multi-task (or STL) model, Ray-free."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from raymtl.cli import (
    OneLineArgumentParser,
    add_data_arguments,
    add_model_arguments,
    check_names,
    data_options,
    format_task_table,
    nonnegative_float,
    positive_float,
    positive_int,
    run_main,
)
from raymtl.data import build_dataset
from raymtl.engine import TrainConfig, fit, fit_stl
from raymtl.errors import ConfigError
from raymtl.models import create_model
from raymtl.rundir import RunDir

PROG = "python -m raymtl.train"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = OneLineArgumentParser(prog=PROG, description=__doc__)
    add_data_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--weighting", default="ls", help="task weighting strategy (default: ls)")
    parser.add_argument(
        "--mode",
        choices=["mtl", "stl"],
        default="mtl",
        help="one multi-task model, or one model per task",
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=8, help="training epochs (default: 8)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=128, help="batch size (default: 128)"
    )
    parser.add_argument(
        "--lr", type=positive_float, default=2e-3, help="Adam learning rate (default: 2e-3)"
    )
    parser.add_argument(
        "--weight-decay", type=nonnegative_float, default=0.0, help="Adam weight decay (default: 0)"
    )
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda, cuda:1 ..."
    )
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    parser.add_argument(
        "--workers", type=int, default=0, help="DataLoader worker processes (default: 0)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for data and training (default: 0)"
    )
    parser.add_argument(
        "--run-dir", default=None, help="output folder (default: ./runs/train-<timestamp>)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Train, evaluate on the clean test split, and save everything into the run directory."""
    args = build_parser().parse_args(argv)
    check_names(args.dataset, args.backbone, [args.weighting])
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        weighting=args.weighting,
        device=args.device,
        amp=args.amp,
        num_workers=args.workers,
        seed=args.seed,
    ).validate()
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

    if args.mode == "mtl":
        result = fit(
            make_model(bundle.tasks), bundle.train, bundle.test, bundle.tasks, config, report
        )
    else:
        result = fit_stl(make_model, bundle.train, bundle.test, bundle.tasks, config, report)
    run.write_json("metrics.json", {"test": result.test, "seconds": result.seconds})
    table = format_task_table(result.test["tasks"], bundle.tasks)
    run.write_text("test_metrics.md", table + "\n")
    run.close()
    print(table)
    print(f"mean score (mean of each task's primary metric): {result.test['mean_score']:.4f}")
    print(f"run directory: {run.path}")
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
