"""Shared fixtures: test environment for Ray, and ONE Ray cluster per test session."""

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
# Train's controller registers reported checkpoints when it polls its workers (every 2 s by
# default); test epochs take well under a second, so poll often enough to see every epoch.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark_script(name: str) -> ModuleType:
    """A script of benchmarks/ as a module (registered, so its dataclasses and siblings import)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def benchmark_script():
    """Loads a benchmarks/ script by name: ``benchmark_script("mtlue_table").main([...])``."""
    return load_benchmark_script


@pytest.fixture(scope="session")
def ray_cluster():
    """A local 2-CPU Ray cluster shared by every test that needs Ray; stopped at session end."""
    import ray

    ray.init(
        address="local",  # a new cluster, never one a killed test process left running
        num_cpus=2,
        include_dashboard=True,  # its State API frees placement groups of early-stopped trials
        dashboard_host="127.0.0.1",
        logging_level="WARNING",
    )
    yield ray
    ray.shutdown()
