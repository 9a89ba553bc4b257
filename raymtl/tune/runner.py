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
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from raymtl.errors import ConfigError
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


class FinishingASHA(ASHAScheduler):
    """ASHA that lets a trial end its last epoch by itself instead of stopping it there.

    Plain ASHA stops every trial that reaches ``max_t``. Stopping a trial kills its actor while
    the nested Train run is still shutting down; Train can take the dying worker for a failure,
    start a new worker group and lose that group's placement group with the trial, and the
    leaked CPUs starve later trials and Ray Data (a test suite hung on it). Rung decisions
    before the last epoch are ASHA's own."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(stop_last_trials=False, **kwargs)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        """ASHA's decision, except CONTINUE at (or past) ``max_t``: the trial ends on its own."""
        action = super().on_trial_result(tune_controller, trial, result)
        if result.get(self._time_attr, 0) >= self._max_t:
            if action == TrialScheduler.STOP:
                self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action


@dataclass
class StudySpec:
    """Everything ``run_study`` needs besides the trainable."""

    name: str
    storage_path: str
    metrics: tuple[str, ...]
    modes: tuple[str, ...]
    space: SearchSpace
    num_samples: int
    max_concurrent: int
    trial_resources: dict[str, float]
    scheduler: str
    max_epochs: int
    grace_period: int
    seed: int
    asha_metric: str | None = None
    algorithm: str = "tpe"  # tpe | random
    resume: bool = False
    progress_metrics: tuple[str, ...] = ()
    trial_retries: int = 2


def make_sampler(algorithm: str, seed: int, multi_objective: bool) -> Any:
    """Optuna sampler: TPE (multi-objective when there are several objectives) or random."""
    import optuna

    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # TPE models the objective after 5 trials (Optuna's default, 10, would leave short studies
    # almost entirely to random sampling).
    return optuna.samplers.TPESampler(
        seed=seed, multivariate=not multi_objective, n_startup_trials=5
    )


def experiment_path(spec: StudySpec) -> str:
    """Where Tune keeps the study (what ``--resume`` restores)."""
    return f"{spec.storage_path.rstrip('/')}/{spec.name}"


def run_study(trainable: Callable[..., None], spec: StudySpec, **shared: Any) -> tune.ResultGrid:
    """Run (or, with ``spec.resume``, restore and finish) the study; ``shared`` objects are put in
    the object store once (tune.with_parameters)."""
    wrapped = tune.with_resources(tune.with_parameters(trainable, **shared), spec.trial_resources)
    if spec.resume:
        path = experiment_path(spec)
        if not tune.Tuner.can_restore(path):
            raise ConfigError(f"--resume: no study to resume at {path}")
        return tune.Tuner.restore(path, trainable=wrapped, resume_errored=True).fit()
    multi = len(spec.metrics) > 1
    searcher = OptunaSearch(
        metric=list(spec.metrics) if multi else spec.metrics[0],
        mode=list(spec.modes) if multi else spec.modes[0],
        points_to_evaluate=[spec.space.defaults()],
        sampler=make_sampler(spec.algorithm, spec.seed, multi),
    )
    if spec.scheduler == "asha" and spec.asha_metric is not None:
        scheduler: Any = FinishingASHA(
            time_attr="training_iteration",
            metric=spec.asha_metric,
            mode=spec.modes[list(spec.metrics).index(spec.asha_metric)],
            max_t=spec.max_epochs,
            grace_period=min(spec.grace_period, spec.max_epochs),
            reduction_factor=2,
        )
    else:
        scheduler = FIFOScheduler()
    # Ray's classic progress table with the columns that matter; the newer output engine would
    # print every per-task metric of every result.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    columns = {m: m for m in (*spec.progress_metrics, *spec.metrics)}
    reporter = CLIReporter(
        parameter_columns=list(spec.space.parameters),
        metric_columns=columns,
        max_report_frequency=15,
        sort_by_metric=not multi,
        metric=None if multi else spec.metrics[0],
        mode=None if multi else spec.modes[0],
    )
    tuner = tune.Tuner(
        wrapped,
        param_space=tune_domain(spec.space),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=spec.storage_path,
            verbose=1,
            progress_reporter=reporter,
            # a trial whose node is lost (spot reclaim, crash) is started again elsewhere
            failure_config=tune.FailureConfig(max_failures=spec.trial_retries),
        ),
    )
    return tuner.fit()


def default_max_concurrent(cpus_per_trial: float, gpus_per_trial: float) -> int:
    """Trials that fit at once on the cluster's resources (the scarcer resource decides)."""
    available = ray.cluster_resources()
    cpus_per_trial = round(cpus_per_trial, 6)
    limits = [math.floor(available.get("CPU", 1) / cpus_per_trial)] if cpus_per_trial > 0 else []
    if gpus_per_trial > 0:
        limits.append(math.floor(available.get("GPU", 0) / gpus_per_trial))
    return max(1, min(limits) if limits else 1)
