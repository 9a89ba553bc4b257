"""Run by test_clusters.py in its own process: a Ray cluster of a head and two worker nodes on
this machine (ray.cluster_utils.Cluster), the unlearn study with its storage on a file:// URI and
its trials on the worker nodes, and one worker node removed once the first trials have finished.
Prints a JSON summary on its last line."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path


def main(run_dir: str) -> None:
    """Start the cluster, run the study, remove a node mid-study, report what happened."""
    from ray.cluster_utils import Cluster

    from raymtl.tune.cli import main as tune

    with socket.socket() as probe:  # the session's own cluster already has the default port
        probe.bind(("127.0.0.1", 0))
        dashboard_port = probe.getsockname()[1]
    head = {"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1"}
    cluster = Cluster(
        initialize_head=True, head_node_args={**head, "dashboard_port": dashboard_port}
    )
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    storage = Path(run_dir).resolve() / "storage"
    experiment = storage / "unlearn"
    before_removal: dict[str, list[str]] = {}

    def finished() -> dict[str, list[str]]:
        return {
            f.parent.name: f.read_text().strip().splitlines()
            for f in experiment.glob("*/result.json")
            if f.read_text().strip()
        }

    def remove_a_node() -> None:
        deadline = time.monotonic() + 300
        while len(finished()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        before_removal.update(finished())
        cluster.remove_node(workers[1])

    remover = threading.Thread(target=remove_a_node, daemon=True)
    remover.start()
    args = ["unlearn", "--n-train", "120", "--n-test", "48", "--image-size", "16"]
    args += ["--epochs", "2", "--num-samples", "4", "--forget-fraction", "0.1"]
    args += ["--search-space", str(Path(__file__).parent / "quick_unlearn_space.yaml")]
    args += ["--address", cluster.address, "--storage", storage.as_uri()]
    status = tune([*args, "--run-dir", str(Path(run_dir) / "run")])
    remover.join(timeout=5)
    after = finished()
    summary = {
        "status": status,
        "removed": not remover.is_alive() and bool(before_removal),
        "finished_before_removal": len(before_removal),
        "kept": all(after.get(k) == v for k, v in before_removal.items()),
    }
    cluster.shutdown()
    print(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1])
