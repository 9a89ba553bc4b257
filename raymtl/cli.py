"""Shared command-line pieces: argument groups and one-line errors with exit status 2."""

from __future__ import annotations

import argparse
import math
import socket
import sys
from typing import Any, NoReturn

from raymtl.data import DATASETS
from raymtl.defences import DEFENCES
from raymtl.errors import ConfigError, die
from raymtl.models import BACKBONES
from raymtl.tasks import TaskSpec
from raymtl.weighting import WEIGHTINGS


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line on stderr (no usage dump), status 2."""

    def error(self, message: str) -> NoReturn:
        die(self.prog, f"{message} (see --help)")


def _number_type(parse: Any, accept: Any, expected: str) -> Any:
    """An argparse type that parses with ``parse`` and accepts finite values passing ``accept``."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    convert.__name__ = expected
    return convert


positive_int = _number_type(int, lambda v: v >= 1, "a positive integer")
positive_float = _number_type(float, lambda v: v > 0, "a positive number")
nonnegative_float = _number_type(float, lambda v: v >= 0, "a number >= 0")
nonnegative_int = _number_type(int, lambda v: v >= 0, "an integer >= 0")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--dataset, --data-root and the embedded data sets' size options."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        default="synthetic",
        help=f"data set name (default: synthetic); one of: {', '.join(DATASETS.names())}",
    )
    group.add_argument(
        "--data-root",
        default=None,
        help="folder or URI (s3://...) of a real data set, as distributed or converted",
    )
    group.add_argument(
        "--on-bad-sample",
        choices=["error", "skip"],
        default=None,
        help="real data sets: stop at an unreadable sample, or skip and count it (default: error)",
    )
    group.add_argument(
        "--data-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="data set option, e.g. attributes=Smiling,Male for celeba (repeatable)",
    )
    group.add_argument(
        "--n-train", type=positive_int, default=None, help="synthetic: training samples"
    )
    group.add_argument("--n-test", type=positive_int, default=None, help="synthetic: test samples")
    group.add_argument(
        "--image-size", type=positive_int, default=None, help="synthetic: image side in pixels"
    )


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    """The data set options given on the command line (unset ones are left to the data set)."""
    options = {"n_train": args.n_train, "n_test": args.n_test, "image_size": args.image_size}
    options = {k: v for k, v in options.items() if v is not None}
    if args.on_bad_sample is not None:
        options["on_bad_sample"] = args.on_bad_sample
    options.update(parse_data_options(args.data_option))
    options["seed"] = args.seed
    return options


def parse_data_options(items: list[str], flag: str = "--data-option") -> dict[str, str]:
    """KEY=VALUE strings from a repeatable option into a dict (ConfigError on a malformed item)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        options[key.strip().replace("-", "_")] = value.strip()
    return options


def add_model_arguments(
    parser: argparse.ArgumentParser, default_backbone: str = "small_cnn"
) -> None:
    """--backbone."""
    parser.add_argument(
        "--backbone",
        default=default_backbone,
        help=f"backbone (default: {default_backbone}); one of: {', '.join(BACKBONES.names())}",
    )


def check_names(
    dataset: str | None = None, backbone: str | None = None, weightings: list[str] | None = None
) -> None:
    """Fail fast (ConfigError) on unknown registry names, before any work starts."""
    if dataset is not None:
        DATASETS.get(dataset)
    if backbone is not None:
        BACKBONES.get(backbone)
    for name in weightings or []:
        WEIGHTINGS.get(name)


def format_task_table(per_task: dict[str, dict[str, float]], tasks: list[TaskSpec]) -> str:
    """A Markdown table of each task's metrics (primary metric first)."""
    lines = ["| task | kind | metrics |", "|---|---|---|"]
    for task in tasks:
        values = per_task.get(task.name, {})
        ordered = [task.primary_metric] + [m for m in values if m != task.primary_metric]
        text = ", ".join(f"{m}={values[m]:.4f}" for m in ordered if m in values)
        lines.append(f"| {task.name} | {task.kind} | {text} |")
    return "\n".join(lines)


def check_ray_address(address: str | None, timeout: float = 3.0) -> None:
    """ConfigError unless ``--address`` is 'auto', a ``ray://`` URI or a HOST:PORT that accepts a
    connection: Ray itself retries an unreachable address for minutes before it gives up."""
    if address is None or address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address must be 'auto' or HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConfigError(
            f"--address {address}: no Ray cluster answers there ({err.strerror or err})"
        ) from None


def run_main(main: Any, prog: str) -> None:
    """Entry point wrapper: ConfigError → one line + exit 2; returns main's status otherwise."""
    try:
        status = main(sys.argv[1:])
    except ConfigError as err:
        die(prog, str(err))
    raise SystemExit(status)


def add_training_arguments(parser: argparse.ArgumentParser, run_name: str) -> None:
    """Training-recipe options shared by the commands that train a model (see ``train_config``)."""
    group = parser.add_argument_group("training")
    group.add_argument("--weighting", default="ls", help="task weighting strategy (default: ls)")
    group.add_argument(
        "--mode",
        choices=["mtl", "stl"],
        default="mtl",
        help="one multi-task model, or one model per task",
    )
    group.add_argument(
        "--epochs", type=positive_int, default=8, help="training epochs (default: 8)"
    )
    group.add_argument(
        "--batch-size", type=positive_int, default=128, help="batch size (default: 128)"
    )
    group.add_argument(
        "--lr", type=positive_float, default=2e-3, help="Adam learning rate (default: 2e-3)"
    )
    group.add_argument(
        "--weight-decay", type=nonnegative_float, default=0.0, help="Adam weight decay (default: 0)"
    )
    group.add_argument(
        "--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda, cuda:1 ..."
    )
    group.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    group.add_argument(
        "--defence",
        default=None,
        help=f"victim-side defence on every training batch; one of: {', '.join(DEFENCES.names())}",
    )
    group.add_argument(
        "--defence-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="defence option, e.g. quality=10 (jpeg), bits=2 (bdr), epsilon=0.0314 (pgd_at)",
    )
    group.add_argument(
        "--workers",
        type=nonnegative_int,
        default=0,
        help="DataLoader worker processes (default: 0)",
    )
    group.add_argument(
        "--seed", type=int, default=0, help="seed for data and training (default: 0)"
    )
    group.add_argument(
        "--run-dir", default=None, help=f"output folder (default: ./runs/{run_name}-<timestamp>)"
    )


def train_config(args: argparse.Namespace) -> Any:
    """The validated TrainConfig for options added by ``add_training_arguments``."""
    from raymtl.engine import TrainConfig

    check_names(weightings=[args.weighting])
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        weighting=args.weighting,
        device=args.device,
        amp=args.amp,
        defence=args.defence,
        defence_options=parse_data_options(args.defence_option, "--defence-option"),
        num_workers=args.workers,
        seed=args.seed,
    ).validate()


def write_test_results(
    run: Any, test: dict[str, Any], tasks: list[TaskSpec], seconds: float
) -> str:
    """Save a run's clean-test evaluation (metrics.json, test_metrics.md), close it, print the table."""
    table = format_task_table(test["tasks"], tasks)
    run.write_json("metrics.json", {"test": test, "seconds": seconds})
    run.write_text("test_metrics.md", table + "\n")
    run.close()
    print(table)
    return table
