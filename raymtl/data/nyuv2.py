"""NYUv2 in the common preprocessed layout: train/ and val/, each with image/, label/, depth/ and
normal/ holding one .npy per sample (same stem in every folder). 13 segmentation classes.

Sample id = a stable hash of '<split folder>/<stem>'. val/ is the test split. Images may be float
in [0, 1] (or 0..255) or uint8, [H, W, 3]; labels [H, W] with -1 = ignore; depth [H, W] or
[H, W, 1]; normals [H, W, 3].
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from raymtl.data.base import DATASETS, DatasetBundle, reject_unknown_options
from raymtl.data.files import (
    BadSampleError,
    DataRoot,
    FileFormat,
    build_file_bundle,
    hashed_id,
    index_table,
    load_npy,
)
from raymtl.errors import ConfigError
from raymtl.tasks import IGNORE_INDEX, TaskSpec

SPLITS = {"train": "train", "val": "test"}
FOLDERS = {"image": "image", "segmentation": "label", "depth": "depth", "normals": "normal"}
NUM_CLASSES = 13


class NYUv2Format(FileFormat):
    """13-class segmentation, depth and surface normals."""

    in_channels = 3
    image_size = 288  # native height of the common layout (288 x 384); images are not resized

    def __init__(self) -> None:
        super().__init__("nyuv2", tuple(FOLDERS), {})

    def tasks(self) -> list[TaskSpec]:
        return [
            TaskSpec("segmentation", "segmentation", NUM_CLASSES),
            TaskSpec("depth", "depth"),
            TaskSpec("normals", "normals"),
        ]

    @property
    def label_columns(self) -> list[str]:
        return []

    def index(self, root: DataRoot) -> Any:
        rows: dict[str, list[Any]] = {"id": [], "split": [], **{c: [] for c in FOLDERS}}
        for folder, split in SPLITS.items():
            root.require_dir(folder, f"the {split} split")
            stems = {}
            for column, sub in FOLDERS.items():
                root.require_dir(f"{folder}/{sub}", f"{column} files of {folder}/")
                stems[column] = {
                    n[:-4] for n in root.list_files(f"{folder}/{sub}") if n.endswith(".npy")
                }
            for column, sub in FOLDERS.items():
                if column == "image":
                    continue
                lacking = sorted(stems["image"] - stems[column])
                if lacking:
                    raise ConfigError(
                        f"{root.path(f'{folder}/image/{lacking[0]}.npy')}: image has no {sub}/{lacking[0]}.npy ({len(lacking)} such images)"
                    )
            for stem in sorted(stems["image"]):
                rows["id"].append(hashed_id(f"{folder}/{stem}"))
                rows["split"].append(split)
                for column, sub in FOLDERS.items():
                    rows[column].append(f"{folder}/{sub}/{stem}.npy")
        return index_table(rows)

    def export_image(self, relative: str, chw: np.ndarray) -> tuple[str, bytes]:
        """Same path, the layout's float [H, W, 3] in [0, 1]: k/255 reads back as exactly k."""
        buffer = io.BytesIO()
        np.save(buffer, (chw.transpose(1, 2, 0) / np.float32(255)).astype(np.float32))
        return relative, buffer.getvalue()

    def decode_preprocessed(self, files: dict[str, bytes]) -> tuple[np.ndarray, dict]:
        """An export is read like the original: images were never resized."""
        return self.decode(files, False, None)

    def decode(
        self, files: dict[str, bytes], train: bool, rng: np.random.Generator | None
    ) -> tuple[np.ndarray, dict]:
        image = load_npy(files["image"], "nyuv2 image")
        label = load_npy(files["segmentation"], "nyuv2 label")
        depth = load_npy(files["depth"], "nyuv2 depth")
        normal = load_npy(files["normals"], "nyuv2 normal")
        if image.ndim != 3 or image.shape[-1] != 3:
            raise BadSampleError(f"nyuv2 image: shape {image.shape}, expected [H, W, 3]")
        height, width = image.shape[:2]
        depth = (
            depth.reshape(depth.shape[:2]) if depth.ndim == 3 and depth.shape[-1] == 1 else depth
        )
        if (
            label.shape != (height, width)
            or depth.shape != (height, width)
            or normal.shape != (height, width, 3)
        ):
            raise BadSampleError(
                f"nyuv2 sample: shapes image {image.shape}, label {label.shape}, depth {depth.shape}, normal {normal.shape} do not match"
            )
        if image.dtype == np.uint8 or image.max() > 1.5:
            image = image.astype(np.float32) / 255.0
        segmentation = label.astype(np.int64)
        segmentation[(segmentation < 0) | (segmentation >= NUM_CLASSES)] = IGNORE_INDEX
        targets = {
            "segmentation": segmentation,
            "depth": depth.astype(np.float32),
            "normals": normal.astype(np.float32).transpose(2, 0, 1),
        }
        return np.ascontiguousarray(image.astype(np.float32).transpose(2, 0, 1)), targets


@DATASETS.register("nyuv2")
def build_nyuv2(
    root: str | None = None, on_bad_sample: str = "error", seed: int = 0, **unknown: Any
) -> DatasetBundle:
    """NYUv2 from the common preprocessed .npy layout (val/ is the test split)."""
    reject_unknown_options("nyuv2", unknown, "on_bad_sample")
    return build_file_bundle(NYUv2Format(), root, on_bad_sample)
