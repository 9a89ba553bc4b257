"""The study registry: each study names its searched parameters, objectives, data defaults, how
it prepares shared work once, its Tune function trainable, and how it reports its results.

Adding a study is adding one module that registers a ``Study`` subclass in ``STUDIES``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from raymtl.data.base import DatasetBundle, MultiTaskArrays
from raymtl.registry import Registry
from raymtl.rundir import RunDir

DRIVER_CPUS = 0.25  # a trial's own process mostly waits for its Train workers


@dataclass
class StudyInputs:
    """What every study gets: the data (train/val/test), the parsed options and the storage."""

    bundle: DatasetBundle
    train: MultiTaskArrays
    val: MultiTaskArrays
    args: argparse.Namespace
    storage: str
    space: Any  # the validated SearchSpace


class Study(ABC):
    """Base class. Subclasses set the class attributes and implement the three hooks."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    parameters: ClassVar[dict[str, str | None]] = {}  # searched name -> required type
    registries: ClassVar[dict[str, Registry]] = {}
    metrics: ClassVar[tuple[str, ...]] = ()
    modes: ClassVar[tuple[str, ...]] = ()
    asha_metric: ClassVar[str | None] = None  # None: the study cannot stop trials early
    default_scheduler: ClassVar[str] = "none"
    default_num_samples: ClassVar[int] = 8
    default_epochs: ClassVar[int] = 6
    default_batch_size: ClassVar[int] = 128
    data_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    small: ClassVar[dict[str, int]] = {}  # preset when no study is named (the quick default run)
    runs_train_jobs: ClassVar[bool] = True  # False: the trial computes in its own process

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Study-specific command-line options (none by default)."""
        return None  # optional hook

    def check(self, args: argparse.Namespace) -> None:
        """Cheap checks of study-specific options, before any data is built."""
        return None  # optional hook

    @abstractmethod
    def prepare(self, inputs: StudyInputs) -> dict[str, Any]:
        """Work shared by every trial, done once; returns the trainable's keyword arguments."""

    @staticmethod
    @abstractmethod
    def trainable(config: dict[str, Any], **shared: Any) -> None:
        """The Tune function trainable: one trial."""

    def resolved(self, inputs: StudyInputs) -> dict[str, Any]:
        """Study-specific part of the resolved config."""
        return {}

    @abstractmethod
    def summarise(
        self, rows: list[dict[str, Any]], run: RunDir, inputs: StudyInputs, space: Any
    ) -> None:
        """Write and print the study's result (best trial, Pareto front...)."""

    @staticmethod
    def train_failures(args: argparse.Namespace) -> int:
        """Worker failures a trial's Train run retries by itself; 0 when a scheduler may stop
        trials: Tune kills a stopped trial while its Train run shuts down, Train can take the
        dying worker for a failure and start a new worker group whose placement group then
        outlives the trial (Ray 2.60), holding CPUs later trials wait for forever. A worker
        failure there fails the trial, and Tune's trial retry resumes the same-named Train run
        from its last checkpoint instead."""
        return 0 if args.scheduler == "asha" else 2

    @property
    def multi_objective(self) -> bool:
        """Several objectives: Optuna's multi-objective sampling, a Pareto front."""
        return len(self.metrics) > 1


STUDIES: Registry[Study] = Registry("study")


def results_table(grid: Any, metrics: tuple[str, ...], epochs: int | None) -> list[dict[str, Any]]:
    """One row per trial: its config, how far it ran, and its last reported objectives."""
    rows = []
    for result in grid:
        reported = result.metrics or {}
        iterations = int(reported.get("training_iteration", 0))
        if result.error:
            status = "error"
        elif epochs is not None and iterations < epochs:
            status = "stopped early"
        else:
            status = "completed"
        row = {"trial_id": reported.get("trial_id", ""), "status": status, "epochs": iterations}
        row.update(dict(result.config or {}))
        for metric in (*metrics, "test/mean_score"):
            row[metric] = reported.get(metric, math.nan)
        row["_metrics"] = reported
        rows.append(row)
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    """CSV of the rows' public columns (keys starting with '_' are left out)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns and not k.startswith("_")]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def per_task_from_flat(metrics: dict[str, Any], prefix: str) -> dict[str, dict[str, float]]:
    """Invert flatten_metrics: {'test/<task>/<metric>': v} -> {task: {metric: v}}."""
    per_task: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == prefix:
            per_task.setdefault(parts[1], {})[parts[2]] = value
    return per_task


def pick_best(rows: list[dict[str, Any]], metric: str, mode: str = "max") -> dict[str, Any]:
    """Best trial by its last ``metric``, preferring trials that ran all their epochs."""
    scored = [r for r in rows if not math.isnan(r[metric])]
    if not scored:
        raise RuntimeError("no trial reported a result; see the Tune log above")
    completed = [r for r in scored if r["status"] == "completed"] or scored
    choose = max if mode == "max" else min
    return choose(completed, key=lambda r: r[metric])


def pareto_front(
    rows: list[dict[str, Any]], metrics: tuple[str, ...], modes: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Non-dominated completed trials (no other trial is as good in every objective and better in
    one), sorted by the first objective."""
    signs = [1.0 if mode == "min" else -1.0 for mode in modes]
    scored = [
        r for r in rows if r["status"] == "completed" and not any(math.isnan(r[m]) for m in metrics)
    ]

    def key(row: dict[str, Any]) -> list[float]:
        return [s * row[m] for s, m in zip(signs, metrics, strict=True)]

    front = []
    for row in scored:
        mine = key(row)
        dominated = any(
            all(o <= m for o, m in zip(key(other), mine, strict=True)) and key(other) != mine
            for other in scored
        )
        if not dominated:
            front.append(row)
    return sorted(front, key=key)
