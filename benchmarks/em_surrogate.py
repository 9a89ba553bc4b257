"""The EM surrogate's training steps between MTL-UE+EM generator epochs, δ taken once per
distinct sample drawn (raymtl) against one generator pass per drawn batch (as before), timed side
by side in one run at the MTL-UE table's size (8,000 synthetic images at contrast 0.3, 32 px, a
width-16 generator, 128 steps of batch 128). Both surrogates start from the same weights and
draw the same batches; their largest weight difference afterwards is printed beside the times.

Usage: python benchmarks/em_surrogate.py [--threads 2] [--n-train 8000] [--steps 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch

import raymtl.protect.bases as bases
from raymtl.data import build_dataset
from raymtl.protect.generator import MTLUEGenerator


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Time ``train_surrogate`` both ways, interleaved over rounds; print the speed-up."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--steps", type=int, default=128, help="surrogate steps per call")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two ways")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = build_dataset(
        "synthetic", n_train=args.n_train, n_test=16, image_size=args.image_size, contrast=0.3
    )
    torch.manual_seed(0)
    generator = MTLUEGenerator(
        bundle.tasks, bundle.in_channels, bundle.image_size, 8 / 255, "sample", args.width
    ).eval()

    def perturb(images: torch.Tensor, targets: dict, ids: torch.Tensor) -> torch.Tensor:
        return generator(images, targets)

    config = bases.SurrogateConfig(seed=0)
    ways = {"per batch": 0, "once per sample": bases.DELTA_CACHE_BYTES}
    surrogates = {}
    for name in ways:
        surrogates[name] = bases.UE_BASES.create(
            "em", bundle.tasks, bundle.in_channels, bundle.image_size, config
        )
        surrogates[name].prepare(bundle.train)
    seconds = dict.fromkeys(ways, 0.0)
    default_cache = bases.DELTA_CACHE_BYTES
    try:
        for _ in range(args.rounds):
            for name, cache_bytes in ways.items():
                bases.DELTA_CACHE_BYTES = cache_bytes
                start = time.perf_counter()
                surrogates[name].train_surrogate(perturb, bundle.train, args.steps)
                seconds[name] += (time.perf_counter() - start) / args.rounds
    finally:
        bases.DELTA_CACHE_BYTES = default_cache
    old, new = seconds["per batch"], seconds["once per sample"]
    difference = max(
        float((a - b).detach().abs().max())
        for a, b in zip(
            surrogates["per batch"].surrogate.parameters(),
            surrogates["once per sample"].surrogate.parameters(),
            strict=True,
        )
    )
    print(
        f"{args.steps} surrogate steps: δ per batch {old:.2f} s   δ once per sample {new:.2f} s"
        f"   speed-up {old / new:.2f}x  ({args.n_train} images, {args.image_size} px,"
        f" width {args.width}, {args.threads} threads)",
        flush=True,
    )
    print(f"largest surrogate weight difference after {args.rounds} calls: {difference:.2e}")
    return {"per_batch_s": old, "once_per_sample_s": new, "weight_difference": difference}


if __name__ == "__main__":
    main()
