"""The ``mtlue`` study: λ1, λ2, ε and the base loss of MTL-UE, two objectives.

One trial = one Ray Train job (``protect_and_verify_loop``) that trains the generator and then a
fresh victim on the protected training split, in one worker group; the trial reports the victim's
clean-test mean score (mean balanced accuracy on classification tasks) and ε. Optuna's
multi-objective TPE minimises both; the study saves and prints the Pareto front. The clean run
that TAP and SEP attack is trained once, before the trials, and shared by all of them.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, ClassVar

from raymtl.cli import positive_int
from raymtl.engine import TrainConfig, fit
from raymtl.models import create_model
from raymtl.protect.bases import UE_BASES, SurrogateConfig
from raymtl.protect.run import ProtectConfig
from raymtl.registry import Registry
from raymtl.rundir import RunDir
from raymtl.tune.study import STUDIES, Study, StudyInputs, pareto_front, to_csv
from raymtl.tune.victim import device_name, trial_names, victim_loop_config, worker_spec

VICTIM_SCORE = "test/mean_score"
EPSILON = "epsilon_255"
DEFAULT_BASE = "sep"  # when the search space does not search the base


@STUDIES.register("mtlue")
class MTLUEStudy(Study):
    """Protection strength (victim accuracy) against visibility (ε): a Pareto front."""

    name = "mtlue"
    description = "MTL-UE: λ1, λ2, generator lr, ε, base; minimise victim clean-test score and ε (Pareto front)"
    parameters: ClassVar[dict[str, str | None]] = {
        "lambda1": "log_float",
        "lambda2": "log_float",
        "generator_lr": None,  # any numeric spec; absent: ProtectConfig's default
        EPSILON: "float",
        "base": "categorical",
    }
    registries: ClassVar[dict[str, Registry]] = {"base": UE_BASES}
    metrics = (VICTIM_SCORE, EPSILON)
    modes = ("min", "min")
    default_num_samples = 10
    default_epochs = 10
    default_batch_size = 32
    # Feature contrast 0.3 (at full contrast no method moves the victim at 8/255; README,
    # Protect) and 16-pixel images, so that a trial (generator + victim) takes about a minute on
    # one core while a clean victim still learns (about 0.73 mean balanced accuracy).
    data_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "synthetic": {"n_train": 2000, "n_test": 500, "contrast": 0.3, "image_size": 16}
    }
    small: ClassVar[dict[str, int]] = {
        "num_samples": 4,
        "n_train": 1500,
        "n_test": 400,
        "generator_epochs": 4,
    }

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("mtlue study")
        group.add_argument(
            "--generator-epochs",
            type=positive_int,
            default=None,
            help="generator epochs per trial (default: 6; 4 in the small default study)",
        )
        group.add_argument(
            "--clean-epochs",
            type=positive_int,
            default=6,
            help="epochs of the shared clean run that TAP and SEP attack (default: 6)",
        )

    def prepare(self, inputs: StudyInputs) -> dict[str, Any]:
        args, bundle = inputs.args, inputs.bundle
        surrogate = SurrogateConfig(
            backbone=args.backbone, clean_epochs=args.clean_epochs, seed=args.seed
        )
        searched = inputs.space.parameters.get("base")
        bases = set(searched.choices) if searched is not None else {DEFAULT_BASE}
        clean = None
        if bases & {"tap", "sep"}:
            from raymtl.protect.bases import clean_run

            print(f"training the shared clean run ({args.clean_epochs} epochs)", flush=True)
            clean = clean_run(
                bundle.tasks, bundle.in_channels, bundle.image_size, surrogate, inputs.train
            )
        victim = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
        print(f"training a clean victim for reference ({args.epochs} epochs)", flush=True)
        model = create_model(args.backbone, bundle.tasks, bundle.in_channels, bundle.image_size)
        self.clean_score = fit(model, inputs.train, bundle.test, bundle.tasks, victim).test[
            "mean_score"
        ]
        print(f"clean victim: clean-test mean score {self.clean_score:.4f}", flush=True)
        settings = {
            "clean_score": self.clean_score,
            "tasks": bundle.tasks,
            "in_channels": bundle.in_channels,
            "image_size": bundle.image_size,
            "backbone": args.backbone,
            "epochs": args.epochs,
            "generator_epochs": args.generator_epochs,
            "batch_size": args.batch_size,
            "device": device_name(args),
            "seed": args.seed,
            "surrogate": surrogate,
            "workers": worker_spec(args),
            "train_storage": f"{inputs.storage.rstrip('/')}/train",
        }
        data = {"train": inputs.train, "test": bundle.test, "clean_models": clean}
        return {"data": data, "settings": settings}

    @staticmethod
    def trainable(config: dict[str, Any], data: Any = None, settings: Any = None) -> None:
        from ray import tune

        from raymtl.scale.train import fetch_data, protect_and_verify

        trial_id, trial_dir = trial_names()
        splits = fetch_data(data)
        epsilon = float(config[EPSILON]) / 255
        protect_config = ProtectConfig(
            method="mtlue",
            base=str(config.get("base", DEFAULT_BASE)),
            epsilon=epsilon,
            lambda1=float(config["lambda1"]),
            lambda2=float(config["lambda2"]),
            lr=float(config.get("generator_lr", ProtectConfig.lr)),
            epochs=settings["generator_epochs"],
            batch_size=64,
            width=16,
            seed=settings["seed"],
            surrogate=settings["surrogate"],
        ).validate()
        victim = TrainConfig(
            epochs=settings["epochs"],
            batch_size=settings["batch_size"],
            device=settings["device"],
            seed=settings["seed"],
        )
        victim_config = victim_loop_config(settings, None, victim, f"{trial_dir}/victim")
        del victim_config["data"]  # the loop protects the training split itself
        result = protect_and_verify(
            {
                "data": {"train": splits["train"], "test": splits["test"]},
                "tasks": settings["tasks"],
                "in_channels": settings["in_channels"],
                "image_size": settings["image_size"],
                "protect": protect_config,
                "clean_models": splits["clean_models"],
                "tensorboard_dir": f"{trial_dir}/generator",
                "victim": victim_config,
            },
            settings["workers"],
            f"trial-{trial_id}",
            settings["train_storage"],
        )
        if result.error:
            raise result.error
        metrics = dict(result.metrics)
        metrics[EPSILON] = float(config[EPSILON])
        metrics["clean_score"] = settings["clean_score"]
        tune.report(metrics)

    def resolved(self, inputs: StudyInputs) -> dict[str, Any]:
        args = inputs.args
        return {
            "trial": {
                "backbone": args.backbone,
                "victim_epochs": args.epochs,
                "generator_epochs": args.generator_epochs,
                "clean_epochs": args.clean_epochs,
                "batch_size": args.batch_size,
                "device": device_name(args),
                "seed": args.seed,
            }
        }

    def summarise(
        self, rows: list[dict[str, Any]], run: RunDir, inputs: StudyInputs, space: Any
    ) -> None:
        front = pareto_front(rows, self.metrics, self.modes)
        columns = ["trial_id", *space.parameters, VICTIM_SCORE]
        run.write_text("pareto.csv", to_csv([{c: r[c] for c in columns} for r in front]))
        plot_pareto(rows, front, run.path / "pareto.png", self.clean_score)
        print()
        print(
            f"A victim trained on clean data scores {self.clean_score:.4f} on the clean test set."
        )
        print(
            f"Pareto front ({len(front)} of {len(rows)} trials): victim clean-test mean score vs ε"
        )
        header = (
            "| ε (/255) | victim clean-test mean score | base | λ1 | λ2 | generator lr | trial |"
        )
        print(header)
        print("|---|---|---|---|---|---|---|")
        for r in front:
            print(
                f"| {r[EPSILON]:.2f} | {r[VICTIM_SCORE]:.4f} | {r.get('base', '')} | "
                f"{r.get('lambda1', math.nan):.3g} | {r.get('lambda2', math.nan):.3g} | "
                f"{r.get('generator_lr', ProtectConfig.lr):.2g} | {r['trial_id']} |"
            )
        print(f"Pareto front: {run.path / 'pareto.csv'} and {run.path / 'pareto.png'}")
        run.write_json(
            "pareto.json",
            {"clean_score": self.clean_score, "front": [{c: r[c] for c in columns} for r in front]},
        )


def plot_pareto(
    rows: list[dict[str, Any]], front: list[dict[str, Any]], path: Any, clean_score: float
) -> None:
    """Every trial as a point (ε, victim score); the front as a step line; the clean victim."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raymtl.io import atomic_write_bytes

    done = [r for r in rows if r["status"] == "completed"]
    figure, axis = plt.subplots(figsize=(5, 3.6))
    axis.scatter(
        [r[EPSILON] for r in done], [r[VICTIM_SCORE] for r in done], c="#999", label="trial"
    )
    ordered = sorted(front, key=lambda r: r[EPSILON])
    axis.step(
        [r[EPSILON] for r in ordered],
        [r[VICTIM_SCORE] for r in ordered],
        where="post",
        c="#c00",
        marker="o",
        label="Pareto front",
    )
    axis.axhline(clean_score, c="#06c", ls="--", label="clean victim")
    axis.set_xlabel("ε (×1/255)")
    axis.set_ylabel("victim clean-test mean score")
    axis.legend()
    figure.tight_layout()
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
