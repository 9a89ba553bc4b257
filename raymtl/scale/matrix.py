"""The victim matrix under Ray: every (cell, training set) job of ``raymtl.matrix`` becomes one
Ray Tune trial (a grid over the jobs), so a cluster trains the victims side by side.

A trial runs the core's ``run_job`` in its own process with the CPUs (and GPUs) it was given;
the training sets, the test set and the model factory go to the object store once
(``tune.with_parameters``). Rows come back in table order; a failed job is named, not dropped
silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray import tune
from torch.utils.data import Dataset

from raymtl.engine import TrainConfig
from raymtl.matrix import Job, run_job
from raymtl.tasks import TaskSpec
from raymtl.tune.runner import default_max_concurrent, start_ray

JOB_KEY = "job"
ROW_KEY = "row"  # the whole table row, as JSON (keeps its columns and their order)


@dataclass
class TrialResources:
    """What each matrix trial gets and how many run at once (None: as many as fit)."""

    cpus: float = 1.0
    gpus: float = 0.0
    max_concurrent: int | None = None


def _trainable(
    config: dict[str, Any],
    jobs: Sequence[Job] = (),
    datasets: dict[str, Dataset] | None = None,
    test: Dataset | None = None,
    tasks: Sequence[TaskSpec] = (),
    make_model: Callable[[str, list[TaskSpec]], Any] | None = None,
    base: TrainConfig | None = None,
    threads: int = 1,
) -> None:
    """One trial: train and evaluate one job's victim, report its row."""
    torch.set_num_threads(threads)
    job = jobs[int(config[JOB_KEY])]
    assert datasets is not None and base is not None and make_model is not None
    row = run_job(job, datasets[job.data], test, tasks, make_model, base)
    tune.report(
        {"mean_score": row["mean_score"], "seconds": row["seconds"], ROW_KEY: json.dumps(row)}
    )


def run_jobs_as_trials(
    jobs: Sequence[Job],
    datasets: dict[str, Dataset],
    test: Dataset,
    tasks: Sequence[TaskSpec],
    make_model: Callable[[str, list[TaskSpec]], Any],
    base: TrainConfig,
    storage_path: str,
    resources: TrialResources,
    address: str | None = None,
) -> tuple[list[dict[str, Any] | None], list[str]]:
    """Run every job as a Tune trial on a local or attached cluster; (rows in job order, None
    for a failed job; the failed jobs' error lines)."""
    started = start_ray(address)
    try:
        wrapped = tune.with_resources(
            tune.with_parameters(
                _trainable,
                jobs=list(jobs),
                datasets=datasets,
                test=test,
                tasks=list(tasks),
                make_model=make_model,
                base=base,
                threads=max(1, int(resources.cpus)),
            ),
            {"cpu": resources.cpus, "gpu": resources.gpus},
        )
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        tuner = tune.Tuner(
            wrapped,
            param_space={JOB_KEY: tune.grid_search(list(range(len(jobs))))},
            tune_config=tune.TuneConfig(
                num_samples=1,
                max_concurrent_trials=resources.max_concurrent
                or default_max_concurrent(resources.cpus, resources.gpus),
            ),
            run_config=tune.RunConfig(
                name="matrix",
                storage_path=storage_path,
                verbose=1,
                progress_reporter=tune.CLIReporter(
                    parameter_columns=[JOB_KEY],
                    metric_columns={"mean_score": "mean score", "seconds": "seconds"},
                    max_report_frequency=15,
                ),
            ),
        )
        grid = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    rows: list[dict[str, Any] | None] = [None] * len(jobs)
    errors: list[str] = []
    for result in grid:
        index = int((result.config or {})[JOB_KEY])
        if result.error is not None:
            errors.append(f"{jobs[index].cell.name} [{jobs[index].data}]: {result.error}")
            continue
        rows[index] = json.loads((result.metrics or {})[ROW_KEY])
    return rows, errors
