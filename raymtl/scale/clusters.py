"""Offline checks of the cluster configs in ``clusters/``: Ray's own schema for launcher YAMLs
(prepare, then validate; no cloud call) and the security properties raymtl ships with, plus the
required fields of the KubeRay manifest.

``python -m raymtl.scale.clusters [FILE ...]`` prints one line per problem and exits 2 if any.
"""

from __future__ import annotations

import copy
import ipaddress
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

CLUSTERS_DIR = Path(__file__).resolve().parents[2] / "clusters"
RAY_VERSION = "2.60.0"
WORLD = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def load(path: str | Path) -> dict[str, Any]:
    """Read one YAML document; a problem reading it is reported as a ValueError naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def _commands(config: dict[str, Any]) -> str:
    keys = ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands")
    return "\n".join(str(c) for key in keys for c in config.get(key) or [])


def _open_to_world(cidr: str) -> bool:
    try:
        network = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return True  # not a network: treat as unsafe
    return any(network == world for world in WORLD) or network.prefixlen == 0


def check_launcher(config: dict[str, Any], source: str = "<config>") -> list[str]:
    """Problems of a Ray cluster-launcher config: Ray's schema, node types, dashboard binding,
    inbound rules, pinned Ray version."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    problems = []
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as err:  # jsonschema.ValidationError, ValueError, KeyError from Ray
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        problems.append(f"{source}: Ray's schema rejects it: {first}")
    types = config.get("available_node_types") or {}
    if config.get("head_node_type") not in types:
        problems.append(
            f"{source}: head_node_type {config.get('head_node_type')!r} is not a node type"
        )
    commands = _commands(config)
    head_start = "\n".join(str(c) for c in config.get("head_start_ray_commands") or [])
    if "0.0.0.0" in commands or "--dashboard-host=127.0.0.1" not in head_start:
        problems.append(
            f"{source}: the head must start Ray with --dashboard-host=127.0.0.1 (the dashboard "
            "and Jobs API have no authentication; reach them with `ray dashboard`)"
        )
    if f"ray[default,tune,train,data]=={RAY_VERSION}" not in commands:
        problems.append(f"{source}: setup_commands must install Ray pinned to {RAY_VERSION}")
    group = (config.get("provider") or {}).get("security_group") or {}
    rules = group.get("IpPermissions")
    if not rules:
        problems.append(f"{source}: provider.security_group.IpPermissions must allow SSH only")
    for rule in rules or []:
        ports = (rule.get("FromPort"), rule.get("ToPort"))
        if ports != (22, 22):
            problems.append(f"{source}: inbound rule for ports {ports} (only SSH, 22, may be open)")
        for entry in [*(rule.get("IpRanges") or []), *(rule.get("Ipv6Ranges") or [])]:
            cidr = entry.get("CidrIp") or entry.get("CidrIpv6") or ""
            if _open_to_world(cidr):
                problems.append(f"{source}: SSH is open to the world ({cidr}); set your own CIDR")
    return problems


def check_kuberay(manifest: dict[str, Any], source: str = "<manifest>") -> list[str]:
    """Problems of a KubeRay RayCluster: kind, pinned version, head and GPU worker groups,
    autoscaling, images, dashboard binding."""
    problems = []
    if manifest.get("apiVersion") != "ray.io/v1" or manifest.get("kind") != "RayCluster":
        problems.append(f"{source}: expected apiVersion ray.io/v1, kind RayCluster")
    spec = manifest.get("spec") or {}
    if str(spec.get("rayVersion")) != RAY_VERSION:
        problems.append(f"{source}: spec.rayVersion must be {RAY_VERSION!r}")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{source}: spec.enableInTreeAutoscaling must be true")
    head = spec.get("headGroupSpec") or {}
    start = head.get("rayStartParams") or {}
    if start.get("dashboard-host") != "127.0.0.1":
        problems.append(f"{source}: headGroupSpec.rayStartParams.dashboard-host must be 127.0.0.1")
    groups = spec.get("workerGroupSpecs") or []
    containers = [
        c
        for g in [head, *groups]
        for c in ((g.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    ]
    if not head or not all(c.get("image") for c in containers):
        problems.append(f"{source}: the head group and every worker group need a container image")
    gpu_groups = [
        g
        for g in groups
        for c in ((g.get("template") or {}).get("spec") or {}).get("containers") or []
        if "nvidia.com/gpu" in ((c.get("resources") or {}).get("limits") or {})
    ]
    if not gpu_groups:
        problems.append(f"{source}: no worker group requests nvidia.com/gpu")
    for group in gpu_groups:
        if not group.get("maxReplicas") or group.get("minReplicas", 0) > group.get("maxReplicas"):
            problems.append(f"{source}: worker group {group.get('groupName')}: bad replica bounds")
    return problems


def check_file(path: str | Path) -> list[str]:
    """Problems of one file under clusters/ (launcher YAML or KubeRay manifest)."""
    try:
        data = load(path)
    except ValueError as err:
        return [str(err)]
    if data.get("kind") == "RayCluster":
        return check_kuberay(data, str(path))
    return check_launcher(data, str(path))


def config_files(folder: Path = CLUSTERS_DIR) -> list[Path]:
    """Every YAML config shipped under clusters/."""
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])


def main(argv: Sequence[str] | None = None) -> int:
    """Check the given files (default: every config under clusters/)."""
    paths = list(argv if argv is not None else sys.argv[1:]) or config_files()
    problems = [p for path in paths for p in check_file(path)]
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"{len(paths)} cluster config(s) valid: {', '.join(str(p) for p in paths)}")
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
