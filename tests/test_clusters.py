"""The shipped cluster configs pass Ray's own schema (offline) and raymtl's security checks, and
broken copies are caught: an unknown key, a missing node type, a dashboard on 0.0.0.0, SSH open
to the world."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys

import pytest

from raymtl.scale.clusters import (
    CLUSTERS_DIR,
    check_file,
    check_kuberay,
    check_launcher,
    config_files,
    load,
)


@pytest.fixture(scope="module")
def aws():
    return load(CLUSTERS_DIR / "aws.yaml")


def test_every_shipped_config_is_valid():
    files = config_files()
    assert {f.name for f in files} >= {"aws.yaml", "kuberay.yaml"}
    for file in files:
        assert check_file(file) == [], file


def test_aws_config_has_the_node_types_and_storage_access_it_promises(aws):
    types = aws["available_node_types"]
    assert aws["head_node_type"] == "head.cpu"
    assert types["head.cpu"]["resources"] == {"CPU": 0}
    spot = types["gpu.spot.g5"]["node_config"]
    assert spot["InstanceType"] == "g5.xlarge"
    assert spot["InstanceMarketOptions"]["MarketType"] == "spot"
    assert types["gpu.ondemand.p4d"]["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    assert aws["docker"]["image"].startswith("rayproject/ray:2.60.0")


def _broken(aws, change):
    config = copy.deepcopy(aws)
    change(config)
    return check_launcher(config, "broken.yaml")


def _unknown_key(c):
    c["max_wrokers"] = 3


def _missing_node_type(c):
    del c["available_node_types"]["head.cpu"]


def _dashboard_open(c):
    c["head_start_ray_commands"][-1] = c["head_start_ray_commands"][-1].replace(
        "127.0.0.1", "0.0.0.0"
    )


def _ssh_open(c):
    c["provider"]["security_group"]["IpPermissions"][0]["IpRanges"][0]["CidrIp"] = "0.0.0.0/0"


def _extra_port(c):
    rule = copy.deepcopy(c["provider"]["security_group"]["IpPermissions"][0])
    rule["FromPort"] = rule["ToPort"] = 8265
    c["provider"]["security_group"]["IpPermissions"].append(rule)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_unknown_key, "Ray's schema rejects it: Additional properties are not allowed"),
        (_missing_node_type, "head_node_type 'head.cpu' is not a node type"),
        (_dashboard_open, "--dashboard-host=127.0.0.1"),
        (_ssh_open, "SSH is open to the world (0.0.0.0/0)"),
        (_extra_port, "inbound rule for ports (8265, 8265)"),
    ],
)
def test_broken_copies_of_the_aws_config_are_rejected(aws, change, expected):
    problems = _broken(aws, change)
    assert any(expected in p for p in problems), problems


def test_broken_kuberay_manifests_are_rejected():
    manifest = load(CLUSTERS_DIR / "kuberay.yaml")
    assert check_kuberay(manifest) == []
    open_dashboard = copy.deepcopy(manifest)
    open_dashboard["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] = "0.0.0.0"
    no_gpu = copy.deepcopy(manifest)
    for group in no_gpu["spec"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            container["resources"]["limits"].pop("nvidia.com/gpu")
    other_version = copy.deepcopy(manifest)
    other_version["spec"]["rayVersion"] = "2.49.0"
    assert any("dashboard-host" in p for p in check_kuberay(open_dashboard))
    assert any("nvidia.com/gpu" in p for p in check_kuberay(no_gpu))
    assert any("rayVersion" in p for p in check_kuberay(other_version))


def test_command_reports_problems_one_per_line_with_status_2(aws, tmp_path):
    import yaml

    broken = copy.deepcopy(aws)
    _ssh_open(broken)
    path = tmp_path / "open.yaml"
    path.write_text(yaml.safe_dump(broken))
    proc = subprocess.run(
        [sys.executable, "-m", "raymtl.scale.clusters", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "open.yaml" in line]
    assert lines == [f"{path}: SSH is open to the world (0.0.0.0/0); set your own CIDR"]


@pytest.mark.ray
def test_a_study_survives_losing_a_worker_node(tmp_path):
    """A head and two worker nodes on this machine; a worker node is removed after two trials
    have finished; the study completes every trial and loses none that had finished."""
    import csv
    import json

    script = CLUSTERS_DIR.parent / "tests" / "lost_node_study.py"
    # Its own session: on a timeout the whole group goes, the Ray nodes it started included, so
    # no stray cluster is left for later tests to find.
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the lost-node study did not finish in 600 s: {stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == 0
    assert summary["removed"] and summary["finished_before_removal"] >= 2
    assert summary["kept"]
    with open(tmp_path / "run" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
