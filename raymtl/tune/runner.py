"""Run a Tune study with OptunaSearch and ASHA on a local or attached Ray cluster."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune
from ray.tune import CLIReporter
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from raymtl.search_space import SearchSpace


def tune_domain(space: SearchSpace) -> dict[str, Any]:
    """Tune sampling domains for a validated search space."""
    domains: dict[str, Any] = {}
    for name, p in space.parameters.items():
        if p.type == "categorical":
            domains[name] = tune.choice(list(p.choices))
        elif p.type == "log_float":
            domains[name] = tune.loguniform(p.low, p.high)
        elif p.type == "float":
            domains[name] = tune.uniform(p.low, p.high)
        else:
            domains[name] = tune.randint(int(p.low), int(p.high) + 1)
    return domains


def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` or start a local cluster; return True if this call started Ray."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # The dashboard (bound to localhost only) runs the State API that frees placement groups
        # of trials ASHA stops early; without it nested Train runs can wait forever.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    return True


@dataclass
class StudySpec:
    """Everything ``run_study`` needs besides the trainable."""

    name: str
    storage_path: str
    metric: str
    mode: str
    space: SearchSpace
    num_samples: int
    max_concurrent: int
    cpus_per_trial: float
    gpus_per_trial: float
    scheduler: str
    max_epochs: int
    grace_period: int
    seed: int


def run_study(trainable: Callable[..., None], spec: StudySpec, **shared: Any) -> tune.ResultGrid:
    """Run the study; ``shared`` objects are put in the object store once (tune.with_parameters)."""
    searcher = OptunaSearch(
        metric=spec.metric,
        mode=spec.mode,
        points_to_evaluate=[spec.space.defaults()],
        seed=spec.seed,
    )
    if spec.scheduler == "asha":
        scheduler: Any = ASHAScheduler(
            time_attr="training_iteration",
            max_t=spec.max_epochs,
            grace_period=min(spec.grace_period, spec.max_epochs),
            reduction_factor=2,
        )
    else:
        scheduler = FIFOScheduler()
    resources = {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial}
    # Ray's classic progress table with the columns that matter; the newer output engine would
    # print every per-task metric of every result.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    reporter = CLIReporter(
        parameter_columns=list(spec.space.parameters),
        metric_columns={
            "epoch": "epoch",
            "train/loss": "train loss",
            spec.metric: spec.metric,
            "test/mean_score": "test/mean_score",
        },
        max_report_frequency=15,
        sort_by_metric=True,
    )
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, **shared), resources),
        param_space=tune_domain(spec.space),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=spec.storage_path, verbose=1, progress_reporter=reporter
        ),
    )
    return tuner.fit()


def default_max_concurrent(cpus_per_trial: float, gpus_per_trial: float) -> int:
    """Trials that fit at once on the cluster's resources (the scarcer resource decides)."""
    available = ray.cluster_resources()
    limits = [math.floor(available.get("CPU", 1) / cpus_per_trial)] if cpus_per_trial > 0 else []
    if gpus_per_trial > 0:
        limits.append(math.floor(available.get("GPU", 0) / gpus_per_trial))
    return max(1, min(limits) if limits else 1)
