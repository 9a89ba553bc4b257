"""``python -m raymtl.tune``: hyperparameter studies on a local or attached Ray cluster."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from raymtl.cli import (
    OneLineArgumentParser,
    add_data_arguments,
    add_model_arguments,
    check_names,
    check_ray_address,
    data_options,
    nonnegative_float,
    positive_float,
    positive_int,
)
from raymtl.data import build_dataset
from raymtl.data.base import split_validation
from raymtl.errors import ConfigError
from raymtl.rundir import RunDir
from raymtl.search_space import bundled_search_space, load_search_space
from raymtl.tune.study import (
    DRIVER_CPUS,
    STUDIES,
    Study,
    StudyInputs,
    per_task_from_flat,
    pick_best,
    results_table,
    to_csv,
)

__all__ = ["build_parser", "main", "per_task_from_flat", "pick_best"]

PROG = "python -m raymtl.tune"
DEFAULT_STUDY = "mtlue"  # the system's main job: protect, then verify on victims


def _study_names() -> list[str]:
    import raymtl.tune.studies  # noqa: F401  (registers every study; Ray-free imports)

    return STUDIES.names()


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; every option is documented in --help."""
    parser = OneLineArgumentParser(
        prog=PROG,
        description=(
            "Run a Ray Tune study with Optuna on a local or attached Ray cluster; each trial runs "
            "Ray Train jobs. Studies: mtlue (λ1, λ2, ε and the base loss of MTL-UE; the victim's "
            "clean-test score and ε are both minimised, a Pareto front is saved), unlearn "
            "(projection rank, step size, steps and α of interference-aware unlearning; mean UIS "
            "minimised), victim (victim-training hyperparameters with ASHA). With no study named: "
            "a small mtlue study on the embedded synthetic data set (about 5 minutes on 2 cores)."
        ),
    )
    parser.add_argument(
        "study",
        nargs="?",
        default=None,
        choices=_study_names(),
        help=f"study to run (default: a small {DEFAULT_STUDY} study)",
    )
    parser.add_argument(
        "--search-space",
        default=None,
        help="search-space YAML (default: search_spaces/<study>.yaml)",
    )
    parser.add_argument(
        "--num-samples",
        type=positive_int,
        default=None,
        help="number of trials (default: per study)",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="victim epochs of a trial (unlearn: of the original model) (default: per study)",
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
        default=None,
        help="early stopping (default: asha for victim, none for the others)",
    )
    parser.add_argument(
        "--search-algorithm",
        choices=["tpe", "random"],
        default="tpe",
        help="Optuna sampler (default: tpe; multi-objective TPE for mtlue)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="global victim batch size unless searched (default: 128; mtlue: 32)",
    )
    parser.add_argument(
        "--workers-per-trial",
        type=positive_int,
        default=1,
        help="Ray Train workers per trial (data parallel) (default: 1)",
    )
    parser.add_argument(
        "--cpus-per-worker",
        type=positive_float,
        default=0.75,
        help="CPUs per Train worker (default: 0.75; each trial's own process takes 0.25 more)",
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=nonnegative_float,
        default=0.0,
        help="GPUs per Train worker; > 0 trains on CUDA (default: 0)",
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
        help="Tune/Train storage: absolute path or URI such as s3://bucket/path (default: <run-dir>/tune)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="finish the interrupted study of --run-dir (same command plus --resume); "
        "finished trials are not run again",
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
    for name in _study_names():
        STUDIES.create(name).add_arguments(parser)
    parser.set_defaults(n_train=None)
    return parser


def _check_args(args: argparse.Namespace, study: Study) -> None:
    check_ray_address(args.address)
    if not 0 < args.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.storage and "://" not in args.storage and not os.path.isabs(args.storage):
        raise ConfigError(
            f"--storage must be an absolute path or a URI (s3://...), got {args.storage!r}"
        )
    if args.resume and not (args.run_dir and (Path(args.run_dir) / "config.yaml").is_file()):
        raise ConfigError(
            "--resume needs --run-dir of the interrupted study (with its config.yaml)"
        )
    study.check(args)


def _apply_defaults(args: argparse.Namespace, study: Study) -> dict[str, Any]:
    """Fill per-study defaults (a smaller preset when no study was named); return data options."""
    preset = study.small if args.study is None else {}
    if args.num_samples is None:
        args.num_samples = preset.get("num_samples", study.default_num_samples)
    if args.epochs is None:
        args.epochs = preset.get("epochs", study.default_epochs)
    if args.batch_size is None:
        args.batch_size = study.default_batch_size
    if args.scheduler is None:
        args.scheduler = study.default_scheduler
    if getattr(args, "generator_epochs", "absent") is None:
        args.generator_epochs = preset.get("generator_epochs", 6)
    sizes = dict(study.data_defaults.get(args.dataset, {}))
    if sizes:  # the preset resizes the embedded data set only
        sizes.update({k: preset[k] for k in ("n_train", "n_test") if k in preset})
    return {**sizes, **data_options(args)}


def study_inputs(args: argparse.Namespace, study: Study, storage: str) -> StudyInputs:
    """What a study's trials share: its search space, the data set with the study's default
    sizes, and the training/validation split (the CLI's, benchmarks' and tests' one way in)."""
    space_file = args.search_space or bundled_search_space(study.name)
    space = load_search_space(space_file, study.parameters, study.registries)
    bundle = build_dataset(args.dataset, args.data_root, **_apply_defaults(args, study))
    train, val = split_validation(bundle.train, args.val_fraction, args.seed)
    return StudyInputs(bundle, train, val, args, storage, space)


def main(argv: Sequence[str] | None = None) -> int:
    """Validate everything, then run the study and report its result."""
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)  # models built before training start from the same weights
    study = STUDIES.create(args.study or DEFAULT_STUDY)
    name = study.name
    _check_args(args, study)
    check_names(args.dataset, args.backbone)
    inputs = study_inputs(args, study, storage="")  # set below, once the run folder exists
    space, bundle = inputs.space, inputs.bundle
    space_file = args.search_space or bundled_search_space(name)

    run = RunDir(args.run_dir) if args.resume else RunDir.create(args.run_dir, name)
    storage = args.storage or str(run.path.resolve() / "tune")
    inputs.storage = storage
    workers = args.workers_per_trial
    if study.runs_train_jobs:
        trial_resources = {"cpu": DRIVER_CPUS}
        per_trial_cpus = DRIVER_CPUS + workers * args.cpus_per_worker
        per_trial_gpus = workers * args.gpus_per_worker
    else:
        trial_resources = {"cpu": args.cpus_per_worker, "gpu": args.gpus_per_worker}
        per_trial_cpus, per_trial_gpus = args.cpus_per_worker, args.gpus_per_worker
    resolved = {
        "study": name,
        "dataset": {
            "name": bundle.name,
            "root": args.data_root,
            **bundle.options,
            "val_fraction": args.val_fraction,
        },
        "search_space": {"file": str(space_file), "parameters": space.to_dict()},
        "search": {
            "algorithm": f"optuna-{args.search_algorithm}",
            "scheduler": args.scheduler if study.asha_metric else "none",
            "num_samples": args.num_samples,
            "metrics": list(study.metrics),
            "modes": list(study.modes),
            "grace_period": args.grace_period,
            "seed": args.seed,
        },
        **study.resolved(inputs),
        "tasks": [t.to_dict() for t in bundle.tasks],
        "ray": {
            "address": args.address,
            "storage": storage,
            "workers_per_trial": workers,
            "cpus_per_worker": args.cpus_per_worker,
            "gpus_per_worker": args.gpus_per_worker,
            "trial_resources": trial_resources,
        },
    }
    if not args.resume:
        run.write_config(resolved)

    from raymtl.tune.runner import StudySpec, default_max_concurrent, run_study, start_ray

    started = start_ray(args.address, args.num_cpus)
    try:
        shared = study.prepare(inputs)
        spec = StudySpec(
            name=name,
            storage_path=storage,
            metrics=study.metrics,
            modes=study.modes,
            space=space,
            num_samples=args.num_samples,
            max_concurrent=args.max_concurrent
            or default_max_concurrent(per_trial_cpus, per_trial_gpus),
            trial_resources=trial_resources,
            scheduler=args.scheduler,
            max_epochs=args.epochs,
            grace_period=args.grace_period,
            seed=args.seed,
            asha_metric=study.asha_metric,
            algorithm=args.search_algorithm,
            resume=args.resume,
            progress_metrics=("epoch",) if study.runs_train_jobs else (),
        )
        grid = run_study(study.trainable, spec, **shared)
    finally:
        if started:
            import ray

            ray.shutdown()

    epochs = args.epochs if study.asha_metric else None
    rows = results_table(grid, study.metrics, epochs)
    run.write_text("results.csv", to_csv(rows))
    if not any(row["status"] != "error" for row in rows):
        print(f"{PROG}: every trial failed; see the errors above and {run.path / 'results.csv'}")
        return 1
    study.summarise(rows, run, inputs, space)
    print(f"Run directory: {run.path}   (tensorboard --logdir {run.path})")
    return 0
