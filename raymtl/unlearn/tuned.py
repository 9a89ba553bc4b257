"""Tuned default options of the unlearning methods, per data set and setting (full/partial).

Signature defaults are one compromise for every data set; earlier unlearning toolkits were
criticised for defaults that do not forget. ``tuned_defaults.yaml`` (written by
``benchmarks/unlearn_tune.py``, on a validation request that is not the one the table reports)
holds, per data set and setting, each method's options with the lowest mean UIS. Explicit options
always win over tuned ones; a method with no entry keeps its signature defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from raymtl.errors import ConfigError
from raymtl.unlearn.base import default_options

TUNED_DEFAULTS_FILE = Path(__file__).with_name("tuned_defaults.yaml")
SETTINGS = ("full", "partial")
# Ours' parts alone (the ablations) use ours' tuned options, so that they differ only in the part.
INHERITS = {
    "projected_gradient": "interference_aware",
    "orthogonalisation_only": "interference_aware",
}


def load_tuned_defaults(path: Path | str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """{data set: {setting: {method: {option: value}}}} from the YAML file (empty if absent)."""
    path = Path(path) if path is not None else TUNED_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        table = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: expected a mapping data set -> setting -> method -> options")
    for dataset, settings in table.items():
        if not isinstance(settings, dict) or not set(settings) <= set(SETTINGS):
            raise ConfigError(f"{path}: {dataset}: expected settings among {', '.join(SETTINGS)}")
        for setting, methods in settings.items():
            if not isinstance(methods, dict) or not all(
                isinstance(options, dict) for options in methods.values()
            ):
                raise ConfigError(f"{path}: {dataset}.{setting}: expected method -> options")
    return table


def tuned_options(
    method: str, dataset: str, setting: str, path: Path | str | None = None
) -> dict[str, Any]:
    """The tuned options of ``method`` (a NAME@LABEL variant uses NAME's) for a data set and
    setting; {} where nothing was tuned. An ablation inherits ours' options that it accepts."""
    if setting not in SETTINGS:
        raise ConfigError(f"setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
    base = method.split("@")[0]
    methods = load_tuned_defaults(path).get(dataset, {}).get(setting, {})
    if base in methods:
        return dict(methods[base])  # run_method rejects an option the method does not have
    inherited = methods.get(INHERITS.get(base, ""), {})
    accepted = default_options(base)
    return {key: value for key, value in inherited.items() if key in accepted}


def resolve_method_options(
    methods: dict[str, dict[str, Any]],
    dataset: str,
    setting: str,
    path: Path | str | None = None,
) -> dict[str, dict[str, Any]]:
    """Each method's tuned options for (data set, setting), overridden by its explicit ones."""
    return {
        name: {**tuned_options(name, dataset, setting, path), **explicit}
        for name, explicit in methods.items()
    }
