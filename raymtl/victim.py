"""``python -m raymtl.victim``: train a fresh model on protected data, evaluate on the CLEAN test set."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from raymtl.cli import (
    OneLineArgumentParser,
    add_model_arguments,
    format_task_table,
    positive_float,
    positive_int,
    run_main,
)
from raymtl.data import build_dataset
from raymtl.engine import TrainConfig, fit, fit_stl
from raymtl.errors import ConfigError
from raymtl.models import create_model
from raymtl.protect.store import PerturbationStore, protect_split
from raymtl.rundir import RunDir

PROG = "python -m raymtl.victim"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = OneLineArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument(
        "--store", required=True, help="perturbation store written by python -m raymtl.protect"
    )
    add_model_arguments(parser)
    parser.add_argument("--weighting", default="ls", help="task weighting strategy (default: ls)")
    parser.add_argument(
        "--mode", choices=["mtl", "stl"], default="mtl", help="MTL victim or STL victims"
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=8, help="training epochs (default: 8)"
    )
    parser.add_argument(
        "--lr", type=positive_float, default=2e-3, help="Adam learning rate (default: 2e-3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    parser.add_argument(
        "--run-dir", default=None, help="output folder (default: ./runs/victim-<timestamp>)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild the store's data set, apply δ by sample id, train, evaluate on clean test data."""
    args = build_parser().parse_args(argv)
    store = PerturbationStore(args.store)
    meta = store.metadata
    options = dict(meta.get("dataset_options", {}))
    bundle = build_dataset(meta["dataset"], options.pop("root", None), **options)
    train = protect_split(bundle.train, store)
    config = TrainConfig(
        epochs=args.epochs, lr=args.lr, weighting=args.weighting, seed=args.seed
    ).validate()
    if len(store.ids) != len(bundle.train):
        raise ConfigError(
            f"{args.store}: store holds {len(store.ids)} samples, the training split {len(bundle.train)}"
        )
    run = RunDir.create(args.run_dir, "victim")
    run.write_config(
        {
            "store": str(args.store),
            "store_metadata": {k: v for k, v in meta.items() if k != "log"},
            "backbone": args.backbone,
            "mode": args.mode,
            "train": config.to_dict(),
        }
    )

    def make(tasks: list) -> object:
        return create_model(args.backbone, tasks, bundle.in_channels, bundle.image_size)

    trainer = fit if args.mode == "mtl" else None
    result = (
        trainer(make(bundle.tasks), train, bundle.test, bundle.tasks, config, run.log_metrics)
        if trainer
        else fit_stl(make, train, bundle.test, bundle.tasks, config, run.log_metrics)
    )
    table = format_task_table(result.test["tasks"], bundle.tasks)
    run.write_json("metrics.json", {"test": result.test})
    run.write_text("test_metrics.md", table + "\n")
    run.close()
    print(table)
    print(
        f"victim ({args.mode}) trained on protected data, mean score on the CLEAN test set: {result.test['mean_score']:.4f}"
    )
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
