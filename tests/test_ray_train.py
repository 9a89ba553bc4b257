"""Ray Train loops: a worker that dies mid-training is replaced and the run resumes from the last
checkpoint; the generator loop shards over two workers and stores every δ; rank 0 writes
TensorBoard (losses, per-task metrics, image grids)."""

from __future__ import annotations

import numpy as np
import pytest

from raymtl.data import build_dataset
from raymtl.engine import TrainConfig
from raymtl.protect.run import ProtectConfig

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny():
    return build_dataset("synthetic", n_train=256, n_test=32, image_size=16, seed=1)


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(folder.glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(folder), size_guidance={"images": 0})
    accumulator.Reload()
    return accumulator


def test_a_worker_killed_mid_training_is_replaced_and_resumes_from_the_last_checkpoint(
    ray_cluster, tiny, tmp_path
):
    from raymtl.scale.train import WorkerSpec, load_victim, train_victim

    marker = tmp_path / "killed.txt"
    epochs = 4
    loop = {
        "data": {"train": tiny.train, "val": None, "test": tiny.test},
        "tasks": tiny.tasks,
        "backbone": "small_cnn",
        "backbone_options": {"width": 8},
        "in_channels": 3,
        "image_size": 16,
        "train": TrainConfig(epochs=epochs, batch_size=32, weighting="pcgrad").to_dict(),
        "tensorboard_dir": str(tmp_path / "tb"),
        # rank 1 dies in the middle of epoch 3 (before its fifth of eight batches)
        "fault": {"epoch": 3, "batch": 4, "after_s": 1, "marker": str(marker), "rank": 1},
    }
    result = train_victim(loop, WorkerSpec(2, 0.5), "fault", str(tmp_path / "storage"))
    assert result.error is None
    assert marker.exists()  # the fault really happened
    assert result.metrics["epoch"] == epochs
    # the replacement group resumed from epoch 2's checkpoint: only the interrupted epoch is lost
    assert result.metrics["resumed_from_epoch"] == 2
    assert {"test/mean_score", "test/hue/balanced_accuracy", "train/loss/large"} <= set(
        result.metrics
    )
    model = load_victim(result, tiny.tasks)
    assert sum(p.numel() for p in model.parameters()) > 0
    accumulator = _scalars(tmp_path / "tb")
    assert "test/hue/balanced_accuracy" in accumulator.Tags()["scalars"]
    steps = [e.step for e in accumulator.Scalars("train/loss")]
    assert max(steps) == epochs


def test_generator_loop_on_two_workers_stores_every_delta_within_epsilon(
    ray_cluster, tiny, tmp_path
):
    from raymtl.scale.train import WorkerSpec, train_generator

    epsilon = 6 / 255
    config = ProtectConfig(base="em", epsilon=epsilon, epochs=2, batch_size=32, width=8)
    loop = {
        "data": {"train": tiny.train},
        "tasks": tiny.tasks,
        "in_channels": 3,
        "image_size": 16,
        "protect": config,
        "tensorboard_dir": str(tmp_path / "tb"),
        "image_every": 1,
    }
    ids, deltas, result = train_generator(loop, WorkerSpec(2, 0.5), "gen", str(tmp_path / "s"))
    assert result.error is None
    assert np.array_equal(ids, tiny.train.ids.numpy())
    assert deltas.shape == (len(tiny.train), 3, 16, 16)
    assert np.abs(deltas).max() <= 6 and np.abs(deltas).max() > 0
    accumulator = _scalars(tmp_path / "tb")
    assert "generator/base_loss" in accumulator.Tags()["scalars"]
    assert accumulator.Tags()["images"]  # x | δ amplified | x+δ grid


def test_protect_then_verify_in_one_job_resumes_a_lost_victim_epoch_without_new_generator_epochs(
    ray_cluster, tiny, tmp_path
):
    """The mtlue study's trial job: generator, then a victim on the δ it made. A worker that dies
    in victim epoch 2 comes back to epoch 1's checkpoint, and δ comes from the finished generator
    held in that checkpoint: the generator's TensorBoard shows each of its epochs exactly once."""
    from raymtl.scale.train import WorkerSpec, protect_and_verify

    marker = tmp_path / "killed.txt"
    loop = {
        "data": {"train": tiny.train, "test": tiny.test},
        "tasks": tiny.tasks,
        "in_channels": 3,
        "image_size": 16,
        "protect": ProtectConfig(base="em", epsilon=6 / 255, epochs=2, batch_size=32, width=8),
        "tensorboard_dir": str(tmp_path / "generator"),
        "victim": {
            "tasks": tiny.tasks,
            "backbone": "small_cnn",
            "backbone_options": {"width": 8},
            "in_channels": 3,
            "image_size": 16,
            "train": TrainConfig(epochs=3, batch_size=32).to_dict(),
            "tensorboard_dir": str(tmp_path / "victim"),
            # 2 s on: by then Train has collected epoch 1's report (it polls every 0.5 s)
            "fault": {"epoch": 2, "batch": 2, "after_s": 2, "marker": str(marker), "rank": 0},
        },
    }
    result = protect_and_verify(loop, WorkerSpec(1, 1.0), "trial", str(tmp_path / "storage"))
    assert result.error is None
    assert marker.exists()  # the fault really happened
    metrics = result.metrics
    assert metrics["epoch"] == 3 and metrics["resumed_from_epoch"] == 1
    assert metrics["generator_epochs_run"] == 2
    assert 0 < metrics["linf_255"] <= 6
    assert 0 <= metrics["test/mean_score"] <= 1
    generator = _scalars(tmp_path / "generator")
    assert [e.step for e in generator.Scalars("generator/base_loss")] == [1, 2]
    assert "test/mean_score" in _scalars(tmp_path / "victim").Tags()["scalars"]


@pytest.mark.parametrize("user_value", [None, "3"])
def test_train_runs_poll_their_workers_every_half_second_unless_the_user_says_otherwise(
    monkeypatch, user_value
):
    """Ray's 2 s default makes every short Train job end ~3 s late; a value the user exported
    is kept. The environment is what Ray hands on to the controller when the trainer starts."""
    from raymtl.scale import train as scale_train

    if user_value is None:
        monkeypatch.delenv(scale_train.POLL_INTERVAL_ENV, raising=False)
    else:
        monkeypatch.setenv(scale_train.POLL_INTERVAL_ENV, user_value)
    seen = {}

    class RecordingTrainer:
        def __init__(self, *args, **kwargs):
            seen["interval"] = scale_train.os.environ.get(scale_train.POLL_INTERVAL_ENV)

        def fit(self):
            return "result"

    monkeypatch.setattr(scale_train, "TorchTrainer", RecordingTrainer)
    monkeypatch.setattr(scale_train.ray, "put", lambda value: value)
    workers = scale_train.WorkerSpec(1, 1.0)
    assert scale_train._fit(lambda c: None, {"data": {}}, workers, "n", "/tmp/s", 0) == "result"
    assert seen["interval"] == (user_value or scale_train.DEFAULT_POLL_INTERVAL_S)
