"""Run directories: every run keeps its resolved config, its metrics and its TensorBoard events."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import raymtl
from raymtl.errors import ConfigError
from raymtl.io import atomic_write_json, atomic_write_text, atomic_write_yaml


def default_run_dir(study: str, base: str = "runs") -> Path:
    """``./runs/<study>-<YYYYmmdd-HHMMSS>`` (absolute)."""
    return (Path(base) / f"{study}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()


def command_line() -> str:
    """The command that started this process, as a user would type it."""
    argv = list(sys.argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        module = spec.name.removesuffix(".__main__")
        argv = ["python", "-m", module, *argv[1:]]
    return shlex.join(argv)


def environment_info() -> dict[str, Any]:
    """Versions and code revision, so a number can be traced to the code that made it."""
    info: dict[str, Any] = {
        "raymtl": raymtl.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for module in ("torch", "torchvision", "ray", "optuna", "numpy"):
        mod = sys.modules.get(module)
        if mod is not None:
            info[module] = str(getattr(mod, "__version__", "?"))
    try:
        root = Path(raymtl.__file__).resolve().parent.parent
        info["git_commit"] = (
            subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


class RunDir:
    """A run's folder: ``config.yaml``, ``metrics.jsonl``, ``tensorboard/`` and result files."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).resolve()
        self._writer: Any = None

    @classmethod
    def create(cls, path: str | os.PathLike[str] | None, study: str) -> RunDir:
        """Create a fresh run directory; refuse one that already holds a run."""
        target = Path(path).resolve() if path else default_run_dir(study)
        if (target / "config.yaml").exists():
            raise ConfigError(
                f"run directory {target} already holds a run; choose another --run-dir"
            )
        if target.exists() and not target.is_dir():
            raise ConfigError(f"run directory {target} exists and is not a directory")
        target.mkdir(parents=True, exist_ok=True)
        return cls(target)

    def write_config(self, config: dict[str, Any]) -> Path:
        """Save the resolved config with the command line and environment."""
        full = {"command": command_line(), **config, "environment": environment_info()}
        return atomic_write_yaml(self.path / "config.yaml", full)

    @property
    def tensorboard_dir(self) -> Path:
        """Where this run's own TensorBoard events go."""
        return self.path / "tensorboard"

    def writer(self) -> Any:
        """A lazily created TensorBoard SummaryWriter."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.tensorboard_dir))
        return self._writer

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Append to metrics.jsonl and write every numeric value as a TensorBoard scalar."""
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **metrics}, default=float) + "\n")
        writer = self.writer()
        for key, value in metrics.items():
            if isinstance(value, int | float) and key != "epoch":
                writer.add_scalar(key, value, step)
        writer.flush()

    def write_json(self, name: str, obj: Any) -> Path:
        """Atomically write a JSON result file."""
        return atomic_write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> Path:
        """Atomically write a text result file."""
        return atomic_write_text(self.path / name, text)

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
