"""Deletion requests: which (instance, task) labels a multi-task model must forget.

A request maps each target task to the instance ids withdrawn from it. When every task withdraws
the same ids it is *full-task* (the instances disappear); otherwise it is *partial-task* (only
those labels are withdrawn, the instances' other labels stay in the training data).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from raymtl.data.base import MultiTaskArrays
from raymtl.errors import ConfigError
from raymtl.tasks import TaskSpec

ALL_TASKS = ("*", "all")  # a task field that withdraws the instance from every task


@dataclass(frozen=True)
class DeletionRequest:
    """Withdrawn (instance, task) pairs: ``pairs[task]`` = sorted int64 ids withdrawn from it."""

    pairs: dict[str, np.ndarray]
    task_names: tuple[str, ...]  # every task of the model, in order

    @property
    def target_tasks(self) -> list[str]:
        """Tasks that lose at least one label, in the model's task order."""
        return [t for t in self.task_names if len(self.pairs.get(t, ())) > 0]

    @property
    def forget_ids(self) -> np.ndarray:
        """Every instance that loses at least one label."""
        parts = [ids for ids in self.pairs.values() if len(ids)]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    @property
    def full(self) -> bool:
        """True when every task withdraws exactly the same instances (full-task unlearning)."""
        ids = self.forget_ids
        return all(np.array_equal(self.pairs.get(t, np.zeros(0)), ids) for t in self.task_names)

    @property
    def setting(self) -> str:
        """'full' (full-task unlearning) or 'partial' (partial-task unlearning)."""
        return "full" if self.full else "partial"

    def withdrawn(self, ids: Tensor, task: str) -> Tensor:
        """Bool [N]: which of ``ids`` had their ``task`` label withdrawn."""
        # a copy: arrays that come back from Ray's object store are read-only
        wanted = torch.from_numpy(np.array(self.pairs.get(task, np.zeros(0, np.int64))))
        return torch.isin(ids, wanted)

    def summary(self) -> dict[str, Any]:
        """Counts for configs and logs."""
        return {
            "setting": self.setting,
            "instances": len(self.forget_ids),
            "target_tasks": self.target_tasks,
            "pairs": {t: len(v) for t, v in self.pairs.items() if len(v)},
        }

    def rows(self) -> list[tuple[int, str]]:
        """The request as (id, task) rows, e.g. to save beside a run."""
        return [(int(i), t) for t in self.task_names for i in self.pairs.get(t, ())]


def _make(pairs: dict[str, Sequence[int]], tasks: Sequence[TaskSpec]) -> DeletionRequest:
    arrays = {t: np.unique(np.asarray(list(ids), dtype=np.int64)) for t, ids in pairs.items()}
    request = DeletionRequest(arrays, tuple(t.name for t in tasks))
    if not len(request.forget_ids):
        raise ConfigError("the deletion request withdraws nothing")
    return request


def request_from_pairs(
    rows: Sequence[tuple[int, str]],
    tasks: Sequence[TaskSpec],
    train_ids: Tensor,
    source: str = "request",
) -> DeletionRequest:
    """Rows (id, task name or '*') checked against the model's tasks and the training ids."""
    names = [t.name for t in tasks]
    known = set(train_ids.tolist())
    pairs: dict[str, list[int]] = {}
    for number, (sample_id, task) in enumerate(rows, start=1):
        if task not in names and task not in ALL_TASKS:
            raise ConfigError(
                f"{source}: row {number}: unknown task {task!r}; expected one of {', '.join(names)} or '*'"
            )
        if int(sample_id) not in known:
            raise ConfigError(
                f"{source}: row {number}: id {sample_id} is not in the training split"
            )
        for name in names if task in ALL_TASKS else [task]:
            pairs.setdefault(name, []).append(int(sample_id))
    return _make(pairs, tasks)


def load_request(path: str | Path, tasks: Sequence[TaskSpec], train_ids: Tensor) -> DeletionRequest:
    """A request from a CSV (header ``id,task``) or JSON (list of {"id", "task"}) file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: missing file (the deletion request)")
    text = path.read_text()
    rows: list[tuple[int, str]] = []
    if path.suffix.lower() == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON: {err}") from None
        if not isinstance(items, list):
            raise ConfigError(f'{path}: expected a JSON list of {{"id": ..., "task": ...}}')
        for number, item in enumerate(items, start=1):
            if not isinstance(item, dict) or "id" not in item or "task" not in item:
                raise ConfigError(f"{path}: item {number}: expected an object with id and task")
            rows.append((_integer(item["id"], path, number), str(item["task"])))
    else:
        reader = csv.reader(io.StringIO(text))
        header = [h.strip() for h in next(reader, [])]
        if header[:2] != ["id", "task"]:
            raise ConfigError(
                f"{path}: line 1: expected the header 'id,task', got {','.join(header)!r}"
            )
        for number, fields in enumerate(reader, start=2):
            if not fields or not "".join(fields).strip():
                continue
            if len(fields) < 2:
                raise ConfigError(f"{path}: line {number}: expected 'id,task'")
            rows.append((_integer(fields[0], path, number), fields[1].strip()))
    return request_from_pairs(rows, tasks, train_ids, str(path))


def _integer(value: Any, path: Path, number: int) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{path}: row {number}: id {value!r} is not an integer") from None


def random_request(
    train_ids: Tensor,
    tasks: Sequence[TaskSpec],
    fraction: float,
    target_tasks: Sequence[str] | None = None,
    seed: int = 0,
) -> DeletionRequest:
    """A seeded random ``fraction`` of the training instances, withdrawn from ``target_tasks``
    (all tasks when None: full-task unlearning)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"forget fraction must be in (0, 1), got {fraction}")
    targets = _check_targets(target_tasks, tasks)
    generator = torch.Generator().manual_seed(seed)
    count = max(1, round(fraction * len(train_ids)))
    chosen = train_ids[torch.randperm(len(train_ids), generator=generator)[:count]].tolist()
    return _make({t: chosen for t in targets}, tasks)


def class_request(
    train: MultiTaskArrays,
    tasks: Sequence[TaskSpec],
    task: str,
    value: int,
    target_tasks: Sequence[str] | None = None,
) -> DeletionRequest:
    """Every training instance whose ``task`` label equals ``value`` (e.g. one attribute value)."""
    if task not in train.targets or any(t.name == task and t.dense for t in tasks):
        raise ConfigError(f"--forget-class: {task!r} is not a classification task of this data set")
    targets = _check_targets(target_tasks, tasks)
    chosen = train.ids[train.targets[task] == value].tolist()
    if not chosen:
        raise ConfigError(f"--forget-class: no training instance has {task} = {value}")
    return _make({t: chosen for t in targets}, tasks)


def _check_targets(target_tasks: Sequence[str] | None, tasks: Sequence[TaskSpec]) -> list[str]:
    names = [t.name for t in tasks]
    if target_tasks is None:
        return names
    unknown = [t for t in target_tasks if t not in names]
    if unknown:
        raise ConfigError(
            f"unknown task(s) {', '.join(unknown)} in the deletion request; expected: {', '.join(names)}"
        )
    if not target_tasks:
        raise ConfigError("the deletion request names no target task")
    return list(target_tasks)


class MaskedSplit(Dataset):
    """A training split whose batches carry ``masks`` {task: [B] float}: 0 drops a (sample, task)
    pair from that task's loss (the engine's ``task_losses`` honours it)."""

    def __init__(self, split: MultiTaskArrays, masks: dict[str, Tensor]) -> None:
        self.split, self.masks = split, masks

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.split[index]
        sample["masks"] = {name: mask[index] for name, mask in self.masks.items()}
        return sample

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        batch = self.split.__getitems__(indices)
        index = torch.as_tensor(indices, dtype=torch.long)
        batch["masks"] = {name: mask[index] for name, mask in self.masks.items()}
        return batch


def retain_split(train: MultiTaskArrays, request: DeletionRequest) -> Dataset:
    """What retraining sees: a full request drops the instances; a partial one keeps them and
    masks only the withdrawn (instance, task) pairs out of the losses."""
    if request.full:
        keep = ~torch.isin(train.ids, torch.from_numpy(request.forget_ids))
        return train.subset(torch.nonzero(keep).flatten(), split="retain")
    masks = {name: (~request.withdrawn(train.ids, name)).float() for name in request.task_names}
    return MaskedSplit(train, masks)
