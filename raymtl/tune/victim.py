"""The ``victim`` study: Optuna (TPE) + ASHA over victim-training hyperparameters.

Each Tune trial trains one multi-task model with the Ray-free engine and reports validation and
clean-test metrics every epoch; trials are compared on the validation split, never on test.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from raymtl.data.base import DatasetBundle, MultiTaskArrays
from raymtl.engine import TrainConfig, evaluate, fit, flatten_metrics, resolve_device
from raymtl.models import create_model
from raymtl.weighting import WEIGHTINGS

METRIC = "val/mean_score"
MODE = "max"
PARAMETERS: dict[str, str | None] = {
    "lr": "log_float",
    "weight_decay": "log_float",
    "weighting": "categorical",
    "batch_size": "int",
}
REGISTRIES = {"weighting": WEIGHTINGS}


def train_victim_trial(
    config: dict[str, Any],
    train: MultiTaskArrays,
    val: MultiTaskArrays,
    test: MultiTaskArrays,
    settings: dict[str, Any],
) -> None:
    """Tune function trainable: train with ``config`` and report metrics after every epoch."""
    torch.set_num_threads(max(1, int(settings["cpus_per_trial"])))
    tasks = settings["tasks"]
    train_config = TrainConfig(
        epochs=settings["epochs"],
        batch_size=int(config.get("batch_size", settings["batch_size"])),
        lr=float(config["lr"]),
        weight_decay=float(config.get("weight_decay", 0.0)),
        weighting=str(config.get("weighting", "ls")),
        device=settings["device"],
        seed=settings["seed"],
    )
    model = create_model(
        settings["backbone"], tasks, settings["in_channels"], settings["image_size"]
    )
    device = resolve_device(settings["device"])

    def report(epoch: int, row: dict[str, float]) -> None:
        metrics = dict(row)
        metrics.update(flatten_metrics("val", evaluate(model, val, tasks, 256, device)))
        if epoch == train_config.epochs:
            with tempfile.TemporaryDirectory() as folder:
                torch.save(
                    {"model": model.state_dict(), "config": config}, Path(folder) / "model.pt"
                )
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        else:
            tune.report(metrics)

    fit(model, train, test, tasks, train_config, report)


def study_settings(bundle: DatasetBundle, args: Any) -> dict[str, Any]:
    """Fixed (not searched) settings every trial shares."""
    return {
        "tasks": bundle.tasks,
        "in_channels": bundle.in_channels,
        "image_size": bundle.image_size,
        "backbone": args.backbone,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "device": "cuda" if args.gpus_per_trial > 0 else "cpu",
        "cpus_per_trial": args.cpus_per_trial,
        "seed": args.seed,
    }
