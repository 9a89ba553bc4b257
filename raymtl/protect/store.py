"""The perturbation store: integer δ per sample id, in npy shards with a SHA-256 each.

δ is stored at the image's quantisation (uint8 pixels -> integer δ in [-255, 255], int8 when ε
allows), so protected pixels are exactly ``clip(x + δ, 0, 255)``. Shards are written atomically;
``store.json`` (metadata + shard list) is written last and marks the store complete.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raymtl.data.base import MultiTaskArrays
from raymtl.errors import ConfigError
from raymtl.io import atomic_write_bytes, atomic_write_json

STORE_FILE = "store.json"


def quantise_delta(delta: torch.Tensor, epsilon: float) -> np.ndarray:
    """Float δ in pixel units [0,1] -> integers with |δ| <= floor(ε·255) (never above ε)."""
    bound = int(np.floor(epsilon * 255 + 1e-6))
    integer = torch.round(delta.detach().float().cpu() * 255).clamp(-bound, bound)
    dtype = np.int8 if bound <= 127 else np.int16
    return integer.numpy().astype(dtype)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_store(
    folder: str | Path,
    ids: np.ndarray,
    deltas: np.ndarray,
    metadata: dict[str, Any],
    shard_size: int = 4096,
) -> Path:
    """Write ids [N] and integer deltas [N,C,H,W] as shards plus ``store.json``."""
    folder = Path(folder)
    if len(ids) != len(deltas):
        raise ValueError("ids and deltas differ in length")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("sample ids must be unique")
    shards = []
    for number, start in enumerate(range(0, len(ids), shard_size)):
        name = f"delta-{number:05d}.npy"
        id_name = f"ids-{number:05d}.npy"
        delta_bytes = _npy_bytes(np.ascontiguousarray(deltas[start : start + shard_size]))
        id_bytes = _npy_bytes(np.asarray(ids[start : start + shard_size], dtype=np.int64))
        atomic_write_bytes(folder / name, delta_bytes)
        atomic_write_bytes(folder / id_name, id_bytes)
        shards.append(
            {
                "delta": name,
                "ids": id_name,
                "rows": int(min(shard_size, len(ids) - start)),
                "sha256": hashlib.sha256(delta_bytes + id_bytes).hexdigest(),
            }
        )
    info = {
        **metadata,
        "rows": len(ids),
        "shape": list(deltas.shape[1:]),
        "dtype": str(deltas.dtype),
        "shards": shards,
    }
    atomic_write_json(folder / STORE_FILE, info)
    return folder


class PerturbationStore:
    """A finished store: metadata and δ looked up by sample id."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / STORE_FILE
        if not path.is_file():
            raise ConfigError(f"{path}: missing file (not a finished perturbation store)")
        try:
            self.info = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON: {err}") from None
        ids, deltas = [], []
        for shard in self.info["shards"]:
            delta_bytes = (self.folder / shard["delta"]).read_bytes()
            id_bytes = (self.folder / shard["ids"]).read_bytes()
            if hashlib.sha256(delta_bytes + id_bytes).hexdigest() != shard["sha256"]:
                raise ConfigError(
                    f"{self.folder / shard['delta']}: checksum does not match {STORE_FILE}"
                )
            ids.append(np.load(io.BytesIO(id_bytes)))
            deltas.append(np.load(io.BytesIO(delta_bytes)))
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        self.deltas = (
            np.concatenate(deltas) if deltas else np.zeros((0, *self.info["shape"]), np.int8)
        )
        self._row = {int(i): r for r, i in enumerate(self.ids)}

    @property
    def metadata(self) -> dict[str, Any]:
        """Everything in store.json except the shard list."""
        return {k: v for k, v in self.info.items() if k != "shards"}

    def deltas_for(self, ids: Iterable[int]) -> np.ndarray:
        """Integer δ rows for the given ids (ConfigError naming the first id the store lacks)."""
        rows = []
        for sample_id in ids:
            row = self._row.get(int(sample_id))
            if row is None:
                raise ConfigError(
                    f"{self.folder}: store has no perturbation for sample id {int(sample_id)}; it does not match this data set"
                )
            rows.append(row)
        return self.deltas[rows]


def apply_integer_deltas(images: torch.Tensor, deltas: np.ndarray) -> torch.Tensor:
    """uint8 images [N,C,H,W] + integer δ -> protected uint8 images, clipped to [0, 255]."""
    if tuple(deltas.shape[1:]) != tuple(images.shape[1:]):
        raise ConfigError(
            f"perturbation shape {tuple(deltas.shape[1:])} does not match image shape {tuple(images.shape[1:])}"
        )
    return (
        (images.short() + torch.from_numpy(deltas.astype(np.int16))).clamp_(0, 255).to(torch.uint8)
    )


def _carrying(split: MultiTaskArrays, ordered: np.ndarray) -> MultiTaskArrays:
    """A copy of ``split`` whose images carry ``ordered`` (one δ row per sample, in split order)."""
    protected = apply_integer_deltas(split.images, ordered)
    return MultiTaskArrays(protected, split.targets, split.ids, split.split, split.factors)


def with_deltas(split: MultiTaskArrays, ids: np.ndarray, deltas: np.ndarray) -> MultiTaskArrays:
    """A copy of ``split`` whose images carry the given δ rows, matched by sample id (in any order),
    e.g. a ``ProtectResult``'s ``ids`` and ``deltas``."""
    row = {int(i): r for r, i in enumerate(np.asarray(ids).tolist())}
    missing = [int(i) for i in split.ids.tolist() if int(i) not in row]
    if missing:
        raise ConfigError(f"no perturbation for sample id {missing[0]} of the {split.split} split")
    return _carrying(split, deltas[[row[int(i)] for i in split.ids.tolist()]])


def protect_split(split: MultiTaskArrays, store: PerturbationStore) -> MultiTaskArrays:
    """A copy of ``split`` whose images carry the store's δ, matched by sample id."""
    return _carrying(split, store.deltas_for(split.ids.tolist()))
