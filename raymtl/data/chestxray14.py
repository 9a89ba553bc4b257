"""NIH ChestX-ray14 as distributed: images under images/ (or images_001/ ... images_012/),
Data_Entry_2017.csv, train_val_list.txt, test_list.txt.

14 findings in the official order, one binary task each, with mean ROC-AUC as the headline metric.
Sample id = patient * 1000 + follow-up (00000001_000.png -> 1000). Grayscale; resize 256, then a
random crop 224 for training and a centre crop otherwise.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np

from raymtl.data.base import DATASETS, DatasetBundle, reject_unknown_options
from raymtl.data.files import (
    DataRoot,
    FileFormat,
    build_file_bundle,
    crop_and_flip,
    decode_image,
    index_table,
    resize_shorter,
    to_chw_uint8,
)
from raymtl.errors import ConfigError
from raymtl.tasks import TaskSpec

FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
ENTRY_FILE, TRAIN_LIST, TEST_LIST = "Data_Entry_2017.csv", "train_val_list.txt", "test_list.txt"
NO_FINDING = "No Finding"


def image_id(name: str) -> int:
    """'00000001_000.png' -> 1 * 1000 + 0."""
    stem = name.rsplit(".", 1)[0]
    patient, _, follow_up = stem.partition("_")
    if not (patient.isdigit() and follow_up.isdigit()):
        raise ValueError(name)
    return int(patient) * 1000 + int(follow_up)


def parse_entries(text: str, source: str) -> dict[str, list[int]]:
    """Data_Entry_2017.csv -> image name -> 14 0/1 labels ('No Finding' = all zero)."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise ConfigError(f"{source}: empty file") from None
    for column in ("Image Index", "Finding Labels"):
        if column not in header:
            raise ConfigError(f"{source}: header has no {column!r} column")
    name_at, labels_at = header.index("Image Index"), header.index("Finding Labels")
    out = {}
    for number, fields in enumerate(reader, start=2):
        if not fields:
            continue
        if len(fields) != len(header):
            raise ConfigError(
                f"{source}: line {number} has {len(fields)} columns, expected {len(header)}"
            )
        findings = [f.strip() for f in fields[labels_at].split("|") if f.strip()]
        unknown = [f for f in findings if f not in FINDINGS and f != NO_FINDING]
        if unknown or not findings or (NO_FINDING in findings and len(findings) > 1):
            raise ConfigError(
                f"{source}: line {number}: bad Finding Labels {fields[labels_at]!r}; expected findings from {', '.join(FINDINGS)} joined by '|', or '{NO_FINDING}'"
            )
        out[fields[name_at]] = [int(f in findings) for f in FINDINGS]
    return out


def find_images(root: DataRoot) -> dict[str, str]:
    """Image name -> relative path, from images/ or the distributed images_NNN/[images/] folders."""
    folders = ["images"] if root.is_dir("images") else []
    for folder in root.list_dirs():
        if folder.startswith("images_"):
            folders.append(f"{folder}/images" if root.is_dir(f"{folder}/images") else folder)
    if not folders:
        raise ConfigError(
            f"{root.path('images')}: missing folder (the X-ray PNGs, or images_001/ ... images_012/)"
        )
    found = {}
    for folder in folders:
        for name in root.list_files(folder):
            if name.lower().endswith(".png"):
                found[name] = f"{folder}/{name}"
    return found


class ChestXray14Format(FileFormat):
    """14 binary findings on grayscale chest X-rays."""

    in_channels = 1
    image_mode = "L"
    label_files = (ENTRY_FILE, TRAIN_LIST, TEST_LIST)

    def __init__(self, resize: int = 256, size: int = 224) -> None:
        super().__init__("chestxray14", ("image",), {"resize": resize, "size": size})
        if size > resize:
            raise ConfigError(f"chestxray14: crop {size} is larger than the resize {resize}")
        self.resize, self.image_size = resize, size

    def tasks(self) -> list[TaskSpec]:
        return [TaskSpec(name, "binary", headline="roc_auc") for name in FINDINGS]

    def index(self, root: DataRoot) -> Any:
        for name, what in (
            (ENTRY_FILE, "labels"),
            (TRAIN_LIST, "training images"),
            (TEST_LIST, "test images"),
        ):
            root.require_file(name, what)
        labels = parse_entries(root.read_text(ENTRY_FILE), root.path(ENTRY_FILE))
        images = find_images(root)
        unlabeled = [n for n in images if n not in labels]
        if unlabeled:
            raise ConfigError(
                f"{root.path(images[unlabeled[0]])}: image has no row in {ENTRY_FILE} ({len(unlabeled)} such images)"
            )
        split_of = {}
        for list_file, split in ((TRAIN_LIST, "train"), (TEST_LIST, "test")):
            for number, line in enumerate(root.read_text(list_file).splitlines(), start=1):
                name = line.strip()
                if not name:
                    continue
                if name not in labels:
                    raise ConfigError(
                        f"{root.path(list_file)}: line {number}: {name!r} has no row in {ENTRY_FILE}"
                    )
                split_of[name] = split
        rows: dict[str, list[Any]] = {
            "id": [],
            "split": [],
            "image": [],
            **{f: [] for f in FINDINGS},
        }
        for name in sorted(split_of):
            try:
                rows["id"].append(image_id(name))
            except ValueError:
                raise ConfigError(
                    f"{root.path(ENTRY_FILE)}: image name {name!r} is not <patient>_<follow-up>.png"
                ) from None
            rows["split"].append(split_of[name])
            rows["image"].append(
                images.get(name, f"images/{name}")
            )  # a missing file is a bad sample
            for finding, value in zip(FINDINGS, labels[name], strict=True):
                rows[finding].append(value)
        return index_table(rows)

    def decode(
        self, files: dict[str, bytes], train: bool, rng: np.random.Generator | None
    ) -> tuple[np.ndarray, dict]:
        image = resize_shorter(decode_image(files["image"], "L", "chest x-ray"), self.resize)
        return crop_and_flip(to_chw_uint8(image), self.image_size, train, rng, flip=False), {}


@DATASETS.register("chestxray14")
def build_chestxray14(
    root: str | None = None, on_bad_sample: str = "error", seed: int = 0, **unknown: Any
) -> DatasetBundle:
    """ChestX-ray14 from its distributed files (official train_val / test lists)."""
    reject_unknown_options("chestxray14", unknown, "on_bad_sample")
    return build_file_bundle(ChestXray14Format(), root, on_bad_sample)
