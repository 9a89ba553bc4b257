"""Multi-task unlearning on the embedded data sets: every method against retraining, in full-task
and partial-task unlearning, with a forget set of 5 % of the training instances.

Methods: retrain (the oracle), finetune, gradient_ascent, neggrad_plus, l1_sparse, salun, scrub
and ours (interference_aware); --ablations adds ours' parts alone (projected_gradient,
orthogonalisation_only), ours without the partial-request anchor, and ranks 2 and 32.
For each data set, one original model is trained; for each setting, every method unlearns the
same request and is measured on the forget pairs, retain data and the clean test set (UIS, MIA
AUC, the distance to the retrained model, cost). Partial-task requests withdraw the first half of
the tasks. Prints one table per (data set, setting) and a verdict line: ours against the strongest
baseline (lowest mean UIS; retrain is the oracle, not a baseline) and ours' speed-up over retrain.
Every method uses its tuned defaults for the data set and setting (raymtl/unlearn/tuned_defaults.yaml,
written by benchmarks/unlearn_tune.py on another request); --no-tuned uses signature defaults.

One 5 % request is 50 instances on the synthetic set, and UIS moves with which ones they are:
--requests N runs every method on N seeded requests per setting (seeds --seed … --seed+N−1; the
tuning request is seed + 1000) and averages the tables, with UIS's spread across requests and
the number of requests in which ours is below every baseline.

Writes summary.csv/md, per_task.csv/md, options.yaml (every method's options as run) and
uis_vs_cost.png per setting (with several requests: the averages, and each request's own tables
in request-<seed>/), and verdict.md, under --out.
Usage: python benchmarks/unlearn_table.py [--datasets synthetic,synthetic_dense] [--requests N] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml

from raymtl.cli import positive_int
from raymtl.data import DatasetBundle, build_dataset
from raymtl.engine import TrainConfig, evaluate, fit
from raymtl.io import atomic_write_text
from raymtl.models import create_model
from raymtl.unlearn import UNLEARN_METHODS, DeletionRequest, UnlearnData, random_request
from raymtl.unlearn.__main__ import method_options
from raymtl.unlearn.report import (
    SUMMARY_COLUMNS,
    TASK_COLUMNS,
    Comparison,
    average_rows,
    best_baseline,
    compare,
    plot_uis_against_cost,
    to_csv,
    to_markdown,
)
from raymtl.unlearn.tuned import resolve_method_options

OURS = "interference_aware"
# The summary over several requests: UIS's spread across them, and their number.
AVERAGED_COLUMNS = ("method", "uis_mean", "uis_mean_sd", *SUMMARY_COLUMNS[2:], "runs")
METHODS = [
    "retrain", "finetune", "gradient_ascent", "neggrad_plus", "l1_sparse", "salun", "scrub", OURS,
]  # fmt: skip
ABLATIONS = {  # ours without each part, and the projection rank
    "projected_gradient": {},  # task-aware projection only
    "orthogonalisation_only": {},  # per-sample orthogonalisation only
    f"{OURS}@no_anchor": {"anchor_forget_instances": False},  # matters for partial requests
    f"{OURS}@rank2": {"rank": 2},
    f"{OURS}@rank32": {"rank": 32},
}
SIZES = {  # data set -> (n_train, n_test, epochs of the original model, data set options)
    # contrast 0.3 and 40 epochs on 1,000 images: the original memorises its training data
    # (forget-set accuracy well above test accuracy), so there is something to unlearn.
    "synthetic": (1000, 500, 40, {"contrast": 0.3}),
    # dense maps are many targets per image: 250 images and 80 epochs are needed to memorise
    # (forget-set segmentation mIoU 0.96 against 0.72 on test; with 500 images, 40 epochs:
    # 0.88 against 0.85 mean, and UIS rewarded changing nothing).
    "synthetic_dense": (250, 250, 80, {}),
}


def prepare(
    name: str, scale: float = 1.0, epochs: int = 0, seed: int = 0
) -> tuple[DatasetBundle, torch.nn.Module, UnlearnData]:
    """An embedded data set at the table's size, its trained original model and what methods use."""
    n_train, n_test, default_epochs, options = SIZES[name]
    bundle = build_dataset(
        name, n_train=max(16, round(n_train * scale)), n_test=max(8, round(n_test * scale)),
        seed=seed, **options,
    )  # fmt: skip
    config = TrainConfig(epochs=epochs or default_epochs, batch_size=64, seed=seed)

    def make(tasks: list) -> torch.nn.Module:
        return create_model("small_cnn", tasks, bundle.in_channels, bundle.image_size)

    start = time.perf_counter()
    torch.manual_seed(seed)
    original = fit(make(bundle.tasks), bundle.train, None, bundle.tasks, config).model.eval()
    print(f"{name}: original trained in {time.perf_counter() - start:.0f}s", flush=True)
    reference = evaluate(original, bundle.test, bundle.tasks)["loss"]
    return bundle, original, UnlearnData(bundle.train, bundle.tasks, make, config, reference, seed)


def setting_request(
    bundle: DatasetBundle, setting: str, fraction: float, seed: int
) -> DeletionRequest:
    """A seeded random request: every task (full) or the first half of the tasks (partial)."""
    names = [t.name for t in bundle.tasks]
    targets = None if setting == "full" else names[: max(1, len(names) // 2)]
    return random_request(bundle.train.ids, bundle.tasks, fraction, targets, seed)


def compare_on_requests(
    bundle: DatasetBundle,
    original: torch.nn.Module,
    data: UnlearnData,
    setting: str,
    fraction: float,
    seeds: range,
    methods: dict[str, dict],
    label: str,
) -> list[Comparison]:
    """Every method on each seeded request of ``setting`` (one comparison per seed), with
    progress lines tagged ``label`` and the seed."""
    results = []
    for seed in seeds:
        request = setting_request(bundle, setting, fraction, seed)
        tag = f"{label}/request {seed}"
        result = compare(
            original, request, data, bundle.test, methods,
            progress=lambda m, tag=tag: print(f"  {tag} {m}", flush=True),
        )  # fmt: skip
        results.append(result)
    return results


def write_setting(
    folder: Path, summary: list[dict], per_task: list[dict], title: str, averaged: bool = False
) -> str:
    """summary.csv/md, per_task.csv/md and uis_vs_cost.png in ``folder`` (``averaged``: tables
    averaged over requests, with their extra columns); returns the summary table."""
    columns = AVERAGED_COLUMNS if averaged else SUMMARY_COLUMNS
    task_columns = (*TASK_COLUMNS, "runs") if averaged else TASK_COLUMNS
    atomic_write_text(folder / "summary.csv", to_csv(summary, columns))
    atomic_write_text(folder / "per_task.csv", to_csv(per_task, task_columns))
    plot_uis_against_cost(summary, title, folder / "uis_vs_cost.png")
    table = to_markdown(summary, columns)
    atomic_write_text(folder / "summary.md", table + "\n")
    atomic_write_text(folder / "per_task.md", to_markdown(per_task, task_columns) + "\n")
    return table


def verdict_row(name: str, setting: str, results: list[Comparison], summary: list[dict]) -> str:
    """Ours against the strongest baseline on the request-averaged ``summary``: the relative
    margin, the number of requests in which ours is below every baseline, and the paired
    per-request difference to that baseline (its UIS − ours: mean ± standard error, and in how
    many requests ours is below it), so that a margin can be told from noise."""
    exclude = ("retrain", *ABLATIONS)
    rival = best_baseline(summary, OURS, exclude=exclude)
    ours = next((r for r in summary if r["method"] == OURS), None)
    if ours is None or rival is None:  # --methods left ours or every baseline out
        missing = f"{OURS} not run" if ours is None else "no baseline run"
        return f"| {name} | {setting} | {missing} |" + " |" * 6
    theirs = next(r for r in summary if r["method"] == rival)
    change = (ours["uis_mean"] - theirs["uis_mean"]) / theirs["uis_mean"] * 100
    wins = sum(
        r.row(OURS)["uis_mean"] < r.row(best_baseline(r.summary, OURS, exclude))["uis_mean"]
        for r in results
    )
    gaps = [r.row(rival)["uis_mean"] - r.row(OURS)["uis_mean"] for r in results]
    error = statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else float("nan")
    below = sum(gap > 0 for gap in gaps)
    return (
        f"| {name} | {setting} | {ours['uis_mean']:.4f} | {rival} | {theirs['uis_mean']:.4f} | "
        f"{abs(change):.1f} % {'lower' if change < 0 else 'higher'} | {wins}/{len(results)} | "
        f"{statistics.mean(gaps):+.4f} ± {error:.4f} ({below}/{len(results)}) | "
        f"{ours['speedup_vs_retrain']:.1f}× |"
    )


def main(argv: list[str] | None = None) -> list[str]:
    """Train each original, run every method on each request of each setting, print and save
    the tables (averaged over the requests when there are several) and the verdict."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", default="synthetic,synthetic_dense")
    parser.add_argument("--settings", default="full,partial")
    parser.add_argument("--fraction", type=float, default=0.05, help="forget set size")
    parser.add_argument(
        "--requests",
        type=positive_int,
        default=1,
        help="deletion requests per setting, seeds --seed … --seed+N-1; the tables average them",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies n_train and n_test")
    parser.add_argument("--epochs", type=int, default=0, help="original's epochs (0: per data set)")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="the methods to compare (retrain, the oracle, and ours are always run)",
    )
    parser.add_argument("--ablations", action="store_true", help="add ours without each part")
    parser.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="override one method's option, e.g. interference_aware.steps=45",
    )
    parser.add_argument(
        "--no-tuned",
        action="store_true",
        help="signature defaults instead of raymtl/unlearn/tuned_defaults.yaml",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/unlearn-table")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    verdicts = [
        "| data set | setting | ours UIS | strongest baseline | its UIS | ours vs it "
        "| requests where ours is lowest | its UIS − ours per request (± s.e.; ours below it in) "
        "| ours' speed-up over retrain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    chosen = [m for m in args.methods.split(",") if m]
    unknown = sorted({m for m in chosen if m.split("@")[0] not in UNLEARN_METHODS.names()})
    if unknown:
        parser.error(f"--methods: unknown method(s) {', '.join(unknown)}")
    methods = {m: {} for m in dict.fromkeys(["retrain", *chosen, OURS])}
    if args.ablations:
        methods.update(ABLATIONS)
    for name, options in method_options(list(methods), args.method_option).items():
        methods[name].update(options)
    for name in args.datasets.split(","):
        bundle, original, data = prepare(name, args.scale, args.epochs, args.seed)
        for setting in args.settings.split(","):
            resolved = methods if args.no_tuned else resolve_method_options(methods, name, setting)
            folder = out / f"{name}-{setting}"
            title = f"{name}, {setting}-task unlearning: UIS against cost"
            seeds = range(args.seed, args.seed + args.requests)
            results = compare_on_requests(
                bundle, original, data, setting, args.fraction, seeds, resolved, f"{name}/{setting}"
            )
            for seed, result in zip(seeds, results, strict=True):
                where = folder / f"request-{seed}" if args.requests > 1 else folder
                table = write_setting(where, result.summary, result.per_task, title)
                size = len(result.request.forget_ids)
                print(f"\n{name}/{setting}/request {seed} ({size} instances):\n{table}\n")
            options = {m: results[0].logs[m]["options"] for m in resolved}
            atomic_write_text(folder / "options.yaml", yaml.safe_dump(options, sort_keys=False))
            summary = results[0].summary
            if args.requests > 1:
                summary = average_rows([r.summary for r in results], ("method",), ("uis_mean",))
                per_task = average_rows([r.per_task for r in results], ("method", "task"))
                table = write_setting(folder, summary, per_task, title, averaged=True)
                print(f"\n{name}, {setting}: mean over {args.requests} requests\n{table}\n")
            verdicts.append(verdict_row(name, setting, results, summary))
    text = "\n".join(verdicts)
    atomic_write_text(out / "verdict.md", text + "\n")
    print(text)
    return verdicts


if __name__ == "__main__":
    main()
