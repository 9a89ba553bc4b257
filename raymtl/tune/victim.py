"""The ``victim`` study: Optuna (TPE) + ASHA over victim-training hyperparameters.

Each trial runs one Ray Train job (``raymtl.scale.train.victim_loop``) on ``--workers-per-trial``
workers; Train forwards every epoch's validation and clean-test metrics to Tune, so ASHA can stop
the trial. Trials are compared on the validation split, never on test.
"""

from __future__ import annotations

from typing import Any, ClassVar

from raymtl.engine import TrainConfig
from raymtl.registry import Registry
from raymtl.rundir import RunDir
from raymtl.tune.study import STUDIES, Study, StudyInputs, per_task_from_flat, pick_best
from raymtl.weighting import WEIGHTINGS


def worker_spec(args: Any) -> Any:
    """The Train workers of one trial, from the command line."""
    from raymtl.scale.train import WorkerSpec

    return WorkerSpec(args.workers_per_trial, args.cpus_per_worker, args.gpus_per_worker)


def trial_names() -> tuple[str, str]:
    """(trial id, trial directory) of the running Tune trial; Train runs are named after it, so a
    restored study resumes a trial's Train run from its last checkpoint."""
    from ray import tune

    context = tune.get_context()
    return context.get_trial_id(), context.get_trial_dir()


def device_name(args: Any) -> str:
    """Where Train workers compute: CUDA when the trial asks for GPUs."""
    return "cuda" if args.gpus_per_worker > 0 else "cpu"


def victim_loop_config(
    settings: dict[str, Any], data: Any, train_config: TrainConfig, tensorboard_dir: str
) -> dict[str, Any]:
    """The ``victim_loop`` configuration of a trial, from the study's fixed settings."""
    return {
        "data": data,
        "tasks": settings["tasks"],
        "backbone": settings["backbone"],
        "in_channels": settings["in_channels"],
        "image_size": settings["image_size"],
        "train": train_config.to_dict(),
        "tensorboard_dir": tensorboard_dir,
    }


@STUDIES.register("victim")
class VictimStudy(Study):
    """Learning rate, weight decay and task weighting of multi-task victim training."""

    name = "victim"
    description = "victim training: learning rate, weight decay, task weighting (ASHA)"
    parameters: ClassVar[dict[str, str | None]] = {
        "lr": "log_float",
        "weight_decay": "log_float",
        "weighting": "categorical",
        "batch_size": "int",
    }
    registries: ClassVar[dict[str, Registry]] = {"weighting": WEIGHTINGS}
    metrics = ("val/mean_score",)
    modes = ("max",)
    asha_metric = "val/mean_score"
    default_scheduler = "asha"
    default_num_samples = 8
    default_epochs = 6
    data_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "synthetic": {"n_train": 4000, "n_test": 1000}
    }

    def prepare(self, inputs: StudyInputs) -> dict[str, Any]:
        args = inputs.args
        data = {"train": inputs.train, "val": inputs.val, "test": inputs.bundle.test}
        settings = {
            "tasks": inputs.bundle.tasks,
            "in_channels": inputs.bundle.in_channels,
            "image_size": inputs.bundle.image_size,
            "backbone": args.backbone,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "device": device_name(args),
            "seed": args.seed,
            "workers": worker_spec(args),
            "train_failures": self.train_failures(args),
            "train_storage": f"{inputs.storage.rstrip('/')}/train",
        }
        return {"data": data, "settings": settings}

    @staticmethod
    def trainable(config: dict[str, Any], data: Any = None, settings: Any = None) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from raymtl.scale.train import train_victim

        trial_id, trial_dir = trial_names()
        train_config = TrainConfig(
            epochs=settings["epochs"],
            batch_size=int(config.get("batch_size", settings["batch_size"])),
            lr=float(config["lr"]),
            weight_decay=float(config.get("weight_decay", 0.0)),
            weighting=str(config.get("weighting", "ls")),
            device=settings["device"],
            seed=settings["seed"],
        )
        loop = victim_loop_config(settings, data, train_config, f"{trial_dir}/train")
        result = train_victim(
            loop,
            settings["workers"],
            f"victim-{trial_id}",
            settings["train_storage"],
            max_failures=settings.get("train_failures", 2),
            callbacks=[TuneReportCallback()],
        )
        if result.error:
            raise result.error

    def resolved(self, inputs: StudyInputs) -> dict[str, Any]:
        args = inputs.args
        return {
            "trial": {
                "backbone": args.backbone,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "device": device_name(args),
                "seed": args.seed,
            }
        }

    def summarise(
        self, rows: list[dict[str, Any]], run: RunDir, inputs: StudyInputs, space: Any
    ) -> None:
        from raymtl.cli import format_task_table

        metric = self.metrics[0]
        best = pick_best(rows, metric, self.modes[0])
        test_per_task = per_task_from_flat(best["_metrics"], "test")
        best_config = {k: v for k, v in best.items() if k in space.parameters}
        run.write_json(
            "best.json",
            {
                "config": best_config,
                "trial_id": best["trial_id"],
                "epochs": best["epochs"],
                metric: best[metric],
                "test": {"mean_score": best["test/mean_score"], "tasks": test_per_task},
            },
        )
        table = format_task_table(test_per_task, inputs.bundle.tasks)
        run.write_text("best_test_metrics.md", table + "\n")
        print()
        print(
            f"Best trial {best['trial_id']} ({best['epochs']} epochs), chosen on {metric} = {best[metric]:.4f}"
        )
        print("Best config: " + ", ".join(f"{k}={v}" for k, v in best_config.items()))
        print("Clean test metrics per task:")
        print(table)
        print(
            f"Mean test score (mean of each task's primary metric): {best['test/mean_score']:.4f}"
        )
