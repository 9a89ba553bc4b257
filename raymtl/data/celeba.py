"""CelebA as distributed: img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt.

Sample id = the image number (000001.jpg -> 1). Preprocessing (the MTL-UE paper's): centre-crop
140, resize 70, then random crop 64 + horizontal flip for training, centre crop 64 otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raymtl.data.base import DATASETS, DatasetBundle, reject_unknown_options
from raymtl.data.files import (
    DataRoot,
    FileFormat,
    build_file_bundle,
    center_crop,
    crop_and_flip,
    decode_image,
    index_table,
    resize_shorter,
    to_chw_uint8,
)
from raymtl.errors import ConfigError
from raymtl.tasks import TaskSpec

ATTRIBUTES = [
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
]
IMAGES, ATTR_FILE, PARTITION_FILE = (
    "img_align_celeba",
    "list_attr_celeba.txt",
    "list_eval_partition.txt",
)
PARTITIONS = {"0": "train", "1": "val", "2": "test"}


def parse_attributes(text: str, source: str) -> tuple[list[str], dict[str, list[int]]]:
    """Parse list_attr_celeba.txt: a count line, a header of names, then 'file v1 ... vK' with -1/1."""
    lines = text.splitlines()
    if len(lines) < 2:
        raise ConfigError(f"{source}: expected a count line and a header line of attribute names")
    try:
        declared = int(lines[0].split()[0])
    except (ValueError, IndexError):
        raise ConfigError(
            f"{source}: line 1 must be the number of images, got {lines[0][:40]!r}"
        ) from None
    names = lines[1].split()
    if not names:
        raise ConfigError(f"{source}: line 2 must list the attribute names")
    rows: dict[str, list[int]] = {}
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(names) + 1:
            raise ConfigError(
                f"{source}: line {number} has {len(fields)} columns, expected {len(names) + 1} (file name + {len(names)} attributes)"
            )
        values = fields[1:]
        if any(v not in ("1", "-1") for v in values):
            bad = next(v for v in values if v not in ("1", "-1"))
            raise ConfigError(f"{source}: line {number}: attribute value {bad!r}, expected -1 or 1")
        rows[fields[0]] = [1 if v == "1" else 0 for v in values]
    if len(rows) != declared:
        raise ConfigError(
            f"{source}: line 1 declares {declared} images but {len(rows)} rows follow"
        )
    return names, rows


def parse_partition(text: str, source: str) -> dict[str, str]:
    """Parse list_eval_partition.txt: 'file 0|1|2' per line -> file -> train|val|test."""
    out = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in PARTITIONS:
            raise ConfigError(
                f"{source}: line {number}: expected '<file> 0|1|2', got {line.strip()[:60]!r}"
            )
        out[fields[0]] = PARTITIONS[fields[1]]
    return out


class CelebAFormat(FileFormat):
    """CelebA's 40 binary attributes (or a chosen subset) from the aligned-and-cropped images."""

    in_channels = 3
    label_files = (ATTR_FILE, PARTITION_FILE)

    def __init__(
        self, attributes: list[str] | None = None, crop: int = 140, resize: int = 70, size: int = 64
    ) -> None:
        super().__init__(
            "celeba",
            ("image",),
            {"attributes": attributes, "crop": crop, "resize": resize, "size": size},
        )
        self.attributes = list(attributes) if attributes else list(ATTRIBUTES)
        unknown = [a for a in self.attributes if a not in ATTRIBUTES]
        if unknown:
            raise ConfigError(
                f"celeba: unknown attribute(s) {', '.join(unknown)}; available: {', '.join(ATTRIBUTES)}"
            )
        if not size <= resize <= crop:
            raise ConfigError(f"celeba: need size <= resize <= crop, got {size}, {resize}, {crop}")
        self.crop, self.resize, self.image_size = crop, resize, size

    def tasks(self) -> list[TaskSpec]:
        return [TaskSpec(name, "binary") for name in self.attributes]

    def index(self, root: DataRoot) -> Any:
        root.require_dir(IMAGES, "the aligned images")
        root.require_file(ATTR_FILE, "attribute labels")
        root.require_file(PARTITION_FILE, "train/val/test partition")
        names, labels = parse_attributes(root.read_text(ATTR_FILE), root.path(ATTR_FILE))
        missing = [a for a in self.attributes if a not in names]
        if missing:
            raise ConfigError(
                f"{root.path(ATTR_FILE)}: header lacks attribute(s) {', '.join(missing)}"
            )
        partition = parse_partition(root.read_text(PARTITION_FILE), root.path(PARTITION_FILE))
        images = [
            f for f in root.list_files(IMAGES) if f.lower().endswith((".jpg", ".jpeg", ".png"))
        ]
        unlabeled = [f for f in images if f not in labels]
        if unlabeled:
            raise ConfigError(
                f"{root.path(IMAGES)}/{unlabeled[0]}: image has no row in {ATTR_FILE} ({len(unlabeled)} such images)"
            )
        no_split = [f for f in labels if f not in partition]
        if no_split:
            raise ConfigError(
                f"{root.path(PARTITION_FILE)}: no partition for {no_split[0]} ({len(no_split)} such files)"
            )
        columns = [names.index(a) for a in self.attributes]
        files = sorted(labels)  # rows whose image is missing become bad samples (error or skip)
        rows: dict[str, list[Any]] = {"id": [], "split": [], "image": []}
        rows.update({a: [] for a in self.attributes})
        for name in files:
            try:
                sample_id = int(name.split(".")[0])
            except ValueError:
                raise ConfigError(
                    f"{root.path(ATTR_FILE)}: file name {name!r} is not a numbered CelebA image"
                ) from None
            rows["id"].append(sample_id)
            rows["split"].append(partition[name])
            rows["image"].append(f"{IMAGES}/{name}")
            for attribute, column in zip(self.attributes, columns, strict=True):
                rows[attribute].append(labels[name][column])
        return index_table(rows)

    def decode(
        self, files: dict[str, bytes], train: bool, rng: np.random.Generator | None
    ) -> tuple[np.ndarray, dict]:
        image = decode_image(files["image"], "RGB", "celeba image")
        image = resize_shorter(center_crop(image, self.crop), self.resize)
        return crop_and_flip(to_chw_uint8(image), self.image_size, train, rng, flip=True), {}


@DATASETS.register("celeba")
def build_celeba(
    root: str | None = None,
    attributes: str | list[str] | None = None,
    on_bad_sample: str = "error",
    seed: int = 0,
    **unknown: Any,
) -> DatasetBundle:
    """CelebA from its distributed files; ``attributes``: a comma-separated subset of the 40."""
    reject_unknown_options("celeba", unknown, "attributes, on_bad_sample")
    if isinstance(attributes, str):
        attributes = [a for a in attributes.split(",") if a]
    return build_file_bundle(CelebAFormat(attributes), root, on_bad_sample)
