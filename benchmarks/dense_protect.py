"""Dense MTL-UE on the embedded dense set (segmentation, depth, normals): does the protection
remove what a victim learns, metric by metric?

For every dense metric (mIoU, δ<1.25, % of normals within 30°) it measures the clean victim, an
input-independent predictor (per pixel: the training set's most frequent class, median depth and
mean normal — the best a model can do without looking at the image) and victims trained on
MTL-UE+EM and MTL-UE+TAP data at ε = 8/255, all on the CLEAN test set. The issue's target: each
protected victim loses at least half of the clean victim's margin over the input-independent
predictor, on every metric ("margin removed" ≥ 0.5). The data set is drawn at contrast 0.3 by
default (objects, shading and fog at 30 % of their default difference), as the MTL-UE table's
classification set is; the ``label-code`` row is a surrogate-free probe that writes each
pixel's labels into its colour within ε.

Writes dense.csv and dense.md to --out and prints them.
Usage: python benchmarks/dense_protect.py [--cells clean,label-code,MTL-UE+EM,MTL-UE+TAP] [--contrast 0.3] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from raymtl.data import build_dataset
from raymtl.data.base import MultiTaskArrays
from raymtl.engine import TrainConfig, evaluate, fit
from raymtl.io import atomic_write_text
from raymtl.models import create_model
from raymtl.protect import ProtectConfig, SurrogateConfig, protect
from raymtl.protect.__main__ import epsilon_value
from raymtl.protect.store import with_deltas
from raymtl.tasks import IGNORE_INDEX, TaskSpec

CELLS: dict[str, tuple[str, str] | None] = {
    "clean": None,
    "EM": ("pgd", "em"),
    "TAP": ("pgd", "tap"),
    "MTL-UE+EM": ("mtlue", "em"),
    "MTL-UE+TAP": ("mtlue", "tap"),
}
DEFAULT_CELLS = ["clean", "MTL-UE+EM", "MTL-UE+TAP"]
LABEL_CODE = "label-code"  # the surrogate-free shortcut below, not a protect method
ROWS = [*CELLS, LABEL_CODE]


def label_coded_deltas(train: MultiTaskArrays, tasks: list[TaskSpec], epsilon: float) -> Tensor:
    """Integer δ that writes each pixel's labels into its colour: per segmentation class a fixed
    random ±1 colour, the normalised log-depth along a fixed ±1 colour, the normal vector as
    RGB; averaged over the tasks and scaled so each image's largest |δ| is ε. No surrogate:
    a probe of how much the easiest dense shortcut within ε can hide from a victim."""
    generator = torch.Generator().manual_seed(0)
    codes = []
    for task in tasks:
        target = train.targets[task.name]
        if task.kind == "segmentation":
            colours = torch.randint(0, 2, (task.num_classes, 3), generator=generator) * 2.0 - 1
            known = target != IGNORE_INDEX
            code = colours[torch.where(known, target, 0)].permute(0, 3, 1, 2)
            codes.append(code * known.unsqueeze(1))
        elif task.kind == "depth":
            depth = target.float().reshape(len(target), 1, *target.shape[-2:])
            valid = depth > 0
            log_depth = torch.log(depth.clamp_min(1e-6))
            low, high = log_depth[valid].min(), log_depth[valid].max()
            scaled = (2 * (log_depth - low) / (high - low).clamp_min(1e-6) - 1) * valid
            codes.append(scaled * torch.tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1))
        else:
            codes.append(target.float())
    code = torch.stack(codes).mean(0)
    code = code / code.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return torch.round(code * epsilon * 255).to(torch.int16)


class InputIndependentPredictor(nn.Module):
    """Predicts the same maps for every image: per pixel, the training split's most frequent
    class, median valid depth and mean normal direction."""

    def __init__(self, train: MultiTaskArrays, tasks: list[TaskSpec]) -> None:
        super().__init__()
        self.maps: dict[str, Tensor] = {}
        for task in tasks:
            target = train.targets[task.name]
            if task.kind == "segmentation":
                counts = torch.stack(
                    [(target == c).sum(0) for c in range(task.num_classes)]
                ).float()
                self.maps[task.name] = torch.log(counts + 1e-3)  # argmax = most frequent class
            elif task.kind == "depth":
                valid = torch.where(target > 0, target, torch.nan)
                median = torch.nanmedian(valid.flatten(1).t(), dim=1).values
                self.maps[task.name] = torch.nan_to_num(median, nan=1.0).reshape(
                    1, *target.shape[-2:]
                )
            elif task.kind == "normals":
                self.maps[task.name] = nn.functional.normalize(target.mean(0), dim=0)
            else:
                raise ValueError(f"task {task.name!r} is not dense")

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """The fixed maps, repeated for the batch."""
        return {
            name: m.unsqueeze(0).expand(len(images), *m.shape).clone()
            for name, m in self.maps.items()
        }


def metric_row(tasks: list[TaskSpec], per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """{task/primary metric: value} for every task."""
    return {f"{t.name}/{t.primary_metric}": per_task[t.name][t.primary_metric] for t in tasks}


def main(argv: list[str] | None = None) -> list[dict]:
    """Train the victims, print and save the per-metric table with the margin each cell removes."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument(
        "--contrast",
        type=float,
        default=0.3,
        help="synthetic_dense contrast of objects, shading and fog (1 = the default set, where "
        "even a label-coded 8/255 shortcut hides nothing; README)",
    )
    parser.add_argument("--epsilon", type=epsilon_value, default=8 / 255, help="e.g. 8/255")
    # 40 epochs: the clean victim's mIoU is still rising at 20 (0.62 against 0.88 at contrast 1)
    parser.add_argument("--victim-epochs", type=int, default=40)
    parser.add_argument("--clean-epochs", type=int, default=15, help="TAP's clean model")
    parser.add_argument("--generator-epochs", type=int, default=20)
    parser.add_argument("--generator-lr", type=float, default=ProtectConfig.lr)
    parser.add_argument(
        "--em-steps-per-epoch", type=int, default=1, help="MTL-UE+EM surrogate steps per epoch"
    )
    parser.add_argument("--width", type=int, default=16, help="generator encoder width")
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--pgd-rounds", type=int, default=2, help="EM-PGD rounds (cap)")
    parser.add_argument(
        "--cells",
        default=",".join(DEFAULT_CELLS),
        help=f"comma-separated rows, from: {', '.join(ROWS)}",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/dense-protect")
    args = parser.parse_args(argv)
    unknown = [c for c in args.cells.split(",") if c not in ROWS]
    if unknown:
        parser.error(f"--cells: unknown row {unknown[0]!r}; available: {', '.join(ROWS)}")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    bundle = build_dataset(
        "synthetic_dense",
        n_train=args.n_train,
        n_test=args.n_test,
        image_size=args.image_size,
        seed=args.seed,
        contrast=args.contrast,
    )
    tasks = list(bundle.tasks)
    prior = InputIndependentPredictor(bundle.train, tasks)
    floor = metric_row(tasks, evaluate(prior, bundle.test, tasks)["tasks"])
    surrogate = SurrogateConfig(
        clean_epochs=args.clean_epochs,
        em_steps_per_epoch=args.em_steps_per_epoch,
        batch_size=64,
        seed=args.seed,
    )
    victim = TrainConfig(epochs=args.victim_epochs, batch_size=64, seed=args.seed, eval_every=0)
    rows: list[dict] = [{"data": "input-independent", **floor, "seconds": 0}]
    clean_scores: dict[str, float] | None = None
    for name in args.cells.split(","):
        start = time.perf_counter()
        train = bundle.train
        if name == LABEL_CODE:
            deltas = label_coded_deltas(train, tasks, args.epsilon)
            train = with_deltas(train, train.ids.numpy(), deltas.numpy())
        elif CELLS[name] is not None:
            method, base = CELLS[name]
            config = ProtectConfig(
                method=method,
                base=base,
                epsilon=args.epsilon,
                epochs=args.generator_epochs if method == "mtlue" else args.pgd_rounds,
                batch_size=64,
                lr=args.generator_lr,
                width=args.width,
                pgd_steps=args.pgd_steps,
                seed=args.seed,
                surrogate=surrogate,
            )
            result = protect(train, tasks, bundle.in_channels, bundle.image_size, config)
            train = with_deltas(train, result.ids, result.deltas)
        torch.manual_seed(args.seed)
        model = create_model("small_cnn", tasks, bundle.in_channels, bundle.image_size)
        outcome = fit(model, train, bundle.test, tasks, victim)
        scores = metric_row(tasks, outcome.test["tasks"])
        row: dict = {"data": name, **scores, "seconds": round(time.perf_counter() - start)}
        if name == "clean":
            clean_scores = scores
        if clean_scores is not None and name != "clean":
            removed = [
                (clean_scores[k] - scores[k]) / (clean_scores[k] - floor[k])
                for k in scores
                if clean_scores[k] > floor[k]
            ]
            row["least margin removed"] = round(min(removed), 3) if removed else float("nan")
        rows.append(row)
        print(
            f"{name:<11} "
            + "  ".join(f"{k} {v:.4f}" for k, v in scores.items())
            + (
                f"  least margin removed {row['least margin removed']:.3f}"
                if "least margin removed" in row
                else ""
            )
            + f"  ({row['seconds']}s)",
            flush=True,
        )
    columns = ["data", *floor, "least margin removed", "seconds"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    out = Path(args.out)
    atomic_write_text(out / "dense.csv", buffer.getvalue())
    lines = [
        f"| synthetic_dense, contrast {args.contrast:g}, small CNN victim, "
        f"ε = {round(args.epsilon * 255)}/255 | " + " | ".join(columns[1:]) + " |",
        "|---|" + "---|" * (len(columns) - 1),
    ]
    for row in rows:
        cells = [
            f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, ""))
            for c in columns[1:]
        ]
        lines.append(f"| {row['data']} | " + " | ".join(cells) + " |")
    atomic_write_text(out / "dense.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
