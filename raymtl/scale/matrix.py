"""The victim matrix under Ray: every (cell, training set) job of ``raymtl.matrix`` becomes one
Ray Tune trial (a grid over the jobs), so a cluster trains the victims side by side.

A trial runs the core's ``run_job`` in its own process with the CPUs (and GPUs) it was given;
the shared ``MatrixInputs`` (training sets, test set, model factory, recipe) go to the object
store once (``tune.with_parameters``). Rows come back in table order; a failed job is named,
not dropped silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray import tune

from raymtl.matrix import Job, MatrixInputs, run_job
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
    config: dict[str, Any], *, jobs: Sequence[Job], inputs: MatrixInputs, threads: int
) -> None:
    """One trial: train and evaluate one job's victim, report its row."""
    torch.set_num_threads(threads)
    row = run_job(jobs[int(config[JOB_KEY])], inputs)
    tune.report(
        {"mean_score": row["mean_score"], "seconds": row["seconds"], ROW_KEY: json.dumps(row)}
    )


def trial_name(jobs: Sequence[Job], index: int) -> str:
    """A trial's name (and folder): its job number, cell and training set, e.g.
    ``003-small_cnn-mtl-uw-jpeg-protected``."""
    job = jobs[index]
    cell = job.cell
    parts = [f"{index:03d}", cell.backbone, cell.mode]
    parts += [cell.weighting] if cell.mode == "mtl" else []  # STL has no task weighting
    return "-".join([*parts, cell.defence, job.data])


def run_jobs_as_trials(
    jobs: Sequence[Job],
    inputs: MatrixInputs,
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
                inputs=inputs,
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
                trial_name_creator=lambda trial: trial_name(jobs, int(trial.config[JOB_KEY])),
                trial_dirname_creator=lambda trial: trial_name(jobs, int(trial.config[JOB_KEY])),
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
