"""Run several unlearning methods on one request and compare them with the original and retrain:
per-task rows, a summary row per method, CSV and Markdown."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from raymtl.unlearn.base import UnlearnData, run_method
from raymtl.unlearn.evaluation import ModelReport, mean, measure, retrain_distance, uis
from raymtl.unlearn.request import DeletionRequest

SUMMARY_COLUMNS = (
    "method", "uis_mean", "uis_target", "uis_non_target", "test", "forget_target", "retain",
    "mia_loss_auc", "mia_confidence_auc", "mia_calibrated_auc", "retrain_distance", "seconds",
    "sample_passes", "speedup_vs_retrain",
)  # fmt: skip
TASK_COLUMNS = (
    "method", "task", "role", "test", "forget", "retain", "uis", "retrain_distance",
    "mia_loss_auc", "mia_confidence_auc", "mia_calibrated_auc", "mia_calibrated_low",
    "mia_calibrated_high",
)  # fmt: skip


@dataclass
class Comparison:
    """Everything a comparison measured."""

    request: DeletionRequest
    original: ModelReport
    reports: dict[str, ModelReport] = field(default_factory=dict)
    logs: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: list[dict[str, Any]] = field(default_factory=list)
    per_task: list[dict[str, Any]] = field(default_factory=list)

    def row(self, method: str) -> dict[str, Any]:
        """The summary row of ``method``."""
        return next(r for r in self.summary if r["method"] == method)


def compare(
    original: nn.Module,
    request: DeletionRequest,
    data: UnlearnData,
    test: Any,
    methods: dict[str, dict[str, Any]],
    progress: Callable[[str], None] | None = None,
) -> Comparison:
    """Run each method (name -> options; 'retrain' first when present) and measure it."""
    device = data.device
    original.to(device).eval()
    result = Comparison(request, measure(original, data.train, test, data.tasks, request, device))
    order = sorted(methods, key=lambda name: name != "retrain")
    for name in order:
        run = run_method(name.split("@")[0], original, request, data, methods[name])
        result.logs[name] = run.log
        result.reports[name] = measure(run.model, data.train, test, data.tasks, request, device)
        if progress is not None:
            progress(f"{name}: done in {run.log['seconds']:.1f}s")
    _tabulate(result)
    return result


def _tabulate(result: Comparison) -> None:
    request, original = result.request, result.original
    targets = request.target_tasks
    non_targets = [t for t in original.test if t not in targets]
    retrained = result.reports.get("retrain")
    retrain_seconds = result.logs.get("retrain", {}).get("seconds")
    entries = [("original", original, {})] + [
        (name, report, result.logs[name]) for name, report in result.reports.items()
    ]
    for name, report, log in entries:
        scores = uis(original, report, request)
        distance = retrain_distance(report, retrained) if retrained is not None else {}
        result.summary.append(
            {
                "method": name,
                "uis_mean": mean(scores),
                "uis_target": mean(scores, targets),
                "uis_non_target": mean(scores, non_targets) if non_targets else math.nan,
                "test": mean(report.test),
                "forget_target": mean(report.forget, targets),
                "retain": mean(report.retain),
                "mia_loss_auc": mean(report.mia_loss),
                "mia_confidence_auc": mean(report.mia_confidence),
                "mia_calibrated_auc": mean({t: v[0] for t, v in report.mia_calibrated.items()}),
                "retrain_distance": mean(distance) if distance else math.nan,
                "seconds": log.get("seconds", math.nan),
                "sample_passes": log.get("sample_passes", math.nan),
                "speedup_vs_retrain": (
                    retrain_seconds / log["seconds"]
                    if retrain_seconds and log.get("seconds")
                    else math.nan
                ),
            }
        )
        for task in report.test:
            result.per_task.append(
                {
                    "method": name,
                    "task": task,
                    "role": "target" if task in targets else "non-target",
                    "test": report.test[task],
                    "forget": report.forget[task],
                    "retain": report.retain[task],
                    "uis": scores[task],
                    "retrain_distance": distance.get(task, math.nan),
                    "mia_loss_auc": report.mia_loss.get(task, math.nan),
                    "mia_confidence_auc": report.mia_confidence.get(task, math.nan),
                    "mia_calibrated_auc": report.mia_calibrated.get(task, (math.nan,) * 3)[0],
                    "mia_calibrated_low": report.mia_calibrated.get(task, (math.nan,) * 3)[1],
                    "mia_calibrated_high": report.mia_calibrated.get(task, (math.nan,) * 3)[2],
                }
            )


def to_csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """Rows as CSV text with the given column order."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def to_markdown(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """Rows as a Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def scalars(result: Comparison) -> dict[str, float]:
    """TensorBoard scalars: unlearn/<method>/<summary column>."""
    out = {}
    for row in result.summary:
        for key, value in row.items():
            if key != "method" and isinstance(value, int | float) and not math.isnan(value):
                out[f"unlearn/{row['method']}/{key}"] = float(value)
    return out


def best_baseline(
    summary: list[dict[str, Any]], ours: str, exclude: tuple[str, ...] = ("retrain",)
) -> str | None:
    """The baseline with the lowest mean UIS in ``summary`` rows (retrain, the oracle, and
    ``ours`` with its variants left out); None when no baseline was run."""
    rows = [
        r for r in summary
        if r["method"] not in (*exclude, ours, "original") and not r["method"].startswith(ours)
    ]  # fmt: skip
    return min(rows, key=lambda r: r["uis_mean"])["method"] if rows else None


def average_rows(
    tables: list[list[dict[str, Any]]], keys: tuple[str, ...], spread: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Rows of several tables of the same layout (one per deletion request) averaged per ``keys``
    (e.g. method, or method and task): each numeric column's mean over the tables, NaNs skipped;
    each column in ``spread`` also gets ``<column>_sd``, its sample standard deviation; ``runs``
    counts the tables that held the row. Row order follows the first table."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for table in tables:
        for row in table:
            groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for rows in groups.values():
        merged: dict[str, Any] = {}
        for column, first in rows[0].items():
            if column in keys or not isinstance(first, int | float) or isinstance(first, bool):
                merged[column] = first
                continue
            values = [float(r[column]) for r in rows if not math.isnan(float(r[column]))]
            merged[column] = sum(values) / len(values) if values else math.nan
            if column in spread:
                merged[f"{column}_sd"] = statistics.stdev(values) if len(values) > 1 else math.nan
        merged["runs"] = len(rows)
        out.append(merged)
    return out


def plot_uis_against_cost(summary: list[dict[str, Any]], title: str, path: Any) -> None:
    """A PNG: each method's mean UIS against its wall time (log scale), retrain marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary if r["method"] != "original" and r["seconds"] > 0]
    figure, axes = plt.subplots(figsize=(6, 4))
    for row in rows:
        marker = "*" if row["method"] == "retrain" else "o"
        axes.scatter(row["seconds"], row["uis_mean"], marker=marker, s=60)
        axes.annotate(row["method"], (row["seconds"], row["uis_mean"]), fontsize=7)
    axes.set_xscale("log")
    axes.set_xlabel("wall time (s, log scale)")
    axes.set_ylabel("mean UIS (lower is better)")
    axes.set_title(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    from raymtl.io import atomic_write_bytes

    atomic_write_bytes(path, buffer.getvalue())
