"""``python -m raymtl.unlearn``: train (or load) an original multi-task model, apply a deletion
request with one or more unlearning methods, and compare them with retraining."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
)
from raymtl.data import build_dataset
from raymtl.data.base import materialise
from raymtl.engine import evaluate, fit, resolve_device
from raymtl.errors import ConfigError
from raymtl.models import create_model
from raymtl.rundir import RunDir
from raymtl.unlearn import (
    UNLEARN_METHODS,
    UnlearnData,
    class_request,
    default_options,
    load_request,
    random_request,
)
from raymtl.unlearn.report import (
    SUMMARY_COLUMNS,
    TASK_COLUMNS,
    compare,
    plot_uis_against_cost,
    scalars,
    to_csv,
    to_markdown,
)
from raymtl.unlearn.tuned import resolve_method_options

PROG = "python -m raymtl.unlearn"
DEFAULT_METHODS = "retrain,finetune,gradient_ascent,neggrad_plus,interference_aware"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = OneLineArgumentParser(prog=PROG, description=__doc__)
    add_data_arguments(parser)
    add_model_arguments(parser)
    add_training_arguments(parser, "unlearn")
    group = parser.add_argument_group("unlearning")
    which = group.add_mutually_exclusive_group()
    which.add_argument(
        "--forget-fraction",
        type=float,
        default=None,
        help="withdraw a seeded random fraction of the training instances (default: 0.05)",
    )
    which.add_argument("--request", help="CSV (header id,task) or JSON list of {id, task}")
    which.add_argument("--forget-class", help="TASK=VALUE: withdraw every instance with that label")
    group.add_argument(
        "--forget-tasks",
        help="comma-separated target tasks (partial-task unlearning); default: all tasks",
    )
    group.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated; NAME@LABEL runs a variant (default: {DEFAULT_METHODS}); "
        f"available: {', '.join(UNLEARN_METHODS.names())}",
    )
    group.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="an option of one method (or of a NAME@LABEL variant), e.g. interference_aware.rank=4",
    )
    group.add_argument(
        "--no-tuned",
        action="store_true",
        help="use each method's signature defaults, not the tuned defaults for this data set "
        "and setting (raymtl/unlearn/tuned_defaults.yaml)",
    )
    group.add_argument(
        "--original", help="load the original model's weights (.pt) instead of training"
    )
    return parser


def method_options(names: list[str], items: list[str]) -> dict[str, dict[str, Any]]:
    """{method: {option: value}} from NAME.KEY=VALUE items (values parsed as YAML scalars)."""
    options: dict[str, dict[str, Any]] = {name: {} for name in names}
    for item in items:
        target, sep, value = item.partition("=")
        method, dot, key = target.partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"--method-option expects NAME.KEY=VALUE, got {item!r}")
        if method not in options:
            raise ConfigError(
                f"--method-option {item!r}: method {method!r} is not in --methods ({', '.join(names)})"
            )
        options[method][key.replace("-", "_")] = scalar(value)
    return options


def scalar(text: str) -> Any:
    """A command-line value as int, float (7e-4 included), bool (true/false) or text."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return text.strip()


def main(argv: Sequence[str] | None = None) -> int:
    """Build the data, the request and the original model; run the methods; save the tables."""
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)  # models built before training start from the same weights
    check_names(args.dataset, args.backbone)
    config = train_config(args)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in names:
        UNLEARN_METHODS.get(name.split("@")[0])
    options = method_options(names, args.method_option)
    for name in names:
        accepted = default_options(name.split("@")[0])
        unknown = sorted(set(options[name]) - set(accepted))
        if unknown:
            raise ConfigError(
                f"--method-option: {name} has no option {unknown[0]!r}; accepted: {', '.join(accepted)}"
            )
    bundle = build_dataset(args.dataset, args.data_root, **data_options(args))
    train = materialise(bundle.train)
    targets = [t.strip() for t in args.forget_tasks.split(",")] if args.forget_tasks else None
    if args.request:
        request = load_request(args.request, bundle.tasks, train.ids)
        if targets is not None:
            raise ConfigError("--forget-tasks does not apply to --request (the file names tasks)")
    elif args.forget_class:
        task, sep, value = args.forget_class.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ConfigError(f"--forget-class expects TASK=INTEGER, got {args.forget_class!r}")
        request = class_request(train, bundle.tasks, task.strip(), int(value), targets)
    else:
        fraction = 0.05 if args.forget_fraction is None else args.forget_fraction
        request = random_request(train.ids, bundle.tasks, fraction, targets, args.seed)
    if args.original and not Path(args.original).is_file():
        raise ConfigError(f"--original {args.original}: missing file")
    if not args.no_tuned:
        options = resolve_method_options(options, bundle.name, request.setting)

    run = RunDir.create(args.run_dir, "unlearn")
    run.write_config(
        {
            "dataset": {"name": bundle.name, "root": args.data_root, **bundle.options},
            "tasks": [t.to_dict() for t in bundle.tasks],
            "backbone": args.backbone,
            "train": config.to_dict(),
            "request": request.summary(),
            "methods": {n: {**default_options(n.split("@")[0]), **options[n]} for n in names},
            "original": args.original,
        }
    )
    run.write_text("request.csv", "id,task\n" + "".join(f"{i},{t}\n" for i, t in request.rows()))

    def make(tasks: list) -> Any:
        return create_model(args.backbone, tasks, bundle.in_channels, bundle.image_size)

    device = resolve_device(config.device)
    original = make(bundle.tasks)
    if args.original:
        try:
            original.load_state_dict(torch.load(args.original, map_location="cpu"))
        except (RuntimeError, KeyError) as err:
            raise ConfigError(
                f"--original {args.original}: does not fit this model: {err}"
            ) from None
        original_seconds = 0.0
    else:
        print(
            f"training the original model ({config.epochs} epochs on {len(train)} samples)",
            flush=True,
        )
        fitted = fit(original, train, None, bundle.tasks, config)
        original, original_seconds = fitted.model, fitted.seconds
        buffer_path = run.path / "original.pt"
        torch.save(original.state_dict(), buffer_path.with_suffix(".pt.tmp"))
        buffer_path.with_suffix(".pt.tmp").replace(buffer_path)
    original.to(device).eval()
    reference = evaluate(original, bundle.test, bundle.tasks, device=device)["loss"]
    data = UnlearnData(train, bundle.tasks, make, config, reference, seed=args.seed)
    summary = request.summary()
    print(
        f"{summary['setting']}-task request: {summary['instances']} instances, targets {', '.join(summary['target_tasks'])}",
        flush=True,
    )
    result = compare(
        original, request, data, bundle.test, options, progress=lambda m: print(m, flush=True)
    )
    run.write_text("summary.csv", to_csv(result.summary, SUMMARY_COLUMNS))
    run.write_text("per_task.csv", to_csv(result.per_task, TASK_COLUMNS))
    table = to_markdown(result.summary, SUMMARY_COLUMNS)
    run.write_text("summary.md", table + "\n")
    run.write_text("per_task.md", to_markdown(result.per_task, TASK_COLUMNS) + "\n")
    run.write_json(
        "metrics.json",
        {"summary": result.summary, "per_task": result.per_task, "logs": result.logs,
         "original_seconds": original_seconds},
    )  # fmt: skip
    plot_uis_against_cost(
        result.summary,
        f"{summary['setting']}-task unlearning: UIS against cost",
        run.path / "uis_vs_cost.png",
    )
    run.log_metrics(0, scalars(result))
    run.close()
    print(table)
    print(f"run directory: {run.path}")
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
