"""The MTL-UE generator's decoder as raymtl computes it against the reference's formulation,
timed side by side in one run at the table's size. Reference: concatenate the chosen embeddings
and E(x), then a 1x1 convolution, with nn.InstanceNorm2d. raymtl: the 1x1 mix computed part by
part (each class embedding mixed once per batch, one matrix product per batch) and instance
normalisation as a one-group-per-channel GroupNorm, which stays channels-last. Timed: the no-grad
δ pass that the EM surrogate's steps and the δ export run, and a generator training step through
a small-CNN surrogate (what MTL-UE+EM's generator epoch runs). Same function, same weights; the
largest difference in δ is printed beside the times.

Usage: python benchmarks/generator_mix.py [--threads 2] [--batch-size 128] [--width 16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_format  # a sibling script in benchmarks/, not a package

from raymtl.models import create_model
from raymtl.protect.bases import mean_output_loss
from raymtl.protect.generator import MTLUEGenerator


def reference_form(generator: MTLUEGenerator) -> MTLUEGenerator:
    """A copy of ``generator`` (same weights) whose decoder normalises with nn.InstanceNorm2d."""
    reference = copy.deepcopy(generator)
    for index, layer in enumerate(reference.decoder):
        if isinstance(layer, nn.GroupNorm):
            norm = nn.InstanceNorm2d(layer.num_channels, eps=layer.eps, affine=True)
            norm.load_state_dict(layer.state_dict())
            reference.decoder[index] = norm
    return reference


def concatenated(generator: MTLUEGenerator, images: Tensor, targets: dict[str, Tensor]) -> Tensor:
    """δ through the reference's concatenation, then the whole decoder."""
    raw = generator.decoder(generator.concatenated_input(images, targets))
    return generator.bounded(raw, images)


def main(argv: list[str] | None = None) -> list[dict]:
    """Time both forms of the δ pass and of a training step, interleaved over rounds."""
    parser = argparse.ArgumentParser(description=__doc__)
    memory_format.add_timing_arguments(parser, steps=5)  # --steps: timed calls per round
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the two forms")
    args = parser.parse_args(argv)
    images, targets, tasks = memory_format.timing_batch(args)
    torch.manual_seed(0)
    generator = MTLUEGenerator(tasks, 3, args.image_size, 8 / 255, "sample", args.width)
    reference = reference_form(generator)
    surrogate = create_model("small_cnn", tasks, 3, args.image_size).eval()
    forms: dict[str, tuple[nn.Module, Callable[[Tensor, dict[str, Tensor]], Tensor]]] = {
        "reference": (reference, lambda x, y: concatenated(reference, x, y)),
        "raymtl": (generator, generator),
    }
    optimizers = {  # SGD at lr 0: the step is timed, the weights stay equal
        name: torch.optim.SGD(module.parameters(), lr=0.0) for name, (module, _) in forms.items()
    }
    with torch.no_grad():
        reference.eval(), generator.eval()
        difference = (concatenated(reference, images, targets) - generator(images, targets)).abs()

    def delta_pass(name: str) -> None:
        module, form = forms[name]
        module.eval()
        with torch.no_grad():
            form(images, targets)

    def training_step(name: str) -> None:
        module, form = forms[name]
        module.train()
        loss = mean_output_loss(surrogate(images + form(images, targets)), targets, tasks)
        optimizers[name].zero_grad()
        loss.backward()
        optimizers[name].step()

    rows = []
    for label, work in (("δ pass (no grad)", delta_pass), ("training step", training_step)):
        seconds = dict.fromkeys(forms, 0.0)
        for name in forms:
            work(name)  # warm-up
        for _ in range(args.rounds):
            for name in forms:
                start = time.perf_counter()
                for _ in range(args.steps):
                    work(name)
                seconds[name] += (time.perf_counter() - start) / (args.steps * args.rounds)
        old, new = seconds["reference"], seconds["raymtl"]
        rows.append({"work": label, "reference_s": old, "raymtl_s": new})
        print(
            f"{label:<17} reference {old * 1000:7.1f} ms   raymtl {new * 1000:7.1f} ms"
            f"   speed-up {old / new:.2f}x  (batch {args.batch_size}, {args.image_size} px,"
            f" width {args.width}, {args.threads} threads)",
            flush=True,
        )
    print(f"largest |δ difference|: {float(difference.max()):.2e} (ε = {8 / 255:.4f})")
    return rows


if __name__ == "__main__":
    main()
