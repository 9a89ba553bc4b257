"""Write small data sets in their publishers' exact file formats, for tests and benchmarks.

Real data sets cannot be downloaded here; these writers reproduce the distributed layouts (file
names, header lines, separators, value encodings) with generated pixels.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from raymtl.data.celeba import ATTRIBUTES
from raymtl.data.chestxray14 import FINDINGS


def _face_like(rng: np.random.Generator, width: int, height: int, channels: int = 3) -> np.ndarray:
    """A smooth image (gradient + blobs) that compresses like a photo, not like noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, size=channels)
    image = base + rng.uniform(-0.3, 0.3) * xx[..., None] + rng.uniform(-0.3, 0.3) * yy[..., None]
    for _ in range(4):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(8, width / 3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        image = image + blob[..., None] * rng.uniform(-80, 80, size=channels)
    image = image + rng.normal(0, 3, size=image.shape)
    out = np.clip(image, 0, 255).astype(np.uint8)
    return out[..., 0] if channels == 1 else out


def encode(array: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    """Encode an HxW or HxWx3 uint8 array as JPEG or PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(
        buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {})
    )
    return buffer.getvalue()


def write_celeba(
    root: str | Path,
    n: int,
    seed: int = 0,
    width: int = 178,
    height: int = 218,
    split_every: tuple[int, int, int] = (8, 1, 1),
) -> Path:
    """img_align_celeba/NNNNNN.jpg, list_attr_celeba.txt (count, header, ' 1'/'-1' columns),
    list_eval_partition.txt; partitions cycle train/val/test in the given proportions."""
    root = Path(root)
    (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cycle = ["0"] * split_every[0] + ["1"] * split_every[1] + ["2"] * split_every[2]
    attr_lines = [f"{n}", " ".join(ATTRIBUTES) + " "]
    partition_lines = []
    for i in range(1, n + 1):
        name = f"{i:06d}.jpg"
        (root / "img_align_celeba" / name).write_bytes(
            encode(_face_like(rng, width, height), "JPEG")
        )
        values = rng.choice(["-1", " 1"], size=len(ATTRIBUTES))
        attr_lines.append(f"{name} " + " ".join(values))
        partition_lines.append(f"{name} {cycle[(i - 1) % len(cycle)]}")
    (root / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(partition_lines) + "\n")
    return root


CHEST_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"


def write_chestxray14(
    root: str | Path, n: int, seed: int = 0, size: int = 64, layout: str = "images"
) -> Path:
    """PNG X-rays under images/ (layout='images') or images_001/images/ ... ('split'),
    Data_Entry_2017.csv with the distributed header, train_val_list.txt and test_list.txt."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows, train, test = [CHEST_HEADER], [], []
    for i in range(n):
        patient, follow_up = i // 2 + 1, i % 2
        name = f"{patient:08d}_{follow_up:03d}.png"
        folder = (
            root / "images" if layout == "images" else root / f"images_{i % 2 + 1:03d}" / "images"
        )
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(encode(_face_like(rng, size, size, channels=1), "PNG"))
        count = int(rng.choice([0, 0, 1, 2]))
        findings = (
            "|".join(rng.choice(FINDINGS, size=count, replace=False)) if count else "No Finding"
        )
        rows.append(
            f"{name},{findings},{follow_up},{patient},{int(rng.integers(20, 80))},{'MF'[i % 2]},PA,{size},{size},0.143,0.143,"
        )
        (test if i % 5 == 4 else train).append(name)
    (root / "Data_Entry_2017.csv").write_text("\n".join(rows) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(train) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return root


def write_utkface(
    root: str | Path, n: int, seed: int = 0, size: int = 48, malformed: int = 0, chip: bool = False
) -> Path:
    """UTKFace/<age>_<gender>_<race>_<datetime>.jpg[.chip.jpg], plus ``malformed`` names that lack
    a field (as a few distributed files do)."""
    folder = Path(root) / "UTKFace"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".jpg.chip.jpg" if chip else ".jpg"
    for i in range(n):
        age, gender, race = (
            int(rng.integers(1, 100)),
            int(rng.integers(0, 2)),
            int(rng.integers(0, 5)),
        )
        name = f"{age}_{gender}_{race}_2017011{i:010d}{suffix}"
        (folder / name).write_bytes(encode(_face_like(rng, size, size), "JPEG"))
    for i in range(malformed):
        (folder / f"{30 + i}_1_20170116{i:09d}{suffix}").write_bytes(
            encode(_face_like(rng, size, size), "JPEG")
        )
    return Path(root)


def write_nyuv2(
    root: str | Path, n_train: int, n_val: int, seed: int = 0, height: int = 24, width: int = 32
) -> Path:
    """train/ and val/ with image/, label/, depth/, normal/ holding N.npy each (float image in
    [0, 1] [H,W,3]; int label [H,W] with -1 = ignore; depth [H,W,1]; unit normals [H,W,3])."""
    rng = np.random.default_rng(seed)
    for folder, count in (("train", n_train), ("val", n_val)):
        for sub in ("image", "label", "depth", "normal"):
            (Path(root) / folder / sub).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            base = Path(root) / folder
            np.save(
                base / "image" / f"{i}.npy",
                rng.uniform(0, 1, (height, width, 3)).astype(np.float32),
            )
            label = rng.integers(-1, 13, (height, width)).astype(np.float32)
            np.save(base / "label" / f"{i}.npy", label)
            np.save(
                base / "depth" / f"{i}.npy",
                rng.uniform(0.5, 10, (height, width, 1)).astype(np.float32),
            )
            normal = rng.normal(size=(height, width, 3)).astype(np.float32)
            np.save(
                base / "normal" / f"{i}.npy",
                normal / np.linalg.norm(normal, axis=-1, keepdims=True),
            )
    return Path(root)
