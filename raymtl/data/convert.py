"""Convert a real-format data set into Parquet shards: encoded file bytes + labels + id + split.

Shards are written one by one (temporary file, then rename) and recorded in ``_progress.json``
with a SHA-256 each, so an interrupted conversion resumes where it stopped. ``_manifest.json``
appears only when the conversion is complete; its presence is what makes a folder readable as
``--data-root`` for the same data set.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

import raymtl
from raymtl.data.base import build_dataset
from raymtl.data.files import MANIFEST, BadSampleError, DataRoot, FileSource, decode_with_path
from raymtl.errors import ConfigError

log = logging.getLogger(__name__)
PROGRESS = "_progress.json"


@dataclass
class ConversionReport:
    """What a conversion did."""

    shards: int
    rows: int
    skipped: int
    resumed_shards: int
    out: str


def _fingerprint(index: pa.Table) -> str:
    digest = hashlib.sha256(index["id"].to_numpy().tobytes())
    digest.update("|".join(index["split"].to_pylist()).encode())
    return digest.hexdigest()


def _write_bytes_atomic(out: DataRoot, relative: str, data: bytes) -> None:
    temporary = f"{relative}.tmp"
    with out.fs.open_output_stream(out.path(temporary)) as handle:
        handle.write(data)
    out.fs.move(out.path(temporary), out.path(relative))


def _read_row(source: FileSource, row: dict[str, Any]) -> dict[str, bytes]:
    files = source.root.read_files({c: row[c] for c in source.format.file_columns})
    where = source.root.path(row[source.format.file_columns[0]])
    decode_with_path(source.format, files, False, None, where)  # BadSampleError if undecodable
    return files


def _shard_rows(index: pa.Table, shard_size: int) -> Iterator[tuple[int, pa.Table]]:
    for number, start in enumerate(range(0, len(index), shard_size)):
        yield number, index.slice(start, shard_size)


def convert(
    dataset: str,
    root: str,
    out: str,
    shard_size: int = 2000,
    on_bad_sample: str = "error",
    threads: int = 4,
    progress: bool = True,
    **options: Any,
) -> ConversionReport:
    """Convert ``dataset`` read from ``root`` into Parquet shards under ``out`` (path or URI)."""
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {shard_size}")
    bundle = build_dataset(dataset, root, on_bad_sample=on_bad_sample, **options)
    source: FileSource | None = bundle.source
    if source is None:
        raise ConfigError(
            f"data set {dataset!r} is generated in memory; convert works on real-format data sets"
        )
    if source.parquet_files is not None:
        raise ConfigError(f"{root}: already holds converted Parquet shards")
    target = DataRoot(out)
    if target.local and target.is_file(""):
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if target.is_file(MANIFEST):
        raise ConfigError(
            f"--out {target.path('')}: already holds a finished conversion ({MANIFEST}); choose another --out"
        )
    target.fs.create_dir(target.path(""), recursive=True)

    fingerprint = _fingerprint(source.index)
    settings = {
        "dataset": dataset,
        "root": source.root.uri,
        "shard_size": shard_size,
        "options": options,
        "index_fingerprint": fingerprint,
    }
    state: dict[str, Any] = {"settings": settings, "shards": [], "skipped": 0}
    if target.is_file(PROGRESS):
        previous = json.loads(target.read_text(PROGRESS))
        if previous.get("settings") != settings:
            raise ConfigError(
                f"--out {target.path('')}: holds a partial conversion of other input or settings; choose another --out"
            )
        state = previous
    done = {s["number"]: s for s in state["shards"] if target.is_file(s["path"])}
    state["shards"] = sorted(done.values(), key=lambda s: s["number"])
    resumed = len(done)

    fmt = source.format
    bar = tqdm(
        total=len(source.index),
        desc=f"convert {dataset}",
        unit="img",
        disable=not progress,
        initial=sum(s["rows_in"] for s in done.values()),
    )
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for number, rows in _shard_rows(source.index, shard_size):
            if number in done:
                continue
            records = rows.to_pylist()
            results = list(pool.map(lambda r: _try_read(source, r), records))
            kept, blobs, skipped = [], {c: [] for c in fmt.file_columns}, 0
            for position, (files, error) in enumerate(results):
                if error is not None:
                    if on_bad_sample == "error":
                        raise ConfigError(str(error))
                    log.warning("skipping bad sample: %s", error)
                    skipped += 1
                    continue
                kept.append(position)
                for column in fmt.file_columns:
                    blobs[column].append(files[column])
            table = rows.take(pa.array(kept, type=pa.int64()))
            for column in fmt.file_columns:
                table = table.append_column(
                    f"{column}_bytes", pa.array(blobs[column], type=pa.binary())
                )
            sink = pa.BufferOutputStream()
            pq.write_table(
                table,
                sink,
                row_group_size=512,
                compression={
                    c: ("NONE" if c.endswith("_bytes") else "ZSTD") for c in table.column_names
                },
                use_dictionary=["split"],
            )
            data = sink.getvalue().to_pybytes()
            relative = f"part-{number:05d}.parquet"
            _write_bytes_atomic(target, relative, data)
            state["shards"].append(
                {
                    "number": number,
                    "path": relative,
                    "rows": len(kept),
                    "rows_in": len(rows),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
            state["skipped"] += skipped
            _write_bytes_atomic(target, PROGRESS, json.dumps(state, indent=2).encode())
            bar.update(len(rows))
    bar.close()
    manifest = {
        "dataset": dataset,
        "format_version": 1,
        "raymtl": raymtl.__version__,
        "source_root": source.root.uri,
        "options": options,
        "file_columns": list(fmt.file_columns),
        "label_columns": fmt.label_columns,
        "rows": sum(s["rows"] for s in state["shards"]),
        "skipped_bad_samples": state["skipped"],
        "shards": [{k: s[k] for k in ("path", "rows", "sha256")} for s in state["shards"]],
    }
    _write_bytes_atomic(target, MANIFEST, json.dumps(manifest, indent=2).encode())
    target.fs.delete_file(target.path(PROGRESS))
    return ConversionReport(
        len(state["shards"]), manifest["rows"], state["skipped"], resumed, target.uri
    )


def _try_read(
    source: FileSource, row: dict[str, Any]
) -> tuple[dict[str, bytes] | None, BadSampleError | None]:
    try:
        return _read_row(source, row), None
    except BadSampleError as err:
        return None, err


def verify(out: str) -> int:
    """Check every shard of a finished conversion against its recorded SHA-256; return rows."""
    target = DataRoot(out)
    if not target.is_file(MANIFEST):
        raise ConfigError(f"{target.path(MANIFEST)}: missing file (not a finished conversion)")
    manifest = json.loads(target.read_text(MANIFEST))
    for shard in manifest["shards"]:
        if hashlib.sha256(target.read_bytes(shard["path"])).hexdigest() != shard["sha256"]:
            raise ConfigError(f"{target.path(shard['path'])}: checksum does not match {MANIFEST}")
    return int(manifest["rows"])
