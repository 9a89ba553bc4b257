"""The embedded synthetic multi-task data sets, the default everywhere (no download needed).

``synthetic``: RGB images of one object on a textured background, with clutter and noise. Every
label is an exact function of the generative factors (shape, hue, size, position, fill, ...):
11 binary attributes and 3 multi-class tasks.
``synthetic_dense``: NYUv2-style scenes (tilted floor plane + spheres, boxes and cylinders) with
per-pixel segmentation, depth, and surface normals computed from that depth.

Sample ``id`` seeds its own random stream, so a sample is the same whatever the split sizes.
Train ids are 0..n_train-1; test ids start at TEST_ID_OFFSET.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from raymtl.data.base import DATASETS, DatasetBundle, MultiTaskArrays, reject_unknown_options
from raymtl.errors import ConfigError
from raymtl.tasks import TaskSpec

TEST_ID_OFFSET = 10_000_000

SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS = ("flat", "hstripes", "vstripes", "checker")
HUES = ("red", "yellow", "green", "cyan", "blue", "magenta")
WARM_HUES = (0, 1, 5)
BINARY_ATTRIBUTES = (
    "large",
    "left",
    "top",
    "round",
    "pointed",
    "warm",
    "brighter",
    "striped",
    "hollow",
    "framed",
    "noisy",
)
MULTICLASS_TASKS = {"shape": len(SHAPES), "background": len(BACKGROUNDS), "hue": len(HUES)}
DENSE_CLASSES = ("background", "sphere", "box", "cylinder")


def classification_tasks() -> list[TaskSpec]:
    """The 14 tasks of ``synthetic``: 11 binary attributes, then shape, background and hue."""
    binary = [TaskSpec(name, "binary") for name in BINARY_ATTRIBUTES]
    multi = [TaskSpec(name, "multiclass", n) for name, n in MULTICLASS_TASKS.items()]
    return binary + multi


def dense_tasks() -> list[TaskSpec]:
    """The 3 tasks of ``synthetic_dense``: segmentation, depth, normals."""
    return [
        TaskSpec("segmentation", "segmentation", len(DENSE_CLASSES)),
        TaskSpec("depth", "depth"),
        TaskSpec("normals", "normals"),
    ]


def hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """HSV (each in [0, 1]) to an RGB float32 triple."""
    h = (h % 1.0) * 6.0
    i = int(h)
    f = h - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i % 6]
    return np.asarray(rgb, dtype=np.float32)


def labels_from_factors(factors: dict[str, int]) -> dict[str, int]:
    """Every label of ``synthetic`` as an exact function of the generative factors."""
    return {
        "large": factors["large"],
        "left": factors["left"],
        "top": factors["top"],
        "round": int(factors["shape"] == SHAPES.index("circle")),
        "pointed": int(factors["shape"] == SHAPES.index("triangle")),
        "warm": int(factors["hue"] in WARM_HUES),
        "brighter": factors["brighter"],
        "striped": int(factors["background"] in (1, 2)),
        "hollow": factors["hollow"],
        "framed": factors["framed"],
        "noisy": factors["noisy"],
        "shape": factors["shape"],
        "background": factors["background"],
        "hue": factors["hue"],
    }


def _shape_sdf(shape: int, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) to a shape of radius ``r`` centred at 0."""
    if shape == 0:  # circle
        return np.hypot(dx, dy) - r
    if shape == 1:  # square
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.8 * r
    if shape == 2:  # triangle, apex up (image y grows downwards)
        big_r = 1.15 * r
        edges = [(0.0, 1.0), (-0.8660254, -0.5), (0.8660254, -0.5)]
        return np.max([nx * dx + ny * dy for nx, ny in edges], axis=0) - big_r / 2
    arm, half = 0.95 * r, 0.42 * r  # cross
    bar_h = np.maximum(np.abs(dx) - arm, np.abs(dy) - half)
    bar_v = np.maximum(np.abs(dx) - half, np.abs(dy) - arm)
    return np.minimum(bar_h, bar_v)


def _blend(under: np.ndarray, over: np.ndarray, contrast: float) -> np.ndarray:
    """``over`` drawn at ``contrast`` opacity on ``under`` (1.0: fully opaque)."""
    return over if contrast == 1.0 else under + contrast * (over - under)


def draw_factors(rng: np.random.Generator) -> dict[str, int]:
    """Draw the discrete generative factors of one ``synthetic`` image."""
    return {
        "shape": int(rng.integers(len(SHAPES))),
        "background": int(rng.integers(len(BACKGROUNDS))),
        "hue": int(rng.integers(len(HUES))),
        "large": int(rng.integers(2)),
        "left": int(rng.integers(2)),
        "top": int(rng.integers(2)),
        "brighter": int(rng.integers(2)),
        "hollow": int(rng.integers(2)),
        "framed": int(rng.integers(2)),
        "noisy": int(rng.integers(2)),
    }


def render_classification(
    seed: int, sample_id: int, size: int, contrast: float = 1.0
) -> tuple[np.ndarray, dict]:
    """Render one ``synthetic`` image (uint8 [3,H,W]) and return it with its factors.

    ``contrast`` scales every label-carrying difference (texture shade, frame, object, clutter
    and the extra noise of 'noisy' images) relative to the background; 1.0 is the default set."""
    rng = np.random.default_rng([seed, sample_id])
    f = draw_factors(rng)
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    # Background: a low-saturation colour and a second shade for the texture.
    v_back = rng.uniform(0.25, 0.75)
    h_back, s_back = rng.uniform(), rng.uniform(0.0, 0.3)
    shade = float(np.clip(v_back + contrast * rng.choice([-1, 1]) * rng.uniform(0.12, 0.2), 0, 1))
    c1, c2 = hsv_to_rgb(h_back, s_back, v_back), hsv_to_rgb(h_back, s_back, shade)
    period = s / rng.choice([5.0, 7.0])
    phase_y, phase_x = rng.uniform(0, period, size=2)
    if f["background"] == 1:
        pattern = ((yy + phase_y) // (period / 2)) % 2
    elif f["background"] == 2:
        pattern = ((xx + phase_x) // (period / 2)) % 2
    elif f["background"] == 3:
        pattern = (((yy + phase_y) // (period / 2)) + ((xx + phase_x) // (period / 2))) % 2
    else:
        pattern = np.zeros_like(xx)
    image = c1[:, None, None] * (1 - pattern) + c2[:, None, None] * pattern

    if f["framed"]:
        width = max(1, round(s / 32))
        sign = 1 if v_back < 0.5 else -1
        frame = hsv_to_rgb(
            rng.uniform(), rng.uniform(0.2, 1.0), v_back + sign * rng.uniform(0.3, 0.45)
        )
        border = np.zeros((size, size), bool)
        border[:width], border[-width:], border[:, :width], border[:, -width:] = (True,) * 4
        image[:, border] = _blend(image[:, border], frame[:, None], contrast)

    # The object.
    radius = s * (0.27 if f["large"] else 0.17)
    gap = 0.05 * s
    lo, hi = 0.6 * radius, s / 2 - gap
    cx = rng.uniform(lo, hi) if f["left"] else s - rng.uniform(lo, hi)
    cy = rng.uniform(lo, hi) if f["top"] else s - rng.uniform(lo, hi)
    v_obj = v_back + (1 if f["brighter"] else -1) * rng.uniform(0.25, 0.4)
    hue = f["hue"] / len(HUES) + rng.uniform(-0.02, 0.02)
    colour = hsv_to_rgb(hue, rng.uniform(0.65, 1.0), float(np.clip(v_obj, 0.0, 1.0)))
    sdf = _shape_sdf(f["shape"], xx - cx, yy - cy, radius)
    mask = sdf <= 0
    if f["hollow"]:
        mask &= sdf > -max(1.0, 0.045 * s)
    image[:, mask] = _blend(image[:, mask], colour[:, None], contrast)

    # Clutter: small dots and short lines of random colour that carry no label.
    for _ in range(int(rng.integers(2, 6))):
        clutter_colour = rng.uniform(0, 1, size=3).astype(np.float32)
        x0, y0 = rng.integers(0, size, size=2)
        if rng.uniform() < 0.5:
            k = max(1, round(s / 32 * rng.integers(1, 3)))
            patch = image[:, y0 : y0 + k, x0 : x0 + k]
            image[:, y0 : y0 + k, x0 : x0 + k] = _blend(
                patch, clutter_colour[:, None, None], contrast
            )
        else:
            length = max(2, round(s / 32 * rng.integers(3, 6)))
            if rng.uniform() < 0.5:
                line = image[:, y0, x0 : x0 + length]
                image[:, y0, x0 : x0 + length] = _blend(line, clutter_colour[:, None], contrast)
            else:
                line = image[:, y0 : y0 + length, x0]
                image[:, y0 : y0 + length, x0] = _blend(line, clutter_colour[:, None], contrast)

    sigma = 0.02 + (0.07 * contrast if f["noisy"] else 0.0)
    image = image + rng.normal(0.0, sigma, size=image.shape)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8), f


def normals_from_depth(depth: np.ndarray, pixel_size: float) -> np.ndarray:
    """Unit surface normals [3,H,W] of a depth map (camera looks along +z; normals face it)."""
    dz_dy, dz_dx = np.gradient(depth, pixel_size)
    normal = np.stack([dz_dx, dz_dy, -np.ones_like(depth)])
    return (normal / np.linalg.norm(normal, axis=0, keepdims=True)).astype(np.float32)


def _fog(depth: np.ndarray) -> np.ndarray:
    """The fog a dense scene's pixels get at ``depth``: none up to 3 units, 0.35 from 9."""
    return np.clip((depth - 3.0) / 6.0, 0, 1) * 0.35


def render_dense(
    seed: int, sample_id: int, size: int, contrast: float = 1.0
) -> dict[str, np.ndarray]:
    """Render one ``synthetic_dense`` scene: image uint8 [3,H,W], segmentation, depth, normals.

    ``contrast`` blends the rendered scene toward a label-free one (the bare checkered floor,
    flat-shaded, at a fixed fog), so objects, shading and fog, everything that carries the
    labels, stand out by that fraction of their default difference (1.0: the default images)."""
    rng = np.random.default_rng([seed, sample_id])
    s = float(size)
    pixel = 4.0 / s  # the image spans 4 world units
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    xw, yw = (xx - s / 2) * pixel, (yy - s / 2) * pixel

    floor = rng.uniform(5.0, 7.0) + rng.uniform(-0.3, 0.3) * xw + rng.uniform(-0.6, 0.6) * yw
    depth = floor.copy()
    segmentation = np.zeros((size, size), np.int64)
    floor_a, floor_b = hsv_to_rgb(rng.uniform(), 0.3, 0.8), hsv_to_rgb(rng.uniform(), 0.3, 0.5)
    cell = s / 4
    checker = ((xx // cell + yy // cell) % 2).astype(np.float32)
    albedo = floor_a[:, None, None] * (1 - checker) + floor_b[:, None, None] * checker
    bare_floor = albedo.copy()  # label-free: no objects (for contrast < 1)

    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(1, len(DENSE_CLASSES)))
        cx, cy = rng.uniform(0.15 * s, 0.85 * s, size=2)
        radius = rng.uniform(0.12, 0.22) * s * pixel
        dx, dy = (xx - cx) * pixel, (yy - cy) * pixel
        z_centre = floor[int(cy), int(cx)] - rng.uniform(0.8, 2.0)
        if kind == 1:  # sphere
            inside = dx**2 + dy**2 < radius**2
            surface = z_centre - np.sqrt(np.clip(radius**2 - dx**2 - dy**2, 0, None))
        elif kind == 2:  # box seen from the front, face tilted
            inside = np.maximum(np.abs(dx), np.abs(dy)) < 0.85 * radius
            tilt_x, tilt_y = rng.uniform(-0.8, 0.8, size=2)
            surface = z_centre - 0.5 * radius + tilt_x * dx + tilt_y * dy
        else:  # upright cylinder
            half_width = 0.7 * radius
            inside = (np.abs(dx) < half_width) & (np.abs(dy) < 1.1 * radius)
            surface = z_centre - np.sqrt(np.clip(half_width**2 - dx**2, 0, None))
        nearer = inside & (surface < depth)
        depth = np.where(nearer, surface, depth)
        segmentation[nearer] = kind
        colour = hsv_to_rgb(rng.uniform(), rng.uniform(0.5, 0.9), rng.uniform(0.6, 1.0))
        albedo[:, nearer] = colour[:, None]

    normals = normals_from_depth(depth, pixel)
    light = np.array([0.4, -0.5, -1.0]) / np.linalg.norm([0.4, -0.5, -1.0])
    lambert = np.clip(np.tensordot(light, normals, axes=1), 0, 1)
    image = albedo * (0.35 + 0.65 * lambert)
    fog = _fog(depth)
    image = image * (1 - fog) + 0.6 * fog
    if contrast != 1.0:  # the floor facing the camera, at the fog of the floor's mean depth
        flat_fog = _fog(np.float64(6.0))
        flat = bare_floor * (0.35 + 0.65 * float(np.clip(-light[2], 0, 1)))
        image = _blend(flat * (1 - flat_fog) + 0.6 * flat_fog, image, contrast)
    image = image + rng.normal(0, 0.02, size=image.shape)
    return {
        "image": np.clip(np.rint(image * 255), 0, 255).astype(np.uint8),
        "segmentation": segmentation,
        "depth": depth.astype(np.float32),
        "normals": normals,
    }


def make_classification_split(
    seed: int, ids: np.ndarray, size: int, split: str, contrast: float = 1.0
) -> MultiTaskArrays:
    """Render the given sample ids of ``synthetic`` into an in-memory split."""
    images = np.empty((len(ids), 3, size, size), np.uint8)
    factor_rows = []
    for row, sample_id in enumerate(ids):
        images[row], factors = render_classification(seed, int(sample_id), size, contrast)
        factor_rows.append(factors)
    factors = {k: np.array([fr[k] for fr in factor_rows]) for k in factor_rows[0]}
    label_rows = [labels_from_factors(fr) for fr in factor_rows]
    targets = {
        t.name: torch.tensor([lr[t.name] for lr in label_rows], dtype=torch.long)
        for t in classification_tasks()
    }
    return MultiTaskArrays(torch.from_numpy(images), targets, torch.from_numpy(ids), split, factors)


def make_dense_split(
    seed: int, ids: np.ndarray, size: int, split: str, contrast: float = 1.0
) -> MultiTaskArrays:
    """Render the given sample ids of ``synthetic_dense`` into an in-memory split."""
    scenes = [render_dense(seed, int(i), size, contrast) for i in ids]
    stack = {k: torch.from_numpy(np.stack([sc[k] for sc in scenes])) for k in scenes[0]}
    images = stack.pop("image")
    return MultiTaskArrays(images, stack, torch.from_numpy(ids), split)


def _contrast(value: Any) -> float:
    """The ``contrast`` option as a number in (0, 1]; ConfigError otherwise."""
    try:
        contrast = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"data set option contrast must be a number, got {value!r}") from None
    if not 0 < contrast <= 1:
        raise ConfigError(f"contrast must be in (0, 1], got {contrast}")
    return contrast


def _integer(key: str, value: Any) -> int:
    """An integer option, given as a number or (from --data-option) as text."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"data set option {key} must be an integer, got {value!r}") from None


def _build(
    name: str,
    tasks: list[TaskSpec],
    make_split: Any,
    n_train: int,
    n_test: int,
    image_size: int,
    seed: int,
    unknown: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> DatasetBundle:
    extra = extra or {}
    reject_unknown_options(
        name, unknown, ", ".join(["n_train", "n_test", "image_size", "seed", *extra])
    )
    n_train, n_test, image_size, seed = (
        _integer(key, value)
        for key, value in zip(
            ("n_train", "n_test", "image_size", "seed"),
            (n_train, n_test, image_size, seed),
            strict=True,
        )
    )
    if n_train < 1 or n_test < 1:
        raise ConfigError(f"n_train and n_test must be >= 1 (got {n_train}, {n_test})")
    if n_train > TEST_ID_OFFSET:
        raise ConfigError(f"n_train must be <= {TEST_ID_OFFSET}")
    if image_size < 16:
        raise ConfigError(f"image_size must be >= 16 pixels (got {image_size})")
    train_ids = np.arange(n_train, dtype=np.int64)
    test_ids = TEST_ID_OFFSET + np.arange(n_test, dtype=np.int64)
    return DatasetBundle(
        name=name,
        tasks=tasks,
        train=make_split(seed, train_ids, image_size, "train"),
        test=make_split(seed, test_ids, image_size, "test"),
        in_channels=3,
        image_size=image_size,
        options={
            "n_train": n_train,
            "n_test": n_test,
            "image_size": image_size,
            "seed": seed,
            **extra,
        },
    )


@DATASETS.register("synthetic")
def build_synthetic(
    root: str | None = None,
    n_train: int = 10_000,
    n_test: int = 2_000,
    image_size: int = 32,
    seed: int = 0,
    contrast: float = 1.0,
    **unknown: Any,
) -> DatasetBundle:
    """The embedded classification set: 11 binary + 3 multi-class tasks, 32 px RGB by default.
    ``contrast`` (0, 1] scales how strongly the labelled features stand out from the background."""
    contrast = _contrast(contrast)
    return _build(
        "synthetic",
        classification_tasks(),
        functools.partial(make_classification_split, contrast=contrast),
        n_train,
        n_test,
        image_size,
        seed,
        unknown,
        {"contrast": contrast} if contrast != 1.0 else {},
    )


@DATASETS.register("synthetic_dense")
def build_synthetic_dense(
    root: str | None = None,
    n_train: int = 2_000,
    n_test: int = 500,
    image_size: int = 32,
    seed: int = 0,
    contrast: float = 1.0,
    **unknown: Any,
) -> DatasetBundle:
    """The embedded dense set (NYUv2-style): segmentation (4 classes), depth, normals.
    ``contrast`` (0, 1] scales how strongly objects, shading and fog stand out."""
    contrast = _contrast(contrast)
    return _build(
        "synthetic_dense",
        dense_tasks(),
        functools.partial(make_dense_split, contrast=contrast),
        n_train,
        n_test,
        image_size,
        seed,
        unknown,
        {"contrast": contrast} if contrast != 1.0 else {},
    )
