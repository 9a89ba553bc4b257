"""Tune every unlearning method's defaults per embedded data set and setting, fairly.

Each method gets the same budget: a 3 × 3 grid over its learning rate and its main trade-off
knob (epochs, steps, α, γ or the saliency fraction), around its signature defaults. Every grid
point unlearns a *validation* request (a seeded 5 % that is not the table's request; seed + 1000)
from the same original model as benchmarks/unlearn_table.py, and the point with the lowest mean
UIS wins. One 5 % request is small and its UIS noisy: --requests N scores each point by its
mean UIS over N validation requests (seeds seed + 1000 … seed + 1000 + N − 1), the same for
every method. The winners are merged into raymtl/unlearn/tuned_defaults.yaml (or --write FILE),
which the table, the CLI and the unlearn study then use. Retrain is the oracle and is not tuned.

Usage: python benchmarks/unlearn_tune.py [--datasets synthetic,synthetic_dense] [--settings full,partial] [--requests N]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unlearn_table  # a sibling script in benchmarks/, not a package

from raymtl.cli import positive_int
from raymtl.io import atomic_write_text
from raymtl.unlearn.report import average_rows
from raymtl.unlearn.tuned import TUNED_DEFAULTS_FILE, load_tuned_defaults

GRIDS: dict[str, dict[str, list[Any]]] = {  # method -> option -> values (3 × 3 each)
    "finetune": {"lr": [3e-4, 1e-3, 3e-3], "epochs": [1, 2, 3]},
    "gradient_ascent": {"lr": [1e-5, 3e-5, 1e-4], "steps": [5, 10, 20]},
    "neggrad_plus": {"lr": [2e-4, 5e-4, 1e-3], "alpha": [0.7, 0.8, 0.9]},
    "l1_sparse": {"lr": [2e-4, 5e-4, 1e-3], "gamma": [1e-6, 1e-5, 1e-4]},
    "salun": {"lr": [2e-5, 5e-5, 1e-4], "fraction": [0.3, 0.5, 0.7]},
    "scrub": {"lr": [2e-4, 5e-4, 1e-3], "alpha": [0.3, 0.5, 0.7]},
    "interference_aware": {"lr": [2e-4, 5e-4, 1e-3], "alpha": [0.3, 0.5, 0.7]},
}
# Cost choices, not tuned: held fixed at every grid point of (method, data set, setting) and
# written with the winner. On the 14-task synthetic set the encoder's per-sample gradients are
# most of ours' step, so ours orthogonalises only the neck's and heads' updates against
# per-sample retain gradients (the encoder's against the batch's retain gradient). On 10 table
# requests: full 6.5x faster than retraining instead of 4.7x, UIS 0.0451 instead of 0.0413;
# partial 6.5x instead of 4.8-5.2x, UIS 0.0389 instead of 0.0381 (README). On the dense set the
# full-size heads dominate instead (no faster, UIS 0.0296 against 0.0250): none there.
FIXED: dict[tuple[str, str, str], dict[str, Any]] = {
    ("interference_aware", "synthetic", "full"): {"instance_layers": "neck,heads"},
    ("interference_aware", "synthetic", "partial"): {"instance_layers": "neck,heads"},
}
VALIDATION_SEED_OFFSET = 1000  # the validation request's seed is the table's seed + this


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of a method's grid values, as option dicts."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def best_points(summary: list[dict[str, Any]]) -> dict[str, tuple[int, float]]:
    """Per method, the index of its grid point with the lowest mean UIS, and that UIS
    (rows are named METHOD@INDEX)."""
    best: dict[str, tuple[int, float]] = {}
    for row in summary:
        method, _, index = row["method"].partition("@")
        if not index:
            continue  # the original
        if method not in best or row["uis_mean"] < best[method][1]:
            best[method] = (int(index), row["uis_mean"])
    return best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Tune, print each method's grid, and merge the winners into the tuned-defaults file."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", default="synthetic,synthetic_dense")
    parser.add_argument("--settings", default="full,partial")
    parser.add_argument("--methods", default=",".join(GRIDS))
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the data set sizes")
    parser.add_argument("--epochs", type=int, default=0, help="original's epochs (0: per data set)")
    parser.add_argument("--seed", type=int, default=0, help="the table's seed")
    parser.add_argument(
        "--requests",
        type=positive_int,
        default=1,
        help="validation requests per setting (seeds seed+1000 …); a point's score is their mean UIS",
    )
    parser.add_argument("--write", default=str(TUNED_DEFAULTS_FILE))
    parser.add_argument("--out", default="runs/unlearn-tune", help="every grid point's summary")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(GRIDS))
    if unknown:
        parser.error(f"--methods: no grid for {', '.join(unknown)}; tunable: {', '.join(GRIDS)}")
    tuned = load_tuned_defaults(args.write)
    for name in args.datasets.split(","):
        bundle, original, data = unlearn_table.prepare(name, args.scale, args.epochs, args.seed)
        for setting in args.settings.split(","):
            points = {
                m: [{**FIXED.get((m, name, setting), {}), **p} for p in grid_points(GRIDS[m])]
                for m in methods
            }
            runs = {f"{m}@{i}": p for m in methods for i, p in enumerate(points[m])}
            seeds = range(
                args.seed + VALIDATION_SEED_OFFSET,
                args.seed + VALIDATION_SEED_OFFSET + args.requests,
            )
            results = unlearn_table.compare_on_requests(
                bundle, original, data, setting, args.fraction, seeds, runs,
                f"{name}/{setting}/validation",
            )  # fmt: skip
            summary = average_rows([r.summary for r in results], ("method",), ("uis_mean",))
            rows = [
                f"{r['method']}: {runs[r['method']]} -> UIS {r['uis_mean']:.4f}"
                + (f" ± {r['uis_mean_sd']:.4f}" if args.requests > 1 else "")
                + f", test {r['test']:.4f}, {r['seconds']:.1f}s"
                for r in summary
                if r["method"] in runs
            ]
            atomic_write_text(Path(args.out) / f"{name}-{setting}.txt", "\n".join(rows) + "\n")
            print("\n".join(rows))
            chosen = tuned.setdefault(name, {}).setdefault(setting, {})
            for method, (index, score) in best_points(summary).items():
                chosen[method] = points[method][index]
                print(f"{name}/{setting} {method}: {points[method][index]} (UIS {score:.4f})")
            atomic_write_text(Path(args.write), HEADER + yaml.safe_dump(tuned, sort_keys=True))
    return tuned


HEADER = (
    "# Tuned unlearning defaults per data set and setting (lowest mean UIS on validation\n"
    "# requests). Written by benchmarks/unlearn_tune.py; see raymtl/unlearn/tuned.py.\n"
)


if __name__ == "__main__":
    main()
