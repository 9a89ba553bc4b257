"""Ray Data pipelines for real-format data sets, from the raw folders or from Parquet shards.

Files are read and decoded inside ``map_batches`` (the same ``FileFormat.decode`` as the torch
Datasets, so samples are identical); only the small index or the encoded bytes enter Ray, decoded
images stream through and are never materialised. ``--data-root`` may be a URI (s3://...).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from raymtl.data.base import DatasetBundle
from raymtl.data.files import (
    BadSampleError,
    DataRoot,
    FileFormat,
    FileSource,
    ShardRowReader,
    decode_with_path,
)
from raymtl.errors import ConfigError

log = logging.getLogger(__name__)


class DecodeBatch:
    """map_batches callable: a block of index rows -> decoded columns (id, image, labels...)."""

    def __init__(
        self,
        fmt: FileFormat,
        root_uri: str | None,
        train: bool,
        on_bad_sample: str,
        seed: int | None = None,
        shards: list[str] | None = None,
    ) -> None:
        self.format, self.root_uri, self.train = fmt, root_uri, train
        self.on_bad_sample, self.seed, self.shards = on_bad_sample, seed, shards
        self._root: DataRoot | None = None
        self._shard_reader: ShardRowReader | None = None

    def _bytes(self, batch: dict[str, np.ndarray], row: int) -> dict[str, bytes]:
        fmt = self.format
        if self._root is None:
            self._root = DataRoot(self.root_uri)
        if self.shards is not None:  # converted data: read the row from its shard's row group
            if self._shard_reader is None:
                self._shard_reader = ShardRowReader(self._root, self.shards, fmt.file_columns)
            return self._shard_reader.row(int(batch["_shard"][row]), int(batch["_offset"][row]))
        return self._root.read_files({c: str(batch[c][row]) for c in fmt.file_columns})

    def _where(self, batch: dict[str, np.ndarray], row: int) -> str:
        relative = str(batch[self.format.file_columns[0]][row])
        return f"{self.root_uri.rstrip('/')}/{relative}" if self.root_uri else relative

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed) if self.train else None
        images, dense, kept = [], {}, []
        for row in range(len(batch["id"])):
            try:
                where = self._where(batch, row)
                image, targets = decode_with_path(
                    self.format, self._bytes(batch, row), self.train, rng, where
                )
            except BadSampleError as err:
                if self.on_bad_sample == "error":
                    raise
                log.warning("skipping bad sample %s: %s", batch["id"][row], err)
                continue
            kept.append(row)
            images.append(image)
            for name, value in targets.items():
                dense.setdefault(name, []).append(value)
        out = {"id": batch["id"][kept], "image": _stack(images, self.format)}
        for column in self.format.label_columns:
            out[column] = batch[column][kept]
        out.update({name: np.stack(values) for name, values in dense.items()})
        return out


def _stack(images: list[np.ndarray], fmt: FileFormat) -> np.ndarray:
    if images:
        return np.stack(images)
    return np.zeros((0, fmt.in_channels, 1, 1), np.uint8)


def _source(bundle: DatasetBundle) -> FileSource:
    if bundle.source is None:
        raise ConfigError(
            f"data set {bundle.name!r} is generated in memory; Ray Data pipelines read real-format data sets"
        )
    return bundle.source


def ray_dataset(
    bundle: DatasetBundle,
    split: str,
    train: bool | None = None,
    rows_per_block: int = 1024,
    on_bad_sample: str | None = None,
) -> ray.data.Dataset:
    """A streaming Ray Dataset of decoded samples of ``split`` (columns: id, image, labels...).

    Only the small index (ids, labels, file paths or shard positions) enters Ray; each task reads
    and decodes its rows' files (raw folder) or its rows' shard row groups (converted data).
    """
    source = _source(bundle)
    train = (split == "train") if train is None else train
    policy = on_bad_sample or bundle.options.get("on_bad_sample", "error")
    decode = DecodeBatch(source.format, source.root.uri, train, policy, shards=source.parquet_files)
    rows = source.index.filter(pc.equal(source.index["split"], split))
    blocks = [rows.slice(start, rows_per_block) for start in range(0, len(rows), rows_per_block)]
    return ray.data.from_arrow(blocks or [rows]).map_batches(
        decode, batch_size=64, batch_format="numpy"
    )


def iter_engine_batches(
    dataset: ray.data.Dataset, bundle: DatasetBundle, batch_size: int, **kwargs: Any
) -> Iterator[dict[str, Any]]:
    """Batches in the engine's format: {'id', 'image' float [0,1], 'targets': {task: tensor}}."""
    names = [t.name for t in bundle.tasks]
    for batch in iter(dataset.iter_torch_batches(batch_size=batch_size, **kwargs)):
        image = batch["image"]
        image = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
        yield {"id": batch["id"], "image": image, "targets": {n: batch[n] for n in names}}


def ids_and_labels(dataset: ray.data.Dataset, bundle: DatasetBundle) -> pa.Table:
    """The (id, scalar labels) of every sample a pipeline delivers, sorted by id (for checks)."""
    columns = ["id", *_source(bundle).format.label_columns]
    rows = dataset.select_columns(columns).to_arrow_refs()
    return pa.concat_tables(ray.get(rows)).sort_by("id")
