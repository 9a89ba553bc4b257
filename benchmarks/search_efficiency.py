"""Search efficiency on the ``unlearn`` study: Optuna TPE against random search with the same
budget, over several sampler seeds, side by side in one run.

The original model, the retrain oracle and the deletion request are prepared once (data seed 0)
and shared by every search, so the searches differ only in how they pick trials. For each seed it
prints the best-UIS-so-far curve of both samplers (trials in creation order) and the fraction of
the budget TPE needed to reach random search's final best. Target: <= 50 %.
Writes curves.csv and curves.png to --out.

Usage: python benchmarks/search_efficiency.py [--num-samples 20] [--image-size 16] [--seeds 0,1,2] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
from pathlib import Path

from raymtl.data import build_dataset
from raymtl.data.base import split_validation
from raymtl.io import atomic_write_bytes, atomic_write_text
from raymtl.search_space import bundled_search_space, load_search_space
from raymtl.tune.cli import _apply_defaults, build_parser
from raymtl.tune.study import STUDIES, StudyInputs
from raymtl.tune.unlearn import OBJECTIVE


def best_so_far(values: list[float]) -> list[float]:
    """Running minimum."""
    out, best = [], math.inf
    for value in values:
        best = min(best, value)
        out.append(best)
    return out


def trials_to_reach(curve: list[float], target: float) -> int | None:
    """1-based number of trials after which ``curve`` is at or below ``target`` (None: never)."""
    for index, value in enumerate(curve, start=1):
        if value <= target + 1e-12:
            return index
    return None


def main() -> None:
    """Prepare the unlearn study once, run TPE and random search per seed, compare."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-samples", type=int, default=20)
    parser.add_argument(
        "--image-size", type=int, default=16, help="synthetic image size (16: 4x cheaper trials)"
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--out", default="runs/search-efficiency")
    parser.add_argument(
        "--summarise-only",
        action="store_true",
        help="print the comparison from an earlier run's curves.csv in --out (no new searches)",
    )
    options = parser.parse_args()
    if options.summarise_only:
        summarise(read_curves(Path(options.out) / "curves.csv"), options.num_samples)
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    out = Path(options.out).resolve()
    args = build_parser().parse_args(["unlearn", "--image-size", str(options.image_size)])
    study = STUDIES.create("unlearn")
    data_options = _apply_defaults(args, study)
    space = load_search_space(bundled_search_space("unlearn"), study.parameters)
    bundle = build_dataset(args.dataset, None, **data_options)
    train, val = split_validation(bundle.train, args.val_fraction, args.seed)

    from raymtl.tune.runner import StudySpec, run_study, start_ray

    start_ray(None)
    inputs = StudyInputs(bundle, train, val, args, str(out / "tune"), space)
    shared = study.prepare(inputs)
    curves: dict[tuple[str, int], list[float]] = {}
    for seed in [int(s) for s in options.seeds.split(",")]:
        for algorithm in ("tpe", "random"):
            spec = StudySpec(
                name=f"{algorithm}-seed{seed}",
                storage_path=str(out / "tune"),
                metrics=study.metrics,
                modes=study.modes,
                space=space,
                num_samples=options.num_samples,
                max_concurrent=options.max_concurrent,
                trial_resources={"cpu": args.cpus_per_worker},
                scheduler="none",
                max_epochs=1,
                grace_period=1,
                seed=seed,
                algorithm=algorithm,
            )
            grid = run_study(study.trainable, spec, **shared)
            ordered = sorted(
                (int(re.search(r"_(\d+)_", Path(r.path).name).group(1)), r.metrics[OBJECTIVE])
                for r in grid
                if r.metrics and OBJECTIVE in r.metrics
            )
            curves[(algorithm, seed)] = best_so_far([value for _, value in ordered])

    rows = [
        {"seed": seed, "algorithm": algorithm, "trial": i, "best_so_far": v}
        for (algorithm, seed), curve in sorted(curves.items())
        for i, v in enumerate(curve, start=1)
    ]
    summarise(curves, options.num_samples)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["seed", "algorithm", "trial", "best_so_far"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "curves.csv", buffer.getvalue())
    plot(curves, out / "curves.png")
    print(f"curves: {out / 'curves.csv'}, {out / 'curves.png'}")


def read_curves(path: Path) -> dict[tuple[str, int], list[float]]:
    """curves.csv back into {(algorithm, seed): best-so-far curve}."""
    curves: dict[tuple[str, int], list[float]] = {}
    with open(path) as handle:
        for row in csv.DictReader(handle):
            key = (row["algorithm"], int(row["seed"]))
            curves.setdefault(key, []).append(float(row["best_so_far"]))
    return curves


def summarise(curves: dict[tuple[str, int], list[float]], num_samples: int) -> None:
    """Per seed: both samplers' final best and the trials TPE needed to reach random's best."""
    print(f"\nunlearn study, {num_samples} trials per search, objective {OBJECTIVE}")
    print("| seed | random: final best | TPE: final best | TPE trials to reach random's best | share of budget |")  # fmt: skip
    print("|---|---|---|---|---|")
    shares, reached = [], 0
    for seed in sorted({s for _, s in curves}):
        tpe, rnd = curves[("tpe", seed)], curves[("random", seed)]
        needed = trials_to_reach(tpe, rnd[-1])
        reached += needed is not None
        share = needed / len(rnd) if needed is not None else None
        shares.append(share)
        shown = (
            (f"{needed}", f"{share:.0%}") if share is not None else ("not within budget", "> 100 %")
        )
        print(f"| {seed} | {rnd[-1]:.4f} | {tpe[-1]:.4f} | {shown[0]} | {shown[1]} |")
    met = all(share is not None and share <= 0.5 for share in shares)
    print(f"\nTPE reached random search's final best in {reached} of {len(shares)} seeds; target "
          f"(<= 50 % of the budget in every seed): {'met' if met else 'NOT met'}")  # fmt: skip
    wins = sum(curves[("tpe", s)][-1] < curves[("random", s)][-1] for _, s in curves if _ == "tpe")
    print(f"TPE's final best is lower than random search's in {wins} of {len(shares)} seeds")


def plot(curves: dict[tuple[str, int], list[float]], path: Path) -> None:
    """Best-so-far mean UIS against trials, one line per (sampler, seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    for (algorithm, seed), curve in sorted(curves.items()):
        axis.plot(
            range(1, len(curve) + 1),
            curve,
            color="#c00" if algorithm == "tpe" else "#777",
            ls="-" if algorithm == "tpe" else "--",
            label=f"{algorithm} seed {seed}",
        )
    axis.set_xlabel("trials")
    axis.set_ylabel("best validation mean UIS so far")
    axis.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


if __name__ == "__main__":
    main()
