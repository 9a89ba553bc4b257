"""Ray Train (TorchTrainer) loops around the Ray-free core: victim training and MTL-UE generator
optimisation, data-parallel over workers.

Each worker runs the core's own training step with a ``GradientSync`` over Train's process group
(gloo on CPU, NCCL on GPU), so gradient-based task weighting aggregates the all-reduced
task-gradient matrix identically on every rank. Rank 0 checkpoints every epoch and writes
TensorBoard events; a restarted worker group (``FailureConfig``) resumes from the last checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from raymtl.data.base import MultiTaskArrays, collate_batch
from raymtl.defences import create_defence
from raymtl.distributed import GradientSync
from raymtl.engine import (
    TrainConfig,
    evaluate,
    flatten_metrics,
    loss_row,
    train_epoch,
)
from raymtl.models import create_model
from raymtl.protect.run import ProtectConfig, protect_mtlue
from raymtl.protect.store import with_deltas
from raymtl.tasks import TaskSpec
from raymtl.weighting import create_weighting

MODEL_FILE = "state.pt"
# Ray Train's controller polls its workers every 2 s by default, so a finished run is noticed up
# to two polls late: ~5 s per run here against ~2 s at 0.5 s (a study runs many short Train
# jobs). A value the user set in the environment wins; Ray passes it on to the controller.
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
DEFAULT_POLL_INTERVAL_S = "0.5"


@dataclass(frozen=True)
class WorkerSpec:
    """How many Train workers a job gets and what each one holds."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def scaling_config(self) -> ScalingConfig:
        """Ray Train's ScalingConfig for this spec (GPUs used when asked for)."""
        resources = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker > 0:
            resources["GPU"] = self.gpus_per_worker
        return ScalingConfig(
            num_workers=self.num_workers,
            use_gpu=self.gpus_per_worker > 0,
            resources_per_worker=resources,
        )


def run_config(
    name: str, storage_path: str, max_failures: int = 2, callbacks: Sequence[Any] = ()
) -> RunConfig:
    """RunConfig with per-epoch checkpoints (two kept) and worker-failure retries.
    Running again with the same name and storage resumes that run."""
    return RunConfig(
        name=name,
        storage_path=storage_path,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        callbacks=list(callbacks),
    )


def quiet_train_logs() -> None:
    """Ray Train 2.60 logs every report with all its metrics at INFO, from a logger named after
    its file; keep warnings only (the Tune progress table and TensorBoard carry the metrics)."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _worker_setup(threads_hint: float) -> tuple[GradientSync, torch.device]:
    torch.set_num_threads(max(1, int(threads_hint)))
    quiet_train_logs()
    return GradientSync.current(), ray.train.torch.get_device()


def _report(metrics: dict[str, Any], state: dict[str, Any] | None, rank: int) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint."""
    if rank != 0 or state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, Path(folder) / MODEL_FILE)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def _resume_state() -> dict[str, Any] | None:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        file = Path(folder) / MODEL_FILE
        if not file.is_file():  # a finished generator run's final checkpoint holds only δ
            return None
        return torch.load(file, map_location="cpu", weights_only=False)


def _maybe_fail(fault: dict[str, Any] | None, epoch: int, rank: int) -> None:
    """Fault injection for tests: worker ``fault['rank']`` dies once (the process exits) in
    ``fault['epoch']``, ``fault['after_s']`` seconds (default 0) after it got there; a marker file
    makes sure it happens only once. Train's controller collects a worker's reports when it polls
    (every 0.5 s here), so a worker that dies just after reporting loses that report."""
    if not fault or epoch != fault["epoch"] or rank != fault.get("rank", 0):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    time.sleep(float(fault.get("after_s", 0)))
    marker.write_text(f"worker {rank} killed in epoch {epoch}\n")
    os._exit(1)


def _dying_midway(
    batches: Any, fault: dict[str, Any] | None, epoch: int, rank: int
) -> Iterator[dict[str, Any]]:
    """Yield ``batches``; with a fault for this epoch, die before batch ``fault['batch']``
    (default: the third), i.e. in the middle of the epoch, as a lost node would."""
    for index, batch in enumerate(batches):
        if fault and index == fault.get("batch", 2):
            _maybe_fail(fault, epoch, rank)
        yield batch


def _tensorboard(folder: str | None, rank: int) -> Any:
    if folder is None or rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(folder)


def shard_batches(
    split: Dataset, batch_size: int, sync: GradientSync, seed: int, epoch: int
) -> Iterator[dict[str, Any]]:
    """This rank's shard of a seeded shuffle, in batches of global_batch / world_size."""
    sampler = DistributedSampler(
        split, num_replicas=sync.world_size, rank=sync.rank, shuffle=True, seed=seed
    )
    sampler.set_epoch(epoch)
    order = list(sampler)
    local = max(1, math.ceil(batch_size / sync.world_size))
    fetch = getattr(split, "__getitems__", None)
    for start in range(0, len(order), local):
        rows = order[start : start + local]
        batch = fetch(rows) if fetch is not None else collate_batch([split[i] for i in rows])
        if batch is not None:  # None: every sample of the batch was skipped as bad
            yield batch


def _ray_data_batches(
    tasks: Sequence[TaskSpec], batch_size: int, sync: GradientSync
) -> Iterator[dict[str, Any]]:
    shard = ray.train.get_dataset_shard("train")
    local = max(1, math.ceil(batch_size / sync.world_size))
    names = [t.name for t in tasks]
    for batch in shard.iter_torch_batches(batch_size=local):
        image = batch["image"]
        image = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
        yield {"id": batch["id"], "image": image, "targets": {n: batch[n] for n in names}}


class _Counted:
    """Wraps a batch iterable and counts the samples it yields."""

    def __init__(self, batches: Any) -> None:
        self.batches, self.samples = batches, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.batches:
            if batch is not None:
                self.samples += len(batch["image"])
            yield batch


def train_config_from(values: dict[str, Any]) -> TrainConfig:
    """TrainConfig from its ``to_dict`` form."""
    values = dict(values)
    values["lr_milestones"] = tuple(values.get("lr_milestones", (0.6, 0.8)))
    return TrainConfig(**values)


def victim_loop(config: dict[str, Any]) -> None:
    """train_loop_per_worker: multi-task victim training, resumable, rank-0 checkpoint per epoch.

    ``config``: data (an object ref of {'train', 'val', 'test'} splits; train is ignored when the
    trainer got a Ray Dataset 'train'), tasks, backbone, in_channels, image_size, train
    (TrainConfig.to_dict()), and optionally tensorboard_dir, extra_metrics, fault."""
    sync, device = _worker_setup(config.get("threads", 1))
    _train_victim_epochs(config, fetch_data(config["data"]), sync, device, _resume_state())


def fetch_data(data: Any) -> Any:
    """A loop's or trial's data, from the object store when the driver put it there."""
    return ray.get(data) if isinstance(data, ray.ObjectRef) else data


def _train_victim_epochs(
    config: dict[str, Any],
    splits: dict[str, Any],
    sync: GradientSync,
    device: torch.device,
    state: dict[str, Any] | None,
    checkpoint_extra: dict[str, Any] | None = None,
) -> None:
    """The victim loop's epochs from ``state`` (an earlier attempt's checkpoint, or None);
    every rank-0 checkpoint also carries ``checkpoint_extra``."""
    train_config = train_config_from(config["train"])
    tasks: list[TaskSpec] = config["tasks"]
    torch.manual_seed(train_config.seed)  # the same initial weights on every rank and run
    model = create_model(
        config["backbone"],
        tasks,
        config["in_channels"],
        config["image_size"],
        **config.get("backbone_options", {}),
    )
    if device.type == "cuda" and sync.active:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    weighting = create_weighting(
        train_config.weighting,
        [t.name for t in tasks],
        seed=train_config.seed,
        **train_config.weighting_options,
    ).to(device)
    optimizer = torch.optim.Adam(
        [*model.parameters(), *weighting.parameters()],
        lr=train_config.lr,
        weight_decay=train_config.weight_decay,
    )
    milestones = sorted(
        {max(1, round(m * train_config.epochs)) for m in train_config.lr_milestones}
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, train_config.lr_gamma)
    defence = (
        create_defence(train_config.defence, **train_config.defence_options)
        if train_config.defence
        else None
    )
    sync.broadcast_(model)
    first_epoch, resumed_from = 1, 0
    if state is not None:
        model.load_state_dict(state["model"])
        weighting.load_state_dict(state["weighting"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        resumed_from = state["epoch"]
        first_epoch = resumed_from + 1
    writer = _tensorboard(config.get("tensorboard_dir"), sync.rank)
    amp = train_config.amp and device.type == "cuda"
    for epoch in range(first_epoch, train_config.epochs + 1):
        if config.get("use_ray_data"):
            batches: Any = _ray_data_batches(tasks, train_config.batch_size, sync)
        else:
            batches = shard_batches(
                splits["train"], train_config.batch_size, sync, train_config.seed, epoch
            )
        counted = _Counted(_dying_midway(batches, config.get("fault"), epoch, sync.rank))
        started = time.perf_counter()
        mean_losses = train_epoch(
            model, counted, tasks, weighting, optimizer, device, defence, amp, sync
        )
        seconds = time.perf_counter() - started
        scheduler.step()
        metrics: dict[str, Any] = {"epoch": epoch, "resumed_from_epoch": resumed_from}
        # throughput of this rank's training pass, times the number of ranks (equal shards)
        metrics["train/seconds"] = seconds
        metrics["train/images_per_second"] = counted.samples * sync.world_size / seconds
        seen = sync.mean_(torch.tensor([float(counted.samples)])) * sync.world_size
        metrics["train/samples"] = round(float(seen))  # all ranks together
        metrics.update(loss_row(mean_losses, tasks))
        metrics.update(config.get("extra_metrics", {}))
        checkpoint = None
        if sync.rank == 0:
            for name in ("val", "test"):
                if splits.get(name) is not None:
                    evaluation = evaluate(model, splits[name], tasks, 256, device)
                    metrics.update(flatten_metrics(name, evaluation))
            if writer is not None:
                for key, value in metrics.items():
                    if isinstance(value, int | float) and key != "epoch":
                        writer.add_scalar(key, value, epoch)
                writer.flush()
            checkpoint = {
                "epoch": epoch,
                "model": model.state_dict(),
                "weighting": weighting.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "model_spec": {
                    "backbone": config["backbone"],
                    "in_channels": config["in_channels"],
                    "image_size": config["image_size"],
                    "backbone_options": config.get("backbone_options", {}),
                },
                **(checkpoint_extra or {}),
            }
        _report(metrics, checkpoint, sync.rank)
    if writer is not None:
        writer.close()


def train_victim(
    loop_config: dict[str, Any],
    workers: WorkerSpec,
    name: str,
    storage_path: str,
    datasets: dict[str, Any] | None = None,
    max_failures: int = 2,
    callbacks: Sequence[Any] = (),
) -> ray.train.Result:
    """Run ``victim_loop`` on ``workers``; splits in ``loop_config['data']`` are put in the object
    store once. A Ray Dataset under datasets['train'] is split across workers instead."""
    return _fit(
        victim_loop, loop_config, workers, name, storage_path, max_failures, callbacks, datasets
    )


def _fit(
    loop: Any,
    loop_config: dict[str, Any],
    workers: WorkerSpec,
    name: str,
    storage_path: str,
    max_failures: int,
    callbacks: Sequence[Any] = (),
    datasets: dict[str, Any] | None = None,
) -> ray.train.Result:
    """One TorchTrainer run of ``loop``: in-memory splits go to the object store once."""
    os.environ.setdefault(POLL_INTERVAL_ENV, DEFAULT_POLL_INTERVAL_S)
    config = dict(loop_config)
    if not isinstance(config["data"], ray.ObjectRef):
        config["data"] = ray.put(config["data"])
    config.setdefault("threads", workers.cpus_per_worker)
    if datasets:
        config["use_ray_data"] = True
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=workers.scaling_config(),
        run_config=run_config(name, storage_path, max_failures, callbacks),
        datasets=datasets,
    )
    return trainer.fit()


def load_victim(result: ray.train.Result, tasks: Sequence[TaskSpec]) -> nn.Module:
    """The trained model of a finished ``train_victim`` run (from its last checkpoint)."""
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / MODEL_FILE, map_location="cpu", weights_only=False)
    spec = state["model_spec"]
    model = create_model(
        spec["backbone"],
        tasks,
        spec["in_channels"],
        spec["image_size"],
        **spec["backbone_options"],
    )
    model.load_state_dict(state["model"])
    return model


def _image_grid(images: torch.Tensor, delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Rows x | δ amplified to the full range | x+δ, for TensorBoard."""
    amplified = (delta / (2 * epsilon) + 0.5).clamp(0, 1)
    return torch.cat([images, amplified, (images + delta).clamp(0, 1)])


def generator_loop(config: dict[str, Any]) -> None:
    """train_loop_per_worker: MTL-UE generator optimisation, each rank on its share of every batch,
    the base's surrogate or ensemble on every rank; rank 0 checkpoints every epoch, logs losses and
    every ``image_every`` epochs a grid of x, δ (amplified) and x+δ, and finally stores every δ."""
    sync, device = _worker_setup(config.get("threads", 1))
    train: MultiTaskArrays = fetch_data(config["data"])["train"]
    result, _ = _train_generator_epochs(
        config, train, sync, device, _resume_state(), compute_deltas=sync.rank == 0
    )
    # The final report carries every δ (rank 0); every rank reports once more (barrier).
    final = {"epoch": len(result.log), "generator/done": 1}
    if sync.rank == 0:
        with tempfile.TemporaryDirectory() as folder:
            np.save(Path(folder) / "ids.npy", result.ids)
            np.save(Path(folder) / "deltas.npy", result.deltas)
            ray.train.report(final, checkpoint=Checkpoint.from_directory(folder))
    else:
        ray.train.report(final)


def _train_generator_epochs(
    config: dict[str, Any],
    train: MultiTaskArrays,
    sync: GradientSync,
    device: torch.device,
    resume_state: dict[str, Any] | None,
    compute_deltas: bool,
) -> tuple[Any, dict[str, Any] | None]:
    """The generator loop's epochs from ``resume_state``: (ProtectResult, the last epoch's state,
    which is ``resume_state`` itself when that run had already finished)."""
    protect_config: ProtectConfig = config["protect"]
    protect_config = replace(protect_config, device=str(device))
    writer = _tensorboard(config.get("tensorboard_dir"), sync.rank)
    preview = train.__getitems__(list(range(min(8, len(train)))))
    image_every = int(config.get("image_every", 5))
    last = {"state": resume_state}

    def hook(state: dict[str, Any], perturb: Any) -> None:
        epoch = state["epoch"]
        last["state"] = state
        row = state["log"][-1]
        metrics = {f"generator/{k}": v for k, v in row.items() if k != "epoch"}
        metrics["epoch"] = epoch
        if writer is not None:
            for key, value in metrics.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch)
            if epoch % image_every == 0 or epoch == 1:
                with torch.no_grad():
                    delta = perturb(preview["image"], preview["targets"], preview["id"])
                grid = _image_grid(preview["image"], delta, protect_config.epsilon)
                writer.add_images("generator/x | delta (amplified) | x+delta", grid, epoch)
            writer.flush()
        _report(metrics, state if sync.rank == 0 else None, sync.rank)
        _maybe_fail(config.get("fault"), epoch, sync.rank)

    result = protect_mtlue(
        train,
        config["tasks"],
        config["in_channels"],
        config["image_size"],
        protect_config,
        progress=False,
        sync=sync,
        resume_state=resume_state,
        epoch_hook=hook,
        compute_deltas=compute_deltas,
        clean_models=config.get("clean_models"),
    )
    if writer is not None:
        writer.close()
    return result, last["state"]


def train_generator(
    loop_config: dict[str, Any],
    workers: WorkerSpec,
    name: str,
    storage_path: str,
    max_failures: int = 2,
) -> tuple[np.ndarray, np.ndarray, ray.train.Result]:
    """Run ``generator_loop``; returns (sample ids, integer δ, the Train result)."""
    result = _fit(generator_loop, loop_config, workers, name, storage_path, max_failures)
    with result.checkpoint.as_directory() as folder:
        ids = np.load(Path(folder) / "ids.npy")
        deltas = np.load(Path(folder) / "deltas.npy")
    return ids, deltas, result


def protect_and_verify_loop(config: dict[str, Any]) -> None:
    """train_loop_per_worker: an MTL-UE generator (``generator_loop``'s keys), then a fresh victim
    (``config['victim']``, a ``victim_loop`` configuration) on the training split it protects,
    evaluated on the clean test split, in one worker group. One Train job instead of two saves a
    job's start-up (34 CPU-s on a 2-core machine: benchmarks/train_startup.py). Victim checkpoints
    carry the finished generator's state: a restart in the victim phase recomputes δ and does not
    train the generator again."""
    sync, device = _worker_setup(config.get("threads", 1))
    data = fetch_data(config["data"])
    state = _resume_state()
    victim_state = state if state is not None and state.get("phase") == "victim" else None
    generator_state = victim_state["generator"] if victim_state is not None else state
    generated, final_state = _train_generator_epochs(
        config, data["train"], sync, device, generator_state, compute_deltas=True
    )
    protected = with_deltas(data["train"], generated.ids, generated.deltas)
    victim = dict(config["victim"])
    victim["extra_metrics"] = {
        **victim.get("extra_metrics", {}),
        "linf_255": int(np.abs(generated.deltas).max()) if generated.deltas.size else 0,
        "generator_epochs_run": len(generated.log),
    }
    splits = {"train": protected, "val": None, "test": data["test"]}
    extra = {"phase": "victim", "generator": final_state}
    _train_victim_epochs(victim, splits, sync, device, victim_state, extra)


def protect_and_verify(
    loop_config: dict[str, Any],
    workers: WorkerSpec,
    name: str,
    storage_path: str,
    max_failures: int = 2,
) -> ray.train.Result:
    """Run ``protect_and_verify_loop``; ``loop_config['data']`` holds the 'train' and 'test'
    splits. The result's metrics are the victim's last epoch, with the δ bound it met."""
    return _fit(protect_and_verify_loop, loop_config, workers, name, storage_path, max_failures)
