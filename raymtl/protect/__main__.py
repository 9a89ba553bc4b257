"""``python -m raymtl.protect``: generate a perturbation store for a data set's training split."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import raymtl
from raymtl.cli import (
    OneLineArgumentParser,
    add_data_arguments,
    check_names,
    data_options,
    nonnegative_int,
    positive_int,
    run_main,
)
from raymtl.data import build_dataset
from raymtl.data.base import materialise
from raymtl.errors import ConfigError
from raymtl.protect import (
    UE_BASES,
    UE_METHODS,
    ProtectConfig,
    SurrogateConfig,
    protect,
    write_store,
)
from raymtl.protect.generator import VARIANTS
from raymtl.protect.run import COMBINE_MODES, protected_subset
from raymtl.protect.store import STORE_FILE
from raymtl.rundir import RunDir

PROG = "python -m raymtl.protect"


def epsilon_value(text: str) -> float:
    """ε as a number or a fraction such as 8/255."""
    try:
        if "/" in text:
            numerator, denominator = text.split("/", 1)
            return float(numerator) / float(denominator)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"expected a number or a fraction like 8/255, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = OneLineArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument(
        "--method",
        default="mtlue",
        help=f"one of: {', '.join(UE_METHODS.names())} (default: mtlue)",
    )
    parser.add_argument(
        "--base", default="em", help=f"one of: {', '.join(UE_BASES.names())} (default: em)"
    )
    parser.add_argument(
        "--epsilon", type=epsilon_value, default=8 / 255, help="L-inf bound, e.g. 8/255 (default)"
    )
    parser.add_argument(
        "--lambda1",
        type=float,
        default=10.0,
        help="intra-task embedding regulariser weight (default: 10)",
    )
    parser.add_argument(
        "--lambda2",
        type=float,
        default=200.0,
        help="inter-task embedding regulariser weight (default: 200)",
    )
    parser.add_argument(
        "--variant", choices=VARIANTS, default="sample", help="generator variant (default: sample)"
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=20,
        help="generator epochs / EM-PGD rounds, a cap (default: 20)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=ProtectConfig.lr,
        help=f"generator Adam learning rate (default: {ProtectConfig.lr:g})",
    )
    parser.add_argument(
        "--width",
        type=positive_int,
        default=32,
        help="generator encoder width; 64 = the paper's (default: 32)",
    )
    parser.add_argument(
        "--protect-tasks",
        default=None,
        help="partial-task protection: comma-separated tasks to protect (default: all tasks)",
    )
    parser.add_argument(
        "--keep-unprotected",
        type=float,
        default=ProtectConfig.keep_unprotected,
        help="partial protection with tap/sep: weight of keeping the unprotected tasks' "
        f"predictions, 0 = off (default: {ProtectConfig.keep_unprotected:g})",
    )
    parser.add_argument(
        "--combine",
        choices=COMBINE_MODES,
        default="average",
        help="lsp: combine per-task class patterns by average or grid (default: average)",
    )
    parser.add_argument(
        "--patch-size",
        type=positive_int,
        default=8,
        help="lsp: side of one colour patch in pixels (default: 8)",
    )
    parser.add_argument(
        "--clean-epochs",
        type=positive_int,
        default=8,
        help="epochs of the clean model (TAP, SEP) (default: 8)",
    )
    parser.add_argument(
        "--em-steps-per-epoch",
        type=positive_int,
        default=SurrogateConfig.em_steps_per_epoch,
        help="em: surrogate steps after each generator epoch or PGD round "
        f"(default: {SurrogateConfig.em_steps_per_epoch}, the paper's; short epochs need more)",
    )
    parser.add_argument(
        "--em-restarts",
        type=nonnegative_int,
        default=SurrogateConfig.em_restarts,
        help="em: fresh surrogates that must fit the noise again before generation stops "
        f"(default: {SurrogateConfig.em_restarts})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument(
        "--out",
        required=True,
        help="output folder: the perturbation store (and a checkpoint while running)",
    )
    add_data_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Validate, generate (resuming from a checkpoint in --out), write the store."""
    args = build_parser().parse_args(argv)
    check_names(args.dataset)
    config = ProtectConfig(
        method=args.method,
        base=args.base,
        epsilon=args.epsilon,
        lambda1=args.lambda1,
        lambda2=args.lambda2,
        variant=args.variant,
        epochs=args.epochs,
        width=args.width,
        lr=args.lr,
        combine=args.combine,
        protected_tasks=(
            [t.strip() for t in args.protect_tasks.split(",") if t.strip()]
            if args.protect_tasks is not None
            else None
        ),
        keep_unprotected=args.keep_unprotected,
        patch_size=args.patch_size,
        seed=args.seed,
        surrogate=SurrogateConfig(
            clean_epochs=args.clean_epochs,
            em_steps_per_epoch=args.em_steps_per_epoch,
            em_restarts=args.em_restarts,
            seed=args.seed,
        ),
    ).validate()
    out = Path(args.out)
    if (out / STORE_FILE).exists():
        raise ConfigError(
            f"--out {out}: already holds a finished perturbation store; choose another --out"
        )
    build_options = data_options(args)
    bundle = build_dataset(args.dataset, args.data_root, **build_options)
    protected_subset(bundle.tasks, config.protected_tasks)  # unknown names: before any output
    train = materialise(bundle.train)  # real formats: decoded once at the model's input size
    run = RunDir.create(out, "protect") if not out.exists() else RunDir(out)
    run.write_config(
        {"dataset": {"name": bundle.name, **bundle.options}, "protect": config.to_dict()}
    )
    result = protect(
        train,
        bundle.tasks,
        bundle.in_channels,
        bundle.image_size,
        config,
        checkpoint_dir=out,
    )
    metadata = {
        "method": config.method,
        "base": config.base,
        "epsilon": config.epsilon,
        "lambda1": config.lambda1,
        "lambda2": config.lambda2,
        "variant": config.variant,
        "protected_tasks": [t.name for t in protected_subset(bundle.tasks, config.protected_tasks)],
        "dataset": bundle.name,
        # What rebuilds the same data set (victim, matrix); dataset_info is what it reported.
        "dataset_options": {**build_options, "root": args.data_root},
        "dataset_info": bundle.options,
        "seed": config.seed,
        "raymtl": raymtl.__version__,
        "config": config.to_dict(),
        "log": result.log,
        "seconds": result.seconds,
    }
    write_store(out, result.ids, result.deltas, metadata)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    print(
        f"wrote perturbations for {len(result.ids)} samples to {out} (max |δ| = {int(abs(result.deltas).max())}/255, {result.seconds:.0f}s)"
    )
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
