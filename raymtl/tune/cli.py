"""``python -m raymtl.tune``: hyperparameter studies on a local or attached Ray cluster."""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
from collections.abc import Sequence
from typing import Any

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
)
from raymtl.data import build_dataset
from raymtl.data.base import split_validation
from raymtl.errors import ConfigError
from raymtl.rundir import RunDir
from raymtl.search_space import bundled_search_space, load_search_space

PROG = "python -m raymtl.tune"
STUDIES = ("victim",)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; every option is documented in --help."""
    parser = OneLineArgumentParser(
        prog=PROG,
        description=(
            "Run a Ray Tune study with Optuna (TPE) and ASHA early stopping. With no arguments: the "
            "'victim' study over learning rate, weight decay and task weighting for multi-task "
            "training of the small CNN on the embedded synthetic data set, on a local Ray cluster."
        ),
    )
    parser.add_argument(
        "study", nargs="?", default="victim", choices=STUDIES, help="study to run (default: victim)"
    )
    parser.add_argument(
        "--search-space",
        default=None,
        help="search-space YAML (default: search_spaces/<study>.yaml)",
    )
    parser.add_argument(
        "--num-samples", type=positive_int, default=8, help="number of trials (default: 8)"
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=6,
        help="epochs of a trial that is not stopped early (default: 6)",
    )
    parser.add_argument(
        "--grace-period",
        type=positive_int,
        default=2,
        help="ASHA: epochs before a trial may be stopped (default: 2)",
    )
    parser.add_argument(
        "--scheduler",
        choices=["asha", "none"],
        default="asha",
        help="early stopping (default: asha)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=128,
        help="batch size unless searched (default: 128)",
    )
    parser.add_argument(
        "--cpus-per-trial", type=positive_float, default=1.0, help="CPUs per trial (default: 1)"
    )
    parser.add_argument(
        "--gpus-per-trial",
        type=nonnegative_float,
        default=0.0,
        help="GPUs per trial; > 0 trains on CUDA (default: 0)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=positive_int,
        default=None,
        help="trials at once (default: as many as the cluster's CPUs/GPUs allow)",
    )
    parser.add_argument(
        "--val-fraction",
        type=positive_float,
        default=0.1,
        help="share of the training split held out to compare trials (default: 0.1)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for data, sampler and training (default: 0)"
    )
    parser.add_argument(
        "--run-dir", default=None, help="output folder (default: ./runs/<study>-<timestamp>)"
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="Tune storage: absolute path or URI such as s3://bucket/path (default: <run-dir>/tune)",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="attach to a running Ray cluster ('auto' or HOST:PORT); default: start a local one",
    )
    parser.add_argument(
        "--num-cpus",
        type=positive_int,
        default=None,
        help="CPUs of the local Ray cluster (default: all)",
    )
    add_data_arguments(parser)
    add_model_arguments(parser)
    parser.set_defaults(n_train=None)
    return parser


# Sizes of the embedded data set for the default study: 5 minutes on 2 cores.
STUDY_DATA_DEFAULTS = {"synthetic": {"n_train": 4000, "n_test": 1000}}


def _check_args(args: argparse.Namespace) -> None:
    if not 0 < args.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.storage and "://" not in args.storage and not os.path.isabs(args.storage):
        raise ConfigError(
            f"--storage must be an absolute path or a URI (s3://...), got {args.storage!r}"
        )


def results_table(grid: Any, metric: str, epochs: int) -> list[dict[str, Any]]:
    """One row per trial: its config, how far it ran, and its last validation/test scores."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        iterations = int(metrics.get("training_iteration", 0))
        status = (
            "error" if result.error else ("completed" if iterations >= epochs else "stopped early")
        )
        row = {"trial_id": metrics.get("trial_id", ""), "status": status, "epochs": iterations}
        row.update({k: v for k, v in (result.config or {}).items()})
        row[metric] = metrics.get(metric, math.nan)
        row["test/mean_score"] = metrics.get("test/mean_score", math.nan)
        row["_metrics"] = metrics
        rows.append(row)
    return rows


def pick_best(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Best trial by last validation score, preferring trials that ran all their epochs."""
    scored = [r for r in rows if not math.isnan(r[metric])]
    if not scored:
        raise RuntimeError("no trial reported a result; see the Tune log above")
    completed = [r for r in scored if r["status"] == "completed"] or scored
    return max(completed, key=lambda r: r[metric])


def per_task_from_flat(metrics: dict[str, Any], prefix: str) -> dict[str, dict[str, float]]:
    """Invert flatten_metrics: {'test/<task>/<metric>': v} -> {task: {metric: v}}."""
    per_task: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == prefix:
            per_task.setdefault(parts[1], {})[parts[2]] = value
    return per_task


def _csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns and not k.startswith("_")]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """Validate everything, then run the study and report the best configuration."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    check_names(args.dataset, args.backbone)
    from raymtl.tune import victim  # imports Ray: only after the cheap checks

    space_file = args.search_space or bundled_search_space(args.study)
    space = load_search_space(space_file, victim.PARAMETERS, victim.REGISTRIES)
    options = {**STUDY_DATA_DEFAULTS.get(args.dataset, {}), **data_options(args)}
    bundle = build_dataset(args.dataset, args.data_root, **options)
    train, val = split_validation(bundle.train, args.val_fraction, args.seed)

    run = RunDir.create(args.run_dir, args.study)
    storage = args.storage or str(run.path / "tune")
    settings = victim.study_settings(bundle, args)
    resolved = {
        "study": args.study,
        "dataset": {
            "name": bundle.name,
            "root": args.data_root,
            **bundle.options,
            "val_fraction": args.val_fraction,
        },
        "search_space": {"file": str(space_file), "parameters": space.to_dict()},
        "search": {
            "algorithm": "optuna-tpe",
            "scheduler": args.scheduler,
            "num_samples": args.num_samples,
            "metric": victim.METRIC,
            "mode": victim.MODE,
            "grace_period": args.grace_period,
        },
        "trial": {k: v for k, v in settings.items() if k != "tasks"},
        "tasks": [t.to_dict() for t in bundle.tasks],
        "ray": {
            "address": args.address,
            "storage": storage,
            "cpus_per_trial": args.cpus_per_trial,
            "gpus_per_trial": args.gpus_per_trial,
        },
    }
    run.write_config(resolved)

    from raymtl.tune.runner import StudySpec, default_max_concurrent, run_study, start_ray

    started = start_ray(args.address, args.num_cpus)
    try:
        spec = StudySpec(
            name=args.study,
            storage_path=storage,
            metric=victim.METRIC,
            mode=victim.MODE,
            space=space,
            num_samples=args.num_samples,
            max_concurrent=args.max_concurrent
            or default_max_concurrent(args.cpus_per_trial, args.gpus_per_trial),
            cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=args.gpus_per_trial,
            scheduler=args.scheduler,
            max_epochs=args.epochs,
            grace_period=args.grace_period,
            seed=args.seed,
        )
        grid = run_study(
            victim.train_victim_trial,
            spec,
            train=train,
            val=val,
            test=bundle.test,
            settings=settings,
        )
    finally:
        if started:
            import ray

            ray.shutdown()

    rows = results_table(grid, victim.METRIC, args.epochs)
    run.write_text("results.csv", _csv(rows))
    best = pick_best(rows, victim.METRIC)
    test_per_task = per_task_from_flat(best["_metrics"], "test")
    best_config = {k: v for k, v in best.items() if k in space.parameters}
    run.write_json(
        "best.json",
        {
            "config": best_config,
            "trial_id": best["trial_id"],
            "epochs": best["epochs"],
            victim.METRIC: best[victim.METRIC],
            "test": {"mean_score": best["test/mean_score"], "tasks": test_per_task},
        },
    )
    table = format_task_table(test_per_task, bundle.tasks)
    run.write_text("best_test_metrics.md", table + "\n")
    print()
    print(
        f"Best trial {best['trial_id']} ({best['epochs']} epochs), chosen on {victim.METRIC} = {best[victim.METRIC]:.4f}"
    )
    print("Best config: " + ", ".join(f"{k}={v}" for k, v in best_config.items()))
    print("Clean test metrics per task:")
    print(table)
    print(f"Mean test score (mean of each task's primary metric): {best['test/mean_score']:.4f}")
    print(f"Run directory: {run.path}   (tensorboard --logdir {run.path})")
    return 0
