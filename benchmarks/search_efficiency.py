"""Search efficiency on the ``unlearn`` study: Optuna TPE against random search with the same
budget, over several sampler seeds, side by side in one run.

The original model, the retrain oracle and the deletion request are prepared once (data seed 0)
and shared by every search, so the searches differ only in how they pick trials. For each seed it
prints the best-UIS-so-far curve of both samplers (trials in creation order) and the fraction of
the budget TPE needed to reach random search's final best; then the same on the curves averaged
over seeds, which is what the target (<= 50 %) is judged on. Writes curves.csv and curves.png to --out.

Usage: python benchmarks/search_efficiency.py [--num-samples 30] [--image-size 16] [--repeats 1] [--seeds 0,1,2,3] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
from pathlib import Path

from raymtl.io import atomic_write_bytes, atomic_write_text
from raymtl.tune.cli import build_parser, study_inputs
from raymtl.tune.study import STUDIES
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
    parser.add_argument("--num-samples", type=int, default=30)
    parser.add_argument(
        "--image-size", type=int, default=16, help="synthetic image size (16: 4x cheaper trials)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="unlearning runs averaged per trial (the study's --repeats; more: a less noisy objective)",
    )
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--out", default="runs/search-efficiency")
    parser.add_argument(
        "--summarise-only",
        action="store_true",
        help="print the comparison from an earlier run's curves.csv in --out (no new searches)",
    )
    options = parser.parse_args()
    if options.summarise_only:
        curves = read_curves(Path(options.out) / "curves.csv")
        summarise(curves, options.num_samples)
        plot(curves, Path(options.out) / "curves.png")
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    out = Path(options.out).resolve()
    args = build_parser().parse_args(
        ["unlearn", "--image-size", str(options.image_size), "--repeats", str(options.repeats)]
    )
    study = STUDIES.create("unlearn")
    inputs = study_inputs(args, study, str(out / "tune"))
    space = inputs.space

    from raymtl.tune.runner import StudySpec, run_study, start_ray

    start_ray(None)
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


def share_to_reach(tpe: list[float], random: list[float]) -> float | None:
    """Share of the budget after which TPE's curve is at or below random search's final best."""
    needed = trials_to_reach(tpe, random[-1])
    return None if needed is None else needed / len(random)


def mean_curve(curves: dict[tuple[str, int], list[float]], algorithm: str) -> list[float]:
    """The best-so-far curves of one sampler averaged over seeds, trial by trial."""
    runs = [curve for (name, _), curve in sorted(curves.items()) if name == algorithm]
    length = min(len(curve) for curve in runs)
    return [sum(curve[i] for curve in runs) / len(runs) for i in range(length)]


def _shown(share: float | None, trials: int) -> tuple[str, str]:
    if share is None:
        return "not within budget", "> 100 %"
    return f"{round(share * trials)}", f"{share:.0%}"


def summarise(curves: dict[tuple[str, int], list[float]], num_samples: int) -> bool:
    """Per seed and on the seed-averaged curves: both samplers' final best and the trials TPE
    needed to reach random's final best. Returns whether the target is met (averaged curves)."""
    print(f"\nunlearn study, {num_samples} trials per search, objective {OBJECTIVE}")
    print("| seed | random: final best | TPE: final best | TPE trials to reach random's best | share of budget |")  # fmt: skip
    print("|---|---|---|---|---|")
    seeds = sorted({s for _, s in curves})
    shares = []
    for seed in seeds:
        tpe, rnd = curves[("tpe", seed)], curves[("random", seed)]
        share = share_to_reach(tpe, rnd)
        shares.append(share)
        shown = _shown(share, len(rnd))
        print(f"| {seed} | {rnd[-1]:.4f} | {tpe[-1]:.4f} | {shown[0]} | {shown[1]} |")
    tpe_mean, random_mean = mean_curve(curves, "tpe"), mean_curve(curves, "random")
    mean_share = share_to_reach(tpe_mean, random_mean)
    shown = _shown(mean_share, len(random_mean))
    print(f"| mean of {len(seeds)} seeds | {random_mean[-1]:.4f} | {tpe_mean[-1]:.4f} | {shown[0]} | {shown[1]} |")  # fmt: skip
    met = mean_share is not None and mean_share <= 0.5
    within = sum(share is not None and share <= 0.5 for share in shares)
    print(f"\nOn the curves averaged over seeds, TPE reaches random search's final best after "
          f"{shown[1]} of the budget; target (<= 50 %): {'met' if met else 'NOT met'}. "
          f"Seed by seed, within 50 % in {within} of {len(seeds)} seeds.")  # fmt: skip
    wins = sum(curves[("tpe", s)][-1] < curves[("random", s)][-1] for s in seeds)
    print(f"TPE's final best is lower than random search's in {wins} of {len(seeds)} seeds")
    return met


def plot(curves: dict[tuple[str, int], list[float]], path: Path) -> None:
    """Best-so-far mean UIS against trials: a thin line per (sampler, seed), a thick one for each
    sampler's seed average (what the target is judged on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"tpe": "#c00", "random": "#777"}
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    for (algorithm, _), curve in sorted(curves.items()):
        axis.plot(range(1, len(curve) + 1), curve, color=colours[algorithm], lw=0.7, alpha=0.45)
    for algorithm in ("random", "tpe"):
        average = mean_curve(curves, algorithm)
        axis.plot(
            range(1, len(average) + 1),
            average,
            color=colours[algorithm],
            lw=2.2,
            ls="-" if algorithm == "tpe" else "--",
            label=f"{algorithm}: mean of {sum(a == algorithm for a, _ in curves)} seeds",
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
