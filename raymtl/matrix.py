"""``python -m raymtl.matrix``: the victim matrix. For one (protected) training set, train every
combination of backbones × weighting strategies × {MTL, STL} × defences and evaluate each on the
CLEAN test set; write matrix.csv, matrix.md and TensorBoard scalars. Cells run one after another
here; with ``--ray`` each (cell, training set) becomes a Ray Tune trial (``raymtl.scale.matrix``)
on a local or attached cluster.
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
    check_ray_address,
    data_options,
    nonnegative_float,
    positive_float,
    positive_int,
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


@dataclass(frozen=True)
class Job:
    """One victim to train: a cell on one of the named training sets."""

    cell: Cell
    data: str  # the training set's name ('protected', 'clean')


def matrix_jobs(cells: Sequence[Cell], data_names: Sequence[str]) -> list[Job]:
    """Every cell on every named training set, in table order."""
    return [Job(cell, name) for cell, name in itertools.product(cells, data_names)]


@dataclass
class MatrixInputs:
    """What every job of a matrix shares: the named training sets, the clean test set, the tasks,
    the model factory and the training recipe."""

    datasets: dict[str, Dataset]
    test: Dataset
    tasks: Sequence[TaskSpec]
    make_model: Callable[[str, list[TaskSpec]], Any]
    base: TrainConfig


def run_job(job: Job, inputs: MatrixInputs) -> dict[str, Any]:
    """Train and evaluate one job's victim; its table row. Every victim starts from the weights
    of the recipe's seed, so a row does not depend on which jobs ran before it (or where)."""
    cell, base, tasks = job.cell, inputs.base, inputs.tasks
    config = replace(
        base,
        weighting=cell.weighting if cell.mode == "mtl" else "ls",
        defence=None if cell.defence == NO_DEFENCE else cell.defence,
        defence_options={},  # each defence at its defaults (JPEG 10, 2 bits, PGD 8/255)
    )
    torch.manual_seed(base.seed)
    result = train_and_evaluate(
        cell.mode,
        lambda ts, b=cell.backbone: inputs.make_model(b, ts),
        inputs.datasets[job.data],
        inputs.test,
        tasks,
        config,
    )
    per_task = result.test["tasks"]
    row: dict[str, Any] = {
        "backbone": cell.backbone,
        "mode": cell.mode,
        "weighting": cell.weighting,
        "defence": cell.defence,
        "data": job.data,
        "mean_score": round(result.test["mean_score"], 4),
    }
    balanced = mean_balanced_accuracy(per_task)
    if balanced is not None:
        row["mean_balanced_accuracy"] = round(balanced, 4)
    row.update({t.name: round(per_task[t.name][t.primary_metric], 4) for t in tasks})
    row["seconds"] = round(result.seconds, 1)
    return row


def row_scalars(job: Job, row: dict[str, Any], tasks: Sequence[TaskSpec]) -> dict[str, float]:
    """TensorBoard scalars of one row, tagged by cell and training set."""
    prefix = f"{job.cell.name}/{job.data}"
    scalars = {f"{prefix}/mean_score": row["mean_score"]}
    scalars.update({f"{prefix}/{t.name}": row[t.name] for t in tasks})
    return scalars


def describe(job: Job, row: dict[str, Any]) -> str:
    """One progress line for a finished job."""
    return (
        f"{job.cell.name} [{job.data}]: mean score {row['mean_score']:.4f} ({row['seconds']:.0f}s)"
    )


def run_matrix(
    cells: Sequence[Cell],
    inputs: MatrixInputs,
    run: RunDir | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train and evaluate every cell on every named training set (e.g. protected, clean), one
    after another in this process."""
    rows = []
    jobs = matrix_jobs(cells, list(inputs.datasets))
    for job in tqdm(jobs, desc="victim matrix", disable=not progress):
        row = run_job(job, inputs)
        rows.append(row)
        if run is not None:
            run.log_metrics(len(rows), row_scalars(job, row, inputs.tasks))
        if progress:
            tqdm.write(describe(job, row))
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
    ray = parser.add_argument_group("Ray (--ray: one Tune trial per cell and training set)")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="run the cells as Ray Tune trials, side by side, instead of one after another",
    )
    ray.add_argument(
        "--address",
        default=None,
        help="attach to a running Ray cluster ('auto' or HOST:PORT); default: start a local one",
    )
    ray.add_argument(
        "--cpus-per-cell", type=positive_float, default=1.0, help="CPUs per trial (default: 1)"
    )
    ray.add_argument(
        "--gpus-per-cell",
        type=nonnegative_float,
        default=0.0,
        help="GPUs per trial; with --device auto a trial given one trains on it (default: 0)",
    )
    ray.add_argument(
        "--max-concurrent",
        type=positive_int,
        default=None,
        help="trials at once (default: as many as the cluster's CPUs/GPUs allow)",
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
    if args.address is not None and not args.ray:
        raise ConfigError("--address attaches the --ray run to a cluster; add --ray")
    check_ray_address(args.address)
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
            "ray": (
                {
                    "address": args.address,
                    "cpus_per_cell": args.cpus_per_cell,
                    "gpus_per_cell": args.gpus_per_cell,
                    "max_concurrent": args.max_concurrent,
                }
                if args.ray
                else None
            ),
        }
    )

    make = ModelFactory(bundle.in_channels, bundle.image_size)
    inputs = MatrixInputs(datasets, bundle.test, bundle.tasks, make, config)
    failed: list[str] = []
    if args.ray:
        rows, failed = _run_on_ray(args, cells, inputs, run)
    else:
        rows = run_matrix(cells, inputs, run)
    run.write_text("matrix.csv", to_csv(rows))
    table = to_markdown(rows)
    run.write_text("matrix.md", table)
    run.close()
    print(table, end="")
    print(f"wrote {run.path / 'matrix.csv'} and matrix.md ({len(rows)} rows)")
    for line in failed:
        print(f"{PROG}: failed: {line}")
    return 1 if failed else 0


@dataclass(frozen=True)
class ModelFactory:
    """Builds a backbone's model for a task list (picklable, so Ray trials can receive it)."""

    in_channels: int
    image_size: int

    def __call__(self, backbone: str, tasks: list[TaskSpec]) -> Any:
        """A freshly initialised model."""
        return create_model(backbone, tasks, self.in_channels, self.image_size)


def _run_on_ray(
    args: argparse.Namespace, cells: Sequence[Cell], inputs: MatrixInputs, run: RunDir
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every job as a Tune trial; the finished rows in table order (logged as in a local run)
    and one line per failed job."""
    from raymtl.scale.matrix import TrialResources, run_jobs_as_trials

    jobs = matrix_jobs(cells, list(inputs.datasets))
    resources = TrialResources(args.cpus_per_cell, args.gpus_per_cell, args.max_concurrent)
    storage = str(run.path.resolve() / "tune")
    results, failed = run_jobs_as_trials(jobs, inputs, storage, resources, args.address)
    rows = []
    for job, row in zip(jobs, results, strict=True):
        if row is not None:
            rows.append(row)
            run.log_metrics(len(rows), row_scalars(job, row, inputs.tasks))
    return rows, failed


if __name__ == "__main__":
    run_main(main, PROG)
