"""Data sets read from their publishers' files: shared machinery for every real-format reader.

A ``FileFormat`` says how to index a data set's folder (sample id, split, relative file paths,
labels) and how to decode one sample from its files' bytes. From that one definition come the
torch Datasets (raw folder or converted Parquet shards), the Parquet converter and the Ray Data
pipelines, so all of them yield identical samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from raymtl.data.base import DatasetBundle
from raymtl.errors import ConfigError
from raymtl.tasks import TaskSpec

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
EXPORT_MARKER = "raymtl_export.json"  # an exported (protected) copy, images at model input size
BAD_SAMPLE_POLICIES = ("error", "skip")


class BadSampleError(ValueError):
    """One sample cannot be read or decoded; the message names the file and the problem."""


class DataRoot:
    """A data set's root folder: a local path or any URI that pyarrow understands (s3://, file://)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        text = str(root)
        self.uri = text
        if "://" in text:
            try:
                self.fs, self.base = pafs.FileSystem.from_uri(text)
            except (pa.ArrowInvalid, OSError) as err:
                raise ConfigError(f"--data-root {text}: cannot open: {err}") from None
            self.local = isinstance(self.fs, pafs.LocalFileSystem)
        else:
            self.fs, self.base, self.local = pafs.LocalFileSystem(), os.path.abspath(text), True
        self.base = self.base.rstrip("/")

    def path(self, relative: str) -> str:
        """Absolute path (within the filesystem) of a relative path."""
        return f"{self.base}/{relative}" if relative else self.base

    def is_dir(self, relative: str = "") -> bool:
        """True if the relative path is an existing folder."""
        return self.fs.get_file_info(self.path(relative)).type == pafs.FileType.Directory

    def is_file(self, relative: str) -> bool:
        """True if the relative path is an existing file."""
        return self.fs.get_file_info(self.path(relative)).type == pafs.FileType.File

    def list_files(self, relative: str = "") -> list[str]:
        """Names of the files directly inside a folder (sorted)."""
        if self.local:
            with os.scandir(self.path(relative)) as entries:
                return sorted(e.name for e in entries if e.is_file())
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(relative)))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def list_dirs(self, relative: str = "") -> list[str]:
        """Names of the folders directly inside a folder (sorted)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(relative)))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def read_bytes(self, relative: str) -> bytes:
        """The whole file."""
        if self.local:
            with open(self.path(relative), "rb") as handle:
                return handle.read()
        with self.fs.open_input_stream(self.path(relative)) as handle:
            return handle.read()

    def read_files(self, relatives: dict[str, str]) -> dict[str, bytes]:
        """One sample's files {column: relative path} -> {column: bytes}; BadSampleError names
        the file that cannot be read."""
        out = {}
        for column, relative in relatives.items():
            try:
                out[column] = self.read_bytes(relative)
            except OSError as err:
                raise BadSampleError(
                    f"{self.path(relative)}: cannot read: {err.strerror or err}"
                ) from None
        return out

    def read_text(self, relative: str) -> str:
        """The whole file as UTF-8 text."""
        return self.read_bytes(relative).decode("utf-8")

    def require_dir(self, relative: str, what: str) -> None:
        """ConfigError unless the folder exists."""
        if not self.is_dir(relative):
            raise ConfigError(f"{self.path(relative)}: missing folder ({what})")

    def require_file(self, relative: str, what: str) -> None:
        """ConfigError unless the file exists."""
        if not self.is_file(relative):
            raise ConfigError(f"{self.path(relative)}: missing file ({what})")


def hashed_id(key: str) -> int:
    """A stable non-negative 63-bit id from a string key (the file's name within the data set)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def seeded_fraction(sample_id: int, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, id): splits that do not depend on file order."""
    digest = hashlib.blake2b(f"{seed}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# ---------------------------------------------------------------- image preprocessing


def decode_image(data: bytes, mode: str, name: str) -> Image.Image:
    """Decode JPEG/PNG bytes to a PIL image in ``mode`` ('RGB' or 'L'); BadSampleError if corrupt."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadSampleError(f"{name}: cannot decode image: {err}") from None
    return image.convert(mode) if image.mode != mode else image


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the central size×size square (or as much as fits)."""
    width, height = image.size
    left, top = max(0, (width - size) // 2), max(0, (height - size) // 2)
    return image.crop((left, top, left + min(size, width), top + min(size, height)))


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bilinear, antialiased)."""
    width, height = image.size
    scale = size / min(width, height)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(new, Image.BILINEAR) if new != image.size else image


def to_chw_uint8(image: Image.Image) -> np.ndarray:
    """PIL image to a uint8 array [C, H, W]."""
    array = np.asarray(image, dtype=np.uint8)
    return array[None].copy() if array.ndim == 2 else array.transpose(2, 0, 1).copy()


def crop_and_flip(
    image: np.ndarray, size: int, train: bool, rng: np.random.Generator | None, flip: bool
) -> np.ndarray:
    """Random crop (+ horizontal flip) for training, centre crop otherwise; image is [C, H, W]."""
    _, height, width = image.shape
    if train and rng is not None:
        top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    else:
        top, left = (height - size) // 2, (width - size) // 2
    out = image[:, top : top + size, left : left + size]
    if train and flip and rng is not None and rng.random() < 0.5:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out)


def load_npy(data: bytes, name: str) -> np.ndarray:
    """Decode .npy bytes; BadSampleError if malformed."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise BadSampleError(f"{name}: cannot read .npy: {err}") from None


# ---------------------------------------------------------------- formats


@dataclass
class FileFormat(ABC):
    """How one publisher's data set is laid out and decoded. Subclasses fill in the three methods.

    ``file_columns`` name the index columns holding relative file paths (the first is the image);
    ``label_columns`` the scalar label columns (stored as int64).
    """

    name: str
    file_columns: tuple[str, ...] = ("image",)
    options: dict[str, Any] = field(default_factory=dict)

    @abstractmethod
    def tasks(self) -> list[TaskSpec]:
        """The tasks this data set provides (after any task subset option)."""

    @property
    def label_columns(self) -> list[str]:
        """Scalar label columns of the index (classification tasks)."""
        return [t.name for t in self.tasks() if not t.dense]

    @abstractmethod
    def index(self, root: DataRoot) -> pa.Table:
        """Validate the folder and return its sample table: id, split, file columns, labels."""

    @abstractmethod
    def decode(
        self, files: dict[str, bytes], train: bool, rng: np.random.Generator | None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One sample's image ([C,H,W], uint8 or float32 in [0,1]) and dense targets from its bytes."""

    # Class-level defaults that subclasses override (ClassVar: not constructor fields, which
    # would reset a subclass's value when it calls this class's __init__).
    in_channels: ClassVar[int] = 3
    image_size: ClassVar[int] = 64
    image_mode: ClassVar[str] = "RGB"  # PIL mode of the images ('L' for grayscale)
    label_files: ClassVar[tuple[str, ...]] = ()  # text files naming the images (export rewrites)
    preprocessed: ClassVar[bool] = False  # True for raymtl exports: images at the model's size

    def exported_name(self, relative: str) -> str:
        """Where an image goes in an export: the same path, as a lossless PNG (δ survives)."""
        stem, dot, _ = relative.rpartition(".")
        return f"{stem}.png" if dot else f"{relative}.png"

    def export_image(self, relative: str, chw: np.ndarray) -> tuple[str, bytes]:
        """An exported image's path and bytes, from its uint8 [C,H,W] pixels (with δ applied)."""
        buffer = io.BytesIO()
        array = chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0)
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
        return self.exported_name(relative), buffer.getvalue()

    def decode_preprocessed(self, files: dict[str, bytes]) -> tuple[np.ndarray, dict]:
        """An exported image: already cropped and resized, so decoded as it is (no geometry)."""
        image = to_chw_uint8(decode_image(files["image"], self.image_mode, f"{self.name} image"))
        expected = (self.in_channels, self.image_size, self.image_size)
        if image.shape != expected:
            raise BadSampleError(
                f"exported image has shape {image.shape}, expected {expected} (the export's image size)"
            )
        return image, {}


def read_manifest(root: DataRoot) -> dict[str, Any] | None:
    """The converter's manifest if ``root`` holds Parquet shards, else None."""
    if not root.is_file(MANIFEST):
        return None
    try:
        return json.loads(root.read_text(MANIFEST))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{root.path(MANIFEST)}: not valid JSON: {err}") from None


def decode_with_path(
    fmt: FileFormat,
    files: dict[str, bytes],
    train: bool,
    rng: np.random.Generator | None,
    where: str,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``fmt.decode`` whose BadSampleError names the sample's file (``where``)."""
    try:
        if fmt.preprocessed:
            return fmt.decode_preprocessed(files)
        return fmt.decode(files, train, rng)
    except BadSampleError as err:
        raise BadSampleError(f"{where}: {err}") from None


def _sample_from(
    fmt: FileFormat,
    files: dict[str, bytes],
    labels: dict[str, int],
    sample_id: int,
    train: bool,
    rng: np.random.Generator | None,
    where: str,
) -> dict[str, Any]:
    image, dense = decode_with_path(fmt, files, train, rng, where)
    tensor = torch.from_numpy(image)
    tensor = tensor.float().div_(255.0) if tensor.dtype == torch.uint8 else tensor.float()
    targets = {name: torch.tensor(value, dtype=torch.long) for name, value in labels.items()}
    targets.update({name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in dense.items()})
    return {"id": torch.tensor(sample_id, dtype=torch.long), "image": tensor, "targets": targets}


class FileDataset(Dataset):
    """Samples of a real-format data set, read and decoded one by one (DataLoader workers ok).

    ``rows`` is the index restricted to this split; with converted shards, ``parquet`` gives the
    files' bytes by global row (index column ``_row``). With ``on_bad_sample='skip'`` an unreadable
    sample yields None, which the collate function drops; consumers count what they did not get.
    """

    def __init__(
        self,
        fmt: FileFormat,
        root: DataRoot,
        rows: pa.Table,
        split: str,
        on_bad_sample: str = "error",
        parquet: ParquetBytes | None = None,
    ) -> None:
        self.format, self.root, self.rows, self.split = fmt, root, rows, split
        self.train = split == "train"
        self.on_bad_sample = on_bad_sample
        self.parquet = parquet
        self.ids = torch.tensor(rows["id"].to_numpy(), dtype=torch.long)
        self.labels = {c: rows[c].to_numpy() for c in fmt.label_columns}
        self.paths = {c: rows[c].to_pylist() for c in fmt.file_columns}

    def __len__(self) -> int:
        return len(self.ids)

    def subset(
        self, positions: Sequence[int] | torch.Tensor, split: str | None = None
    ) -> FileDataset:
        """The given row positions as a new dataset (``split`` other than 'train': no augmentation)."""
        take = pa.array(np.asarray(positions, dtype=np.int64))
        return FileDataset(
            self.format,
            self.root,
            self.rows.take(take),
            split or self.split,
            self.on_bad_sample,
            self.parquet,
        )

    def file_bytes(self, position: int) -> dict[str, bytes]:
        """The raw bytes of one sample's files."""
        if self.parquet is not None:
            return self.parquet.row(int(self.rows["_row"][position].as_py()))
        return self.root.read_files({c: self.paths[c][position] for c in self.format.file_columns})

    def __getitem__(self, position: int) -> dict[str, Any] | None:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()))) if self.train else None
        labels = {c: int(v[position]) for c, v in self.labels.items()}
        try:
            where = self.root.path(self.paths[self.format.file_columns[0]][position])
            return _sample_from(
                self.format,
                self.file_bytes(position),
                labels,
                int(self.ids[position]),
                self.train,
                rng,
                where,
            )
        except BadSampleError as err:
            if self.on_bad_sample == "error":
                raise
            log.warning("skipping bad sample: %s", err)
            return None


class ShardRowReader:
    """Reads single rows' file bytes from converted shards, one row group at a time (cached).

    Used by pipelines that walk the index in order: each row group is read once per task.
    """

    def __init__(
        self, root: DataRoot, shards: list[str], file_columns: Sequence[str], cache_size: int = 4
    ) -> None:
        self.root, self.shards = root, shards
        self.columns = [f"{c}_bytes" for c in file_columns]
        self.cache_size = cache_size
        self._starts: dict[int, np.ndarray] = {}
        self._groups: dict[tuple[int, int], pa.Table] = {}

    def row(self, shard: int, offset: int) -> dict[str, bytes]:
        """The files of row ``offset`` of shard number ``shard``."""
        import pyarrow.parquet as pq

        if shard not in self._starts:
            meta = pq.read_metadata(self.root.path(self.shards[shard]), filesystem=self.root.fs)
            self._starts[shard] = np.cumsum(
                [0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            )
        starts = self._starts[shard]
        group = int(np.searchsorted(starts, offset, side="right") - 1)
        key = (shard, group)
        if key not in self._groups:
            if len(self._groups) >= self.cache_size:
                self._groups.pop(next(iter(self._groups)))
            with self.root.fs.open_input_file(self.root.path(self.shards[shard])) as handle:
                self._groups[key] = pq.ParquetFile(handle).read_row_group(
                    group, columns=self.columns
                )
        table = self._groups[key]
        local = offset - int(starts[group])
        return {c.removesuffix("_bytes"): table[c][local].as_py() for c in self.columns}


class ParquetBytes:
    """The encoded files of converted shards, loaded on first use (per process) and kept.

    Only torch Datasets over Parquet need it; indexing and Ray pipelines never load the bytes.
    """

    def __init__(self, root: DataRoot, shards: list[str], file_columns: Sequence[str]) -> None:
        self.root, self.shards, self.columns = root, shards, [f"{c}_bytes" for c in file_columns]
        self._table: pa.Table | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_table": None}  # DataLoader workers load their own copy

    def row(self, row: int) -> dict[str, bytes]:
        """The files of the row-th sample (in shard order)."""
        if self._table is None:
            self._table = read_parquet_shards(self.root, self.shards, self.columns)
        return {c.removesuffix("_bytes"): self._table[c][row].as_py() for c in self.columns}


@dataclass
class FileSource:
    """Where a real-format bundle's samples come from, for the Ray Data pipelines."""

    format: FileFormat
    root: DataRoot
    index: pa.Table
    parquet_files: list[str] | None = None  # relative shard paths when reading converted data


def build_file_bundle(
    fmt: FileFormat, root: str | None, on_bad_sample: str = "error"
) -> DatasetBundle:
    """Index a raw folder (or converted Parquet shards) and wrap its splits as torch Datasets."""
    if root is None:
        raise ConfigError(
            f"data set {fmt.name!r} needs --data-root (the folder as its publisher distributes it)"
        )
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ConfigError(
            f"--on-bad-sample must be one of {', '.join(BAD_SAMPLE_POLICIES)}, got {on_bad_sample!r}"
        )
    data_root = DataRoot(root)
    if not data_root.is_dir():
        raise ConfigError(f"{data_root.path('')}: missing folder (the {fmt.name} data root)")
    manifest = read_manifest(data_root)
    parquet, shards = None, None
    if manifest is not None:
        if manifest.get("dataset") != fmt.name:
            raise ConfigError(
                f"{data_root.path(MANIFEST)}: holds data set {manifest.get('dataset')!r}, not {fmt.name!r}"
            )
        shards = [s["path"] for s in manifest["shards"]]
        parquet = ParquetBytes(data_root, shards, fmt.file_columns)
        small = [n for n in _schema_names(data_root, shards[0]) if not n.endswith("_bytes")]
        index = read_parquet_shards(data_root, shards, small)
        index = index.append_column("_row", pa.array(np.arange(len(index), dtype=np.int64)))
        sizes = [int(s["rows"]) for s in manifest["shards"]]
        index = index.append_column("_shard", pa.array(np.repeat(np.arange(len(sizes)), sizes)))
        index = index.append_column(
            "_offset",
            pa.array(np.concatenate([np.arange(n) for n in sizes] or [[]]).astype(np.int64)),
        )
    else:
        index = fmt.index(data_root)
    marker = read_export_marker(data_root)
    if marker is not None:
        mark_exported(fmt, data_root, marker)
    splits = sorted(set(index["split"].to_pylist()))
    if "train" not in splits or "test" not in splits:
        raise ConfigError(
            f"{data_root.path('')}: found splits {splits}; a train and a test split are needed"
        )
    return DatasetBundle(
        name=fmt.name,
        tasks=fmt.tasks(),
        train=_split(fmt, data_root, index, "train", on_bad_sample, parquet),
        test=_split(fmt, data_root, index, "test", on_bad_sample, parquet),
        in_channels=fmt.in_channels,
        image_size=fmt.image_size,
        options={
            "root": data_root.uri,
            "on_bad_sample": on_bad_sample,
            "source": "parquet" if manifest else "raw",
            **fmt.options,
        },
        source=FileSource(fmt, data_root, index, shards),
    )


def read_export_marker(root: DataRoot) -> dict[str, Any] | None:
    """The marker of a folder written by ``python -m raymtl.protect.export``, else None."""
    if not root.is_file(EXPORT_MARKER):
        return None
    try:
        return json.loads(root.read_text(EXPORT_MARKER))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{root.path(EXPORT_MARKER)}: not valid JSON: {err}") from None


def mark_exported(fmt: FileFormat, root: DataRoot, marker: dict[str, Any]) -> None:
    """Check a raymtl export's marker matches ``fmt``; then decode its images as they are."""
    where = root.path(EXPORT_MARKER)
    if marker.get("dataset") != fmt.name:
        raise ConfigError(f"{where}: holds data set {marker.get('dataset')!r}, not {fmt.name!r}")
    if marker.get("image_size") != fmt.image_size:
        raise ConfigError(
            f"{where}: images were exported at size {marker.get('image_size')}, this reader uses {fmt.image_size}"
        )
    fmt.preprocessed = True


def _split(
    fmt: FileFormat,
    root: DataRoot,
    index: pa.Table,
    split: str,
    on_bad_sample: str,
    parquet: ParquetBytes | None,
) -> FileDataset:
    rows = index.filter(pc.equal(index["split"], split))
    return FileDataset(fmt, root, rows, split, on_bad_sample, parquet)


def _schema_names(root: DataRoot, shard: str) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_schema(root.path(shard), filesystem=root.fs).names


def read_parquet_shards(
    root: DataRoot, shards: list[str], columns: list[str] | None = None
) -> pa.Table:
    """Concatenate the given columns of converted shards, in shard order."""
    import pyarrow.parquet as pq

    tables = [pq.read_table(root.path(s), columns=columns, filesystem=root.fs) for s in shards]
    return pa.concat_tables(tables) if tables else pa.table({})


def index_table(rows: dict[str, list[Any]]) -> pa.Table:
    """Build an index table with int64 id/labels and string split/paths, sorted by id."""
    table = pa.table(
        {k: pa.array(v, type=pa.int64() if k == "id" else None) for k, v in rows.items()}
    )
    return table.sort_by("id")
