"""``python -m raymtl.victim``: train a fresh model on protected data, evaluate on the CLEAN test set."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from raymtl.cli import (
    OneLineArgumentParser,
    add_model_arguments,
    add_training_arguments,
    check_names,
    run_main,
    train_config,
    write_test_results,
)
from raymtl.data import build_dataset
from raymtl.data.base import DatasetBundle, materialise
from raymtl.data.files import EXPORT_MARKER, DataRoot, read_export_marker
from raymtl.engine import train_and_evaluate
from raymtl.errors import ConfigError
from raymtl.models import create_model
from raymtl.protect.store import PerturbationStore, protect_split
from raymtl.rundir import RunDir
from raymtl.tasks import TaskSpec, mean_primary

PROG = "python -m raymtl.victim"


def split_by_protection(
    test: dict, tasks: list[TaskSpec], protected: list[str] | None
) -> str | None:
    """Partial-task protection: add the mean score of the protected and of the unprotected tasks
    to ``test`` and return a line that says both (None when every task was protected)."""
    if not protected or set(protected) >= {t.name for t in tasks}:
        return None
    groups = {
        "protected": [t for t in tasks if t.name in protected],
        "unprotected": [t for t in tasks if t.name not in protected],
    }
    for group, members in groups.items():
        test[f"{group}_mean_score"] = mean_primary(test["tasks"], members)
    return (
        f"protected tasks ({len(groups['protected'])}): mean score {test['protected_mean_score']:.4f}; "
        f"unprotected tasks ({len(groups['unprotected'])}): {test['unprotected_mean_score']:.4f}"
    )


def read_export(folder: str) -> tuple[dict, DatasetBundle]:
    """An exported protected folder: its store's metadata and the data set read from it."""
    root = DataRoot(folder)
    marker = read_export_marker(root)
    if marker is None:
        raise ConfigError(
            f"{root.path(EXPORT_MARKER)}: missing file (not a folder written by python -m raymtl.protect.export)"
        )
    options = dict(marker.get("dataset_options", {}))
    options.pop("root", None)
    return marker.get("store_metadata", {}), build_dataset(marker["dataset"], folder, **options)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = OneLineArgumentParser(prog=PROG, description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", help="perturbation store written by python -m raymtl.protect")
    source.add_argument(
        "--exported",
        help="a protected data set written by python -m raymtl.protect.export (its own format)",
    )
    add_model_arguments(parser)
    add_training_arguments(parser, "victim")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild the store's data set, apply δ by sample id, train, evaluate on clean test data."""
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)  # models built before training start from the same weights
    check_names(backbone=args.backbone)
    config = train_config(args)
    if args.store is not None:
        store = PerturbationStore(args.store)
        meta = store.metadata
        options = dict(meta.get("dataset_options", {}))
        bundle = build_dataset(meta["dataset"], options.pop("root", None), **options)
        train = protect_split(materialise(bundle.train), store)
        if len(store.ids) != len(bundle.train):
            raise ConfigError(
                f"{args.store}: store holds {len(store.ids)} samples, the training split {len(bundle.train)}"
            )
    else:
        meta, bundle = read_export(args.exported)
        train = materialise(bundle.train)  # the export's pixels already carry δ
    run = RunDir.create(args.run_dir, "victim")
    run.write_config(
        {
            "store": str(args.store) if args.store else None,
            "exported": str(args.exported) if args.exported else None,
            "store_metadata": {k: v for k, v in meta.items() if k != "log"},
            "backbone": args.backbone,
            "mode": args.mode,
            "train": config.to_dict(),
        }
    )

    def make(tasks: list) -> object:
        return create_model(args.backbone, tasks, bundle.in_channels, bundle.image_size)

    result = train_and_evaluate(
        args.mode, make, train, bundle.test, bundle.tasks, config, run.log_metrics
    )
    split_note = split_by_protection(result.test, bundle.tasks, meta.get("protected_tasks"))
    write_test_results(run, result.test, bundle.tasks, result.seconds)
    if split_note:
        print(split_note)
    print(
        f"victim ({args.mode}) trained on protected data, mean score on the CLEAN test set: {result.test['mean_score']:.4f}"
    )
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
