"""YAML search spaces: parsed and validated here (Ray-free), turned into Tune domains by the Ray layer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raymtl.errors import ConfigError
from raymtl.registry import Registry

PARAMETER_TYPES = ("float", "log_float", "int", "categorical")
SEARCH_SPACE_DIR = Path(__file__).resolve().parent.parent / "search_spaces"


@dataclass(frozen=True)
class Parameter:
    """One searched hyperparameter."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    default: Any = None


@dataclass
class SearchSpace:
    """Named parameters with bounds/choices and defaults, as read from a YAML file."""

    parameters: dict[str, Parameter] = field(default_factory=dict)
    source: str = "<memory>"

    def defaults(self) -> dict[str, Any]:
        """The default value of every parameter (the study's first trial)."""
        return {name: p.default for name, p in self.parameters.items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the resolved config."""
        out: dict[str, Any] = {}
        for name, p in self.parameters.items():
            entry: dict[str, Any] = {"type": p.type, "default": p.default}
            if p.type == "categorical":
                entry["choices"] = list(p.choices)
            else:
                entry.update(low=p.low, high=p.high)
            out[name] = entry
        return out


def _number(source: str, name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(
            f"search space {source}: {name}.{key} must be a finite number, got {value!r}"
        )
    return float(value)


def parse_parameter(source: str, name: str, spec: Any) -> Parameter:
    """Validate one parameter entry; errors name the file and the field."""
    if not isinstance(spec, dict):
        raise ConfigError(f"search space {source}: {name} must be a mapping with a 'type'")
    kind = spec.get("type")
    if kind not in PARAMETER_TYPES:
        raise ConfigError(
            f"search space {source}: {name}.type must be one of {', '.join(PARAMETER_TYPES)}, got {kind!r}"
        )
    allowed = {"type", "default"} | ({"choices"} if kind == "categorical" else {"low", "high"})
    extra = set(spec) - allowed
    if extra:
        raise ConfigError(
            f"search space {source}: {name} has unknown key(s) {', '.join(sorted(extra))}; expected {', '.join(sorted(allowed))}"
        )
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"search space {source}: {name}.choices must be a non-empty list")
        default = spec.get("default", choices[0])
        if default not in choices:
            raise ConfigError(
                f"search space {source}: {name}.default {default!r} is not among its choices"
            )
        return Parameter(name, kind, choices=tuple(choices), default=default)
    for key in ("low", "high"):
        if key not in spec:
            raise ConfigError(f"search space {source}: {name}.{key} is missing")
    low, high = (
        _number(source, name, "low", spec["low"]),
        _number(source, name, "high", spec["high"]),
    )
    if not low < high:
        raise ConfigError(
            f"search space {source}: {name}.low must be < {name}.high (got {low}, {high})"
        )
    if kind == "log_float" and low <= 0:
        raise ConfigError(
            f"search space {source}: {name}.low must be > 0 for log_float (got {low})"
        )
    if kind == "int" and (low != int(low) or high != int(high)):
        raise ConfigError(f"search space {source}: {name}.low/high must be integers for int")
    default = _number(source, name, "default", spec.get("default", low))
    if not low <= default <= high:
        raise ConfigError(
            f"search space {source}: {name}.default {default} is outside [{low}, {high}]"
        )
    if kind == "int":
        return Parameter(name, kind, int(low), int(high), default=int(default))
    return Parameter(name, kind, low, high, default=default)


def parse_search_space(
    data: Any,
    source: str,
    allowed: dict[str, str | None],
    registries: dict[str, Registry] | None = None,
) -> SearchSpace:
    """Validate a loaded YAML document against the study's parameters.

    ``allowed`` maps parameter name -> required type (None: any type); ``registries`` maps a
    categorical parameter to the registry its choices must come from.
    """
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"search space {source}: expected a mapping of parameter names to specs")
    space = SearchSpace(source=source)
    for name, spec in data.items():
        if name not in allowed:
            raise ConfigError(
                f"search space {source}: unknown parameter {name!r}; this study searches {', '.join(sorted(allowed))}"
            )
        parameter = parse_parameter(source, name, spec)
        required = allowed[name]
        if (
            required is not None
            and parameter.type != required
            and not {required, parameter.type} <= {"float", "log_float"}
        ):
            raise ConfigError(
                f"search space {source}: {name} must be of type {required}, got {parameter.type}"
            )
        registry = (registries or {}).get(name)
        if registry is not None:
            for choice in parameter.choices:
                if choice not in registry:
                    raise ConfigError(
                        f"search space {source}: {name} choice {choice!r} is not a known {registry.kind}; available: {', '.join(registry.names())}"
                    )
        space.parameters[name] = parameter
    return space


def load_search_space(
    path: str | Path, allowed: dict[str, str | None], registries: dict[str, Registry] | None = None
) -> SearchSpace:
    """Read and validate a search-space YAML file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"search space {file}: no such file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"search space {file}: not valid YAML{where}: {getattr(err, 'problem', err)}"
        ) from None
    return parse_search_space(data, str(file), allowed, registries)


def bundled_search_space(study: str) -> Path:
    """The search-space file shipped with the project for ``study``."""
    return SEARCH_SPACE_DIR / f"{study}.yaml"
