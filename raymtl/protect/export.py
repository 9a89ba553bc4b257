"""Export a protected data set in its publisher's own format, for any third-party training script.

``python -m raymtl.protect.export --store S --out DIR`` writes a copy of the store's data set:
the same folder layout and label files, every image decoded as raymtl decodes it (cropped and
resized to the model's input size), training images carrying their δ, in a lossless encoding so
δ survives exactly (PNG; NYUv2 keeps its .npy). Label files are copied with image names rewritten
where the extension changed; dense label files (NYUv2's label/depth/normal) are copied as they are.
A ``raymtl_export.json`` marker lets raymtl's own readers load the folder without resizing again.
The original data set is only read; the export is built in a temporary folder and renamed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

import raymtl
from raymtl.cli import OneLineArgumentParser, run_main
from raymtl.data import build_dataset
from raymtl.data.files import EXPORT_MARKER, FileDataset
from raymtl.errors import ConfigError
from raymtl.io import atomic_write_json
from raymtl.protect.store import PerturbationStore, apply_integer_deltas

PROG = "python -m raymtl.protect.export"
TOKEN = re.compile(r"[^\s,]+")


@dataclass
class ExportReport:
    """What an export wrote."""

    out: Path
    protected: int  # training images written with their δ
    clean: int  # other images (test, validation), written decoded but unperturbed
    skipped: int  # unreadable samples left out (on_bad_sample='skip')


def rename_tokens(text: str, renames: dict[str, str]) -> str:
    """``text`` with every whitespace- or comma-separated token found in ``renames`` replaced."""
    return TOKEN.sub(lambda match: renames.get(match.group(0), match.group(0)), text)


def export_protected(
    store_folder: str | Path, out: str | Path, progress: bool = True
) -> ExportReport:
    """Write the store's data set with δ applied to its training images, in the data set's format."""
    store = PerturbationStore(store_folder)
    meta = store.metadata
    options = dict(meta.get("dataset_options", {}))
    bundle = build_dataset(meta["dataset"], options.pop("root", None), **options)
    source = bundle.source
    if source is None or not isinstance(bundle.train, FileDataset):
        raise ConfigError(
            f"{store.folder}: data set {bundle.name!r} is generated, not read from files, so it has "
            "no format of its own to export to; victims read the store directly"
        )
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {out}: already exists; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        report = _write(store, bundle, source, temporary, progress)
        temporary.rename(out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    report.out = out
    return report


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write(store: PerturbationStore, bundle: Any, source: Any, folder: Path, progress: bool):
    fmt = source.format
    every = FileDataset(
        fmt, source.root, source.index, "export", bundle.train.on_bad_sample, bundle.train.parquet
    )
    stored = set(store.ids.tolist())
    splits = source.index["split"].to_pylist()
    renames: dict[str, str] = {}
    protected = clean = skipped = 0
    for position in tqdm(range(len(every)), desc="exporting", unit="image", disable=not progress):
        sample = every[position]
        if sample is None:
            skipped += 1
            continue
        image = (sample["image"] * 255).round().clamp(0, 255).byte()[None]
        sample_id = int(sample["id"])
        if splits[position] == "train":
            if sample_id not in stored:
                raise ConfigError(
                    f"{store.folder}: store has no perturbation for training sample id {sample_id}; it does not match this data set"
                )
            image = apply_integer_deltas(image, store.deltas_for([sample_id]))
            protected += 1
        else:
            clean += 1
        relative = every.paths["image"][position]
        target, encoded = fmt.export_image(relative, image[0].numpy())
        renames[relative.rsplit("/", 1)[-1]] = target.rsplit("/", 1)[-1]
        _write_file(folder / target, encoded)
        for column in fmt.file_columns[1:]:  # dense label files (e.g. NYUv2's) are copied as is
            label_file = every.paths[column][position]
            _write_file(folder / label_file, source.root.read_bytes(label_file))
    for name in fmt.label_files:
        text = source.root.read_text(name)
        (folder / name).write_text(rename_tokens(text, renames))
    atomic_write_json(
        folder / EXPORT_MARKER,
        {
            "dataset": fmt.name,
            "image_size": fmt.image_size,
            "dataset_options": store.metadata.get("dataset_options", {}),
            "store": str(store.folder),
            "store_metadata": {k: v for k, v in store.metadata.items() if k != "log"},
            "raymtl": raymtl.__version__,
            "protected": protected,
            "clean": clean,
            "skipped": skipped,
        },
    )
    return ExportReport(folder, protected, clean, skipped)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--store", required=True, help="a store written by python -m raymtl.protect"
    )
    parser.add_argument("--out", required=True, help="new folder for the exported data set")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Export, then say where and how much."""
    args = build_parser().parse_args(argv)
    report = export_protected(args.store, args.out)
    print(
        f"exported {report.protected} protected training images and {report.clean} clean others to {report.out}"
        + (f" ({report.skipped} unreadable samples left out)" if report.skipped else "")
    )
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
