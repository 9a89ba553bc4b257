"""Shared fixtures: test environment for Ray, and ONE Ray cluster per test session."""

import contextlib
import importlib
import importlib.util
import io
import os
import sys
from dataclasses import dataclass
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


@pytest.fixture(autouse=True)
def no_placement_group_outlives_its_test(request):
    """After a test on the session's cluster, remove any placement group it left behind, with a
    warning: on a 2-CPU cluster a leaked group (Ray's Train-inside-Tune shutdown race) makes the
    next Train or Ray Data test wait for CPUs forever instead of failing."""
    yield
    if "ray_cluster" not in request.fixturenames:
        return
    import time
    import warnings

    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    if not ray.is_initialized():
        return
    time.sleep(0.5)  # a Train run's own shutdown removes its group just after fit() returns
    for hex_id, group in ray.util.placement_group_table().items():
        if group["state"] == "CREATED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(hex_id))))
            warnings.warn(
                f"{request.node.nodeid} left placement group {hex_id} "
                f"({group['bundles']}) behind; removed",
                stacklevel=1,
            )


@dataclass
class CommandResult:
    """What ``subprocess.run(..., capture_output=True, text=True)`` would return, in short."""

    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def working_directory(path: Path | str):
    """``contextlib.chdir`` for Python 3.10 too (it arrived in 3.11)."""
    saved = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(saved)


def run_command_in_process(module: str, *args: object, cwd: Path | None = None) -> CommandResult:
    """``python -m <module> <args>`` run in this process through the same entry wrapper
    (``run_main``), its exit status taken from SystemExit; saves a fresh interpreter's ~4 s of
    imports per bad-input case. One fresh-process case per command is kept where it matters."""
    from raymtl.cli import run_main

    spec = importlib.util.find_spec(module)
    is_package = spec is not None and spec.submodule_search_locations is not None
    entry = importlib.import_module(f"{module}.__main__" if is_package else module)
    out, err = io.StringIO(), io.StringIO()
    saved_argv = sys.argv
    sys.argv = [module, *map(str, args)]
    try:
        with (
            working_directory(cwd or os.getcwd()),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            run_main(entry.main, entry.PROG)
        returncode = 0
    except SystemExit as exit_:
        returncode = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if isinstance(exit_.code, str):
            err.write(exit_.code + "\n")
    finally:
        sys.argv = saved_argv
    return CommandResult(returncode, out.getvalue(), err.getvalue())


@pytest.fixture
def run_command():
    """``run_command("raymtl.train", "--epochs", "0")`` → returncode, stdout, stderr."""
    return run_command_in_process
