"""The ``unlearn`` study: projection rank (or energy threshold), step size, steps and α of the
interference-aware method, minimising its mean UIS; cost is reported beside it.

The original model and the retrain oracle are trained once, before the trials, with the Ray-free
engine; each trial then runs the unlearning method in its own process (one device: unlearning
is a few dozen steps, far below what data parallelism pays for). Trials are compared on UIS
measured against the validation split; the clean-test UIS of every trial is reported beside it.
With ``--repeats N`` a trial averages N runs with successive batch-order seeds (one run's UIS is
noisy) and reports their spread; its seconds and sample passes are per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any, ClassVar

import torch

from raymtl.cli import positive_int
from raymtl.engine import TrainConfig, evaluate, fit
from raymtl.errors import ConfigError
from raymtl.models import create_model
from raymtl.rundir import RunDir
from raymtl.tune.study import STUDIES, Study, StudyInputs, pick_best
from raymtl.unlearn import UnlearnData, default_options, random_request, run_method
from raymtl.unlearn.evaluation import mean, measure, retrain_distance, uis

METHOD = "interference_aware"
OBJECTIVE = "val/uis_mean"
SETTINGS = ("full", "partial")


def _option_types() -> dict[str, str | None]:
    kinds = {bool: "categorical", str: "categorical", int: "int", float: "float"}
    return {k: kinds[type(v)] for k, v in default_options(METHOD).items()}


@STUDIES.register("unlearn")
class UnlearnStudy(Study):
    """Interference-aware unlearning's options against mean UIS on a fixed deletion request."""

    name = "unlearn"
    description = "unlearning: projection rank, step size, steps, alpha; minimise mean UIS"
    parameters: ClassVar[dict[str, str | None]] = _option_types()
    metrics = (OBJECTIVE,)
    modes = ("min",)
    default_num_samples = 24
    default_epochs = 40  # of the original model and of the retrain oracle
    runs_train_jobs = False
    # Contrast 0.3, 1,000 images, 40 epochs: the original memorises (benchmarks/unlearn_table.py).
    data_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "synthetic": {"n_train": 1100, "n_test": 500, "contrast": 0.3},
        "synthetic_dense": {"n_train": 550, "n_test": 250},
    }

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("unlearn study")
        group.add_argument(
            "--setting",
            choices=SETTINGS,
            default="full",
            help="full-task request, or partial (the first half of the tasks) (default: full)",
        )
        group.add_argument(
            "--forget-fraction",
            type=float,
            default=0.05,
            help="share of training instances to forget (default: 0.05)",
        )
        group.add_argument(
            "--original-epochs",
            type=positive_int,
            default=None,
            help="epochs of the original model and of retraining (default: --epochs, else 40)",
        )
        group.add_argument(
            "--repeats",
            type=positive_int,
            default=1,
            help="unlearning runs per trial, each with its own batch-order seed; the trial "
            "reports their mean (and spread). One run's UIS moves by about 0.01 with the seed "
            "alone, so use 3 or more when the choice matters (default: 1)",
        )

    def check(self, args: argparse.Namespace) -> None:
        if not 0 < args.forget_fraction < 1:
            raise ConfigError(f"--forget-fraction must be in (0, 1), got {args.forget_fraction}")

    def prepare(self, inputs: StudyInputs) -> dict[str, Any]:
        args, bundle = inputs.args, inputs.bundle
        tasks, train = bundle.tasks, inputs.train
        names = [t.name for t in tasks]
        targets = None if args.setting == "full" else names[: max(1, len(names) // 2)]
        request = random_request(train.ids, tasks, args.forget_fraction, targets, args.seed)
        config = TrainConfig(
            epochs=args.original_epochs or args.epochs,
            batch_size=64,
            seed=args.seed,
            device="cuda" if args.gpus_per_worker > 0 else "cpu",
        )

        def make(task_list: list) -> Any:
            return create_model(args.backbone, task_list, bundle.in_channels, bundle.image_size)

        print(f"training the original model ({config.epochs} epochs, {len(train)} samples)")
        original = fit(make(tasks), train, None, tasks, config).model.eval()
        reference = evaluate(original, bundle.test, tasks)["loss"]
        data = UnlearnData(train, tasks, make, config, reference, seed=args.seed)
        print("retraining without the forget set (the oracle)", flush=True)
        retrained = run_method("retrain", original, request, data)
        device = torch.device("cpu")
        reports = {
            split: {
                "original": measure(original, train, dataset, tasks, request, device),
                "retrain": measure(retrained.model, train, dataset, tasks, request, device),
            }
            for split, dataset in (("val", inputs.val), ("test", bundle.test))
        }
        shared = {
            "original": original.cpu(),
            "request": request,
            "data": data,
            "val": inputs.val,
            "test": bundle.test,
            "reports": reports,
            "retrain_seconds": retrained.log["seconds"],
            "threads": max(1, int(args.cpus_per_worker)),
            "repeats": getattr(args, "repeats", 1),
        }
        return {"shared": shared}

    @staticmethod
    def trainable(config: dict[str, Any], shared: Any = None) -> None:
        from ray import tune

        torch.set_num_threads(shared["threads"])
        options = {k: _cast(k, v) for k, v in config.items()}
        tune.report(score_options(options, shared, shared.get("repeats", 1)))

    def resolved(self, inputs: StudyInputs) -> dict[str, Any]:
        args = inputs.args
        return {
            "trial": {
                "method": METHOD,
                "fixed_options": default_options(METHOD),
                "setting": args.setting,
                "forget_fraction": args.forget_fraction,
                "original_epochs": args.original_epochs or args.epochs,
                "repeats": args.repeats,
                "backbone": args.backbone,
                "seed": args.seed,
            }
        }

    def summarise(
        self, rows: list[dict[str, Any]], run: RunDir, inputs: StudyInputs, space: Any
    ) -> None:
        best = pick_best(rows, OBJECTIVE, "min")
        searched = {k: best[k] for k in space.parameters}
        reported = best["_metrics"]
        summary = {
            "config": searched,
            "trial_id": best["trial_id"],
            OBJECTIVE: best[OBJECTIVE],
            "val/uis_sd": reported.get("val/uis_sd"),
            "repeats": reported.get("repeats"),
            "test/uis_mean": reported.get("test/uis_mean"),
            "test/retrain_distance": reported.get("test/retrain_distance"),
            "seconds": reported.get("seconds"),
            "speedup_vs_retrain": reported.get("speedup_vs_retrain"),
        }
        run.write_json("best.json", summary)
        print()
        spread = ""
        if (summary["repeats"] or 1) > 1:
            spread = f" (mean of {summary['repeats']} runs, sd {summary['val/uis_sd']:.4f})"
        print(f"Best trial {best['trial_id']}: {OBJECTIVE} = {best[OBJECTIVE]:.4f}{spread}")
        print("Best options: " + ", ".join(f"{k}={v}" for k, v in searched.items()))
        print(
            f"Clean-test mean UIS {summary['test/uis_mean']:.4f}, retrain distance "
            f"{summary['test/retrain_distance']:.4f}, {summary['seconds']:.1f} s "
            f"(speed-up over retraining: {summary['speedup_vs_retrain']:.1f}x)"
        )


def _score_once(options: dict[str, Any], shared: dict[str, Any], seed: int) -> dict[str, float]:
    """One unlearning run (batch order from ``seed``) and its UIS on the val and test splits."""
    request = shared["request"]
    data = dataclasses.replace(shared["data"], seed=seed)
    start = time.perf_counter()
    result = run_method(METHOD, shared["original"], request, data, options)
    seconds = time.perf_counter() - start
    metrics = {"seconds": seconds, "sample_passes": float(result.log["sample_passes"])}
    for split in ("val", "test"):
        report = measure(
            result.model, data.train, shared[split], data.tasks, request, data.device,
            membership=False,
        )  # fmt: skip
        base = shared["reports"][split]
        scores = uis(base["original"], report, request)
        metrics[f"{split}/uis_mean"] = mean(scores)
        metrics[f"{split}/uis_target"] = mean(scores, request.target_tasks)
        metrics[f"{split}/retrain_distance"] = mean(retrain_distance(report, base["retrain"]))
    metrics["test/mean_score"] = mean(report.test)
    return metrics


def score_options(
    options: dict[str, Any], shared: dict[str, Any], repeats: int = 1
) -> dict[str, Any]:
    """A trial's metrics: ``repeats`` unlearning runs with batch-order seeds seed, seed+1, …,
    averaged (one run's UIS is noisy); ``val/uis_sd`` is their spread (0 for one run)."""
    seed = shared["data"].seed
    runs = [_score_once(options, shared, seed + i) for i in range(repeats)]
    metrics: dict[str, Any] = {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}
    metrics["sample_passes"] = int(metrics["sample_passes"])  # per run, like seconds
    metrics["speedup_vs_retrain"] = shared["retrain_seconds"] / max(metrics["seconds"], 1e-9)
    metrics["val/uis_sd"] = statistics.stdev(r[OBJECTIVE] for r in runs) if repeats > 1 else 0.0
    metrics["repeats"] = repeats
    return metrics


def _cast(name: str, value: Any) -> Any:
    """Tune hands back numpy scalars; the method's option checks want the default's type."""
    kind = type(default_options(METHOD)[name])
    return kind(value.item() if hasattr(value, "item") else value)
