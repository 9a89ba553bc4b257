"""What one Ray Train job costs before and after its training: an empty TorchTrainer job (one
worker, one report) timed with Ray Train's default 2 s worker poll and with raymtl's 0.5 s,
side by side in one run. Wall time from fit() to result, and the CPU seconds the whole machine
spent meanwhile (controller, worker and helper actor processes; Linux /proc/stat).

This is why an ``mtlue`` trial runs one Train job (generator, then victim) instead of two.

Usage: python benchmarks/train_startup.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

INTERVALS = ("2.0", "0.5")  # Ray Train's default, raymtl's default


def machine_cpu_seconds() -> float:
    """User + nice + system CPU seconds of every core since boot."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:4]]
    return sum(fields) / os.sysconf("SC_CLK_TCK")


def empty_loop(config: dict) -> None:
    """A Train worker that reports once and ends."""
    import ray.train

    ray.train.report({"done": 1})


def time_job(storage: str, name: str, interval: str) -> tuple[float, float]:
    """(wall seconds, machine CPU seconds) of one empty one-worker Train job."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = interval
    trainer = TorchTrainer(
        empty_loop,
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=storage),
    )
    wall, cpu = time.perf_counter(), machine_cpu_seconds()
    trainer.fit()
    return time.perf_counter() - wall, machine_cpu_seconds() - cpu


def main() -> None:
    """Alternate the two poll intervals, ``--runs`` jobs each; print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="jobs per poll interval (default: 3)")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=True)
    try:
        time.sleep(5)  # let the cluster's own start-up work settle
        measured: dict[str, list[tuple[float, float]]] = {i: [] for i in INTERVALS}
        with tempfile.TemporaryDirectory() as storage:
            for run in range(args.runs):
                for interval in INTERVALS:
                    measured[interval].append(time_job(storage, f"job-{interval}-{run}", interval))
    finally:
        ray.shutdown()
    print(f"\nempty one-worker Train job, median of {args.runs} ({os.cpu_count()} cores)")
    print("| worker poll interval | wall s (fit to result) | machine CPU s |")
    print("|---|---|---|")
    for interval, rows in measured.items():
        wall = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        print(f"| {interval} s | {wall:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
