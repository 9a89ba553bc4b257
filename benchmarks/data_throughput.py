"""Data pipelines side by side on a generated CelebA-format folder (178x218 JPEGs).

For 10k and 20k images, measures the images/s delivered to a training loop (one epoch over the
training split; the second of two epochs is the steady state, the first is also shown) and the peak RSS of the pipeline's whole
process tree (driver + Ray or DataLoader workers) for:
  (a) Ray Data reading the raw folder, (b) Ray Data reading the converted Parquet shards,
  (c) a torch DataLoader over the raw folder with the same number of CPU workers.
Each mode runs in its own process. Prints the ratios (b)/(c), (a)/(c) and the RSS growth.

Usage: python benchmarks/data_throughput.py [--sizes 10000 20000] [--cpus 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

MODES = ("ray_raw", "ray_parquet", "dataloader")


def prepare(workdir: Path, n: int) -> tuple[Path, Path]:
    """A CelebA-format folder of n images (hard links into one 'full' folder) and its Parquet copy."""
    from raymtl.data.convert import convert
    from raymtl.data.fake import write_celeba

    full_n = max(n, 20000)
    full = workdir / f"celeba-{full_n}"
    if not (full / "list_eval_partition.txt").exists():
        print(f"generating {full_n} CelebA-format JPEGs in {full} ...", flush=True)
        write_celeba(full, full_n)
    root = workdir / f"celeba-{n}"
    if n != full_n and not (root / "list_eval_partition.txt").exists():
        (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
        for i in range(1, n + 1):
            target = root / "img_align_celeba" / f"{i:06d}.jpg"
            if not target.exists():
                os.link(full / "img_align_celeba" / f"{i:06d}.jpg", target)
        attr = (full / "list_attr_celeba.txt").read_text().splitlines()
        (root / "list_attr_celeba.txt").write_text(
            "\n".join([str(n), attr[1], *attr[2 : 2 + n]]) + "\n"
        )
        partition = (full / "list_eval_partition.txt").read_text().splitlines()[:n]
        (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    elif n == full_n:
        root = full
    parquet = workdir / f"celeba-{n}-parquet"
    if not (parquet / "_manifest.json").exists():
        start = time.perf_counter()
        convert("celeba", str(root), str(parquet), shard_size=2000, progress=False)
        print(f"converted {n} images to Parquet in {time.perf_counter() - start:.0f}s", flush=True)
    return root, parquet


def run_mode(mode: str, root: str, parquet: str, cpus: int, batch_size: int) -> dict:
    """Inside the child process: one epoch over the training split; return throughput."""
    import torch

    from raymtl.data import build_dataset

    torch.set_num_threads(1)
    if mode == "dataloader":
        from raymtl.engine import make_loader

        bundle = build_dataset("celeba", root)
        loader = make_loader(bundle.train, batch_size, shuffle=True, num_workers=cpus)

        def epoch() -> Any:
            return iter(loader)
    else:
        import ray

        from raymtl.scale.data import iter_engine_batches, ray_dataset

        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        bundle = build_dataset("celeba", parquet if mode == "ray_parquet" else root)
        pipeline = ray_dataset(bundle, "train")

        def epoch() -> Any:
            return iter_engine_batches(pipeline, bundle, batch_size)

    rates = []
    for _ in range(2):  # epoch 1: cold (workers start); epoch 2: steady state (workers reused)
        count, checksum = 0, 0.0
        start = time.perf_counter()
        for batch in epoch():
            checksum += float(
                batch["image"][:, 0, 0, 0].sum()
            )  # touch the data like a training step
            count += len(batch["id"])
        rates.append(count / (time.perf_counter() - start))
    return {
        "images": count,
        "cold_images_per_s": rates[0],
        "images_per_s": rates[1],
        "train_split": len(bundle.train),
    }


def tree_rss(process: psutil.Process) -> int:
    """RSS of a process and all its descendants, in bytes."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def measure(mode: str, root: Path, parquet: Path, cpus: int, batch_size: int) -> dict:
    """Run one mode in a child process, sampling its process tree's RSS."""
    command = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--root",
        str(root),
        "--parquet",
        str(parquet),
        "--cpus",
        str(cpus),
        "--batch-size",
        str(batch_size),
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    process, peak = psutil.Process(child.pid), 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            with contextlib.suppress(psutil.Error):
                peak = max(peak, tree_rss(process))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = child.communicate()
    stop.set()
    sampler.join()
    if child.returncode != 0:
        raise RuntimeError(f"{mode} failed with status {child.returncode}")
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak / 2**20
    return result


def main() -> None:
    """Prepare the folders, measure every mode at every size, print the table and ratios."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000])
    parser.add_argument("--cpus", type=int, default=2, help="Ray CPUs = DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workdir", default="/tmp/raymtl-bench")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--parquet", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args.root, args.parquet, args.cpus, args.batch_size)))
        return

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict[str, dict]] = {}
    for n in args.sizes:
        root, parquet = prepare(workdir, n)
        results[n] = {}
        for mode in MODES:
            results[n][mode] = measure(mode, root, parquet, args.cpus, args.batch_size)
            r = results[n][mode]
            print(
                f"{n:>6} images  {mode:<12} {r['images_per_s']:8.0f} img/s steady  ({r['cold_images_per_s']:6.0f} img/s first epoch)   peak RSS {r['peak_rss_mb']:7.0f} MB",
                flush=True,
            )
    print()
    print(
        f"CPU workers: {args.cpus}; batch size {args.batch_size}; training split = 80 % of the images; ratios of steady-state img/s"
    )
    print(f"{'images':>6}  {'ray_parquet / dataloader':>25}  {'ray_raw / dataloader':>21}")
    for n, r in results.items():
        base = r["dataloader"]["images_per_s"]
        print(
            f"{n:>6}  {r['ray_parquet']['images_per_s'] / base:>24.2f}x  {r['ray_raw']['images_per_s'] / base:>20.2f}x"
        )
    if len(args.sizes) >= 2:
        small, large = args.sizes[0], args.sizes[-1]
        print(f"peak RSS growth from {small} to {large} images:")
        for mode in MODES:
            growth = results[large][mode]["peak_rss_mb"] / results[small][mode]["peak_rss_mb"] - 1
            print(f"  {mode:<12} {100 * growth:+.1f} %")


if __name__ == "__main__":
    main()
