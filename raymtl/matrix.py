"""``python -m raymtl.matrix``: the victim matrix. For one (protected) training set, train every
combination of backbones × weighting strategies × {MTL, STL} × defences and evaluate each on the
CLEAN test set; write matrix.csv, matrix.md and TensorBoard scalars. Cells run one after another
here; the Ray layer can run each cell as a trial.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from raymtl.cli import (
    OneLineArgumentParser,
    add_data_arguments,
    add_training_arguments,
    check_names,
    data_options,
    run_main,
    train_config,
)
from raymtl.data import build_dataset
from raymtl.data.base import materialise
from raymtl.defences import DEFENCES
from raymtl.engine import TrainConfig, train_and_evaluate
from raymtl.errors import ConfigError
from raymtl.models import BACKBONES, create_model
from raymtl.protect.store import PerturbationStore, protect_split
from raymtl.rundir import RunDir
from raymtl.tasks import TaskSpec
from raymtl.weighting import WEIGHTINGS

PROG = "python -m raymtl.matrix"
NO_DEFENCE = "none"


@dataclass(frozen=True)
class Cell:
    """One victim configuration of the matrix."""

    backbone: str
    weighting: str  # '-' for STL (one model per task: no task weighting)
    mode: str
    defence: str

    @property
    def name(self) -> str:
        """A readable, unique name (also the TensorBoard tag prefix)."""
        return f"{self.backbone}/{self.mode}/{self.weighting}/{self.defence}"


def matrix_cells(
    backbones: Sequence[str],
    weightings: Sequence[str],
    modes: Sequence[str],
    defences: Sequence[str],
) -> list[Cell]:
    """Every combination, with STL cells once per (backbone, defence): STL has no weighting."""
    for name in backbones:
        BACKBONES.get(name)
    for name in weightings:
        WEIGHTINGS.get(name)
    for name in defences:
        if name != NO_DEFENCE:
            DEFENCES.get(name)
    for mode in modes:
        if mode not in ("mtl", "stl"):
            raise ConfigError(f"unknown mode {mode!r}; expected mtl or stl")
    cells: list[Cell] = []
    for backbone, mode, defence in itertools.product(backbones, modes, defences):
        for weighting in weightings if mode == "mtl" else ["-"]:
            cell = Cell(backbone, weighting, mode, defence)
            if cell not in cells:
                cells.append(cell)
    return cells


def mean_balanced_accuracy(per_task: dict[str, dict[str, float]]) -> float | None:
    """Mean balanced accuracy over the classification tasks (None when there are none)."""
    values = [m["balanced_accuracy"] for m in per_task.values() if "balanced_accuracy" in m]
    return sum(values) / len(values) if values else None


def run_matrix(
    cells: Sequence[Cell],
    datasets: dict[str, Dataset],
    test: Dataset,
    tasks: Sequence[TaskSpec],
    make_model: Callable[[str, list[TaskSpec]], Any],
    base: TrainConfig,
    run: RunDir | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train and evaluate every cell on every named training set (e.g. protected, clean)."""
    rows = []
    jobs = list(itertools.product(cells, datasets.items()))
    for cell, (data_name, train) in tqdm(jobs, desc="victim matrix", disable=not progress):
        config = replace(
            base,
            weighting=cell.weighting if cell.mode == "mtl" else "ls",
            defence=None if cell.defence == NO_DEFENCE else cell.defence,
            defence_options={},  # each defence at its defaults (JPEG 10, 2 bits, PGD 8/255)
        )
        result = train_and_evaluate(
            cell.mode,
            lambda ts, b=cell.backbone: make_model(b, ts),
            train,
            test,
            tasks,
            config,
        )
        per_task = result.test["tasks"]
        row: dict[str, Any] = {
            "backbone": cell.backbone,
            "mode": cell.mode,
            "weighting": cell.weighting,
            "defence": cell.defence,
            "data": data_name,
            "mean_score": round(result.test["mean_score"], 4),
        }
        balanced = mean_balanced_accuracy(per_task)
        if balanced is not None:
            row["mean_balanced_accuracy"] = round(balanced, 4)
        row.update({t.name: round(per_task[t.name][t.primary_metric], 4) for t in tasks})
        row["seconds"] = round(result.seconds, 1)
        rows.append(row)
        if run is not None:
            scalars = {f"{cell.name}/{data_name}/mean_score": row["mean_score"]}
            scalars.update({f"{cell.name}/{data_name}/{t.name}": row[t.name] for t in tasks})
            run.log_metrics(len(rows), scalars)
        if progress:
            tqdm.write(
                f"{cell.name} [{data_name}]: mean score {row['mean_score']:.4f} ({row['seconds']:.0f}s)"
            )
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV (columns: the union of the rows' keys, in first-seen order)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """One line per cell: mean scores per training set side by side (and the drop from clean)."""
    data_names = list(dict.fromkeys(r["data"] for r in rows))
    by_cell: dict[tuple, dict[str, float]] = {}
    for row in rows:
        key = (row["backbone"], row["mode"], row["weighting"], row["defence"])
        by_cell.setdefault(key, {})[row["data"]] = row["mean_score"]
    compare = "clean" in data_names and len(data_names) > 1
    header = ["backbone", "mode", "weighting", "defence"] + [
        f"mean score ({d})" for d in data_names
    ]
    header += ["drop from clean"] if compare else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, scores in by_cell.items():
        values = [f"{scores[d]:.4f}" if d in scores else "" for d in data_names]
        if compare:
            other = next(d for d in data_names if d != "clean")
            drop = scores.get("clean", float("nan")) - scores.get(other, float("nan"))
            values.append(f"{drop:+.4f}")
        lines.append("| " + " | ".join([*key, *values]) + " |")
    return "\n".join(lines) + "\n"


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = OneLineArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument(
        "--store",
        default=None,
        help="perturbation store (python -m raymtl.protect); without it: the clean data set",
    )
    parser.add_argument(
        "--with-clean",
        action="store_true",
        help="also train every cell on the clean training set and show the drop",
    )
    parser.add_argument("--backbones", default="small_cnn", help="comma-separated backbones")
    parser.add_argument("--weightings", default="ls", help="comma-separated weighting strategies")
    parser.add_argument("--modes", default="mtl", help="comma-separated: mtl, stl")
    parser.add_argument(
        "--defences",
        default=NO_DEFENCE,
        help=f"comma-separated: {NO_DEFENCE}, {', '.join(DEFENCES.names())}",
    )
    add_data_arguments(parser)
    add_training_arguments(parser, "matrix")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, check every name before any training, run the matrix, write its tables."""
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)  # models built before training start from the same weights
    if args.defence is not None or args.defence_option:
        raise ConfigError("the matrix takes its defences from --defences (each at its defaults)")
    cells = matrix_cells(
        _names(args.backbones), _names(args.weightings), _names(args.modes), _names(args.defences)
    )
    config = train_config(args)
    if args.store is not None:
        store = PerturbationStore(args.store)
        meta = store.metadata
        options = dict(meta.get("dataset_options", {}))
        bundle = build_dataset(meta["dataset"], options.pop("root", None), **options)
        datasets = {"protected": protect_split(materialise(bundle.train), store)}
        if args.with_clean:
            datasets["clean"] = bundle.train
    else:
        check_names(args.dataset)
        bundle = build_dataset(args.dataset, args.data_root, **data_options(args))
        datasets = {"clean": bundle.train}
    run = RunDir.create(args.run_dir, "matrix")
    run.write_config(
        {
            "store": args.store,
            "dataset": {"name": bundle.name, **bundle.options},
            "cells": [c.name for c in cells],
            "train": config.to_dict(),
        }
    )

    def make(backbone: str, tasks: list[TaskSpec]) -> Any:
        return create_model(backbone, tasks, bundle.in_channels, bundle.image_size)

    rows = run_matrix(cells, datasets, bundle.test, bundle.tasks, make, config, run)
    run.write_text("matrix.csv", to_csv(rows))
    table = to_markdown(rows)
    run.write_text("matrix.md", table)
    run.close()
    print(table, end="")
    print(f"wrote {run.path / 'matrix.csv'} and matrix.md ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
