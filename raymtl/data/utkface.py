"""UTKFace as distributed: files named <age>_<gender>_<race>_<datetime>.jpg (or .jpg.chip.jpg),
directly in the root or in UTKFace/. Tasks: age (9 bins), gender (2), race (5).

Sample id = a stable hash of the file name without its image suffix. Split: a seeded 80/20
draw per id. Malformed names (missing or out-of-range fields, as in a few distributed files) are
reported and skipped.
Preprocessing: resize 140, random crop 128 + flip for training, centre crop otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from raymtl.data.base import DATASETS, DatasetBundle, reject_unknown_options
from raymtl.data.files import (
    DataRoot,
    FileFormat,
    build_file_bundle,
    crop_and_flip,
    decode_image,
    hashed_id,
    index_table,
    resize_shorter,
    seeded_fraction,
    to_chw_uint8,
)
from raymtl.errors import ConfigError
from raymtl.tasks import TaskSpec

log = logging.getLogger(__name__)
AGE_BIN_EDGES = (3, 10, 20, 30, 40, 50, 60, 70)  # bins: <=2, 3-9, 10-19, ..., 60-69, >=70
SUFFIXES = (".jpg.chip.jpg", ".jpg", ".jpg.chip.png", ".png")  # .png: raymtl's lossless exports


def name_stem(name: str) -> str | None:
    """'<age>_<gender>_<race>_<datetime>' without the image suffix (None if it has none); the
    sample id hashes this, so a PNG export of a JPEG keeps its id."""
    return next((name[: -len(s)] for s in SUFFIXES if name.endswith(s)), None)


def age_bin(age: int) -> int:
    """Index of the age bin (0..8)."""
    return sum(age >= edge for edge in AGE_BIN_EDGES)


def parse_name(name: str) -> tuple[int, int, int] | None:
    """(age bin, gender, race) from a UTKFace file name, or None if the name is malformed."""
    stem = name_stem(name)
    if stem is None:
        return None
    fields = stem.split("_")
    if len(fields) != 4 or not all(f.isdigit() for f in fields[:3]):
        return None
    age, gender, race = (int(f) for f in fields[:3])
    if not (0 <= age <= 120 and gender in (0, 1) and 0 <= race <= 4):
        return None
    return age_bin(age), gender, race


class UTKFaceFormat(FileFormat):
    """Age, gender and race from UTKFace's aligned and cropped faces."""

    in_channels = 3

    def __init__(
        self, seed: int = 0, train_fraction: float = 0.8, resize: int = 140, size: int = 128
    ) -> None:
        super().__init__(
            "utkface",
            ("image",),
            {"seed": seed, "train_fraction": train_fraction, "resize": resize, "size": size},
        )
        self.seed, self.train_fraction, self.resize, self.image_size = (
            seed,
            train_fraction,
            resize,
            size,
        )
        self.malformed: list[str] = []

    def tasks(self) -> list[TaskSpec]:
        return [
            TaskSpec("age", "multiclass", 9),
            TaskSpec("gender", "binary"),
            TaskSpec("race", "multiclass", 5),
        ]

    def index(self, root: DataRoot) -> Any:
        folder = "UTKFace" if root.is_dir("UTKFace") else ""
        names = [n for n in root.list_files(folder) if n.lower().endswith((".jpg", ".png"))]
        if not names:
            raise ConfigError(
                f"{root.path(folder)}: no UTKFace images (<age>_<gender>_<race>_<datetime>.jpg)"
            )
        rows: dict[str, list[Any]] = {
            "id": [],
            "split": [],
            "image": [],
            "age": [],
            "gender": [],
            "race": [],
        }
        self.malformed = []
        for name in names:
            parsed = parse_name(name)
            if parsed is None:
                self.malformed.append(name)
                continue
            sample_id = hashed_id(name_stem(name) or name)
            rows["id"].append(sample_id)
            rows["split"].append(
                "train" if seeded_fraction(sample_id, self.seed) < self.train_fraction else "test"
            )
            rows["image"].append(f"{folder}/{name}" if folder else name)
            for task, value in zip(("age", "gender", "race"), parsed, strict=True):
                rows[task].append(value)
        if self.malformed:
            log.warning(
                "utkface: skipped %d file(s) with malformed names, e.g. %s",
                len(self.malformed),
                ", ".join(self.malformed[:3]),
            )
        return index_table(rows)

    def decode(
        self, files: dict[str, bytes], train: bool, rng: np.random.Generator | None
    ) -> tuple[np.ndarray, dict]:
        image = resize_shorter(decode_image(files["image"], "RGB", "utkface image"), self.resize)
        return crop_and_flip(to_chw_uint8(image), self.image_size, train, rng, flip=True), {}


@DATASETS.register("utkface")
def build_utkface(
    root: str | None = None, seed: int = 0, on_bad_sample: str = "error", **unknown: Any
) -> DatasetBundle:
    """UTKFace from its distributed files with a seeded 80/20 train/test split."""
    reject_unknown_options("utkface", unknown, "seed, on_bad_sample")
    fmt = UTKFaceFormat(seed=seed)
    bundle = build_file_bundle(fmt, root, on_bad_sample)
    bundle.options["malformed_names_skipped"] = len(fmt.malformed)
    return bundle
