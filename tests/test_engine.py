"""The Ray-free engine: MTL and STL training, masks, dense tasks, run directories."""

import json
import subprocess
import sys

import pytest
import torch

from raymtl.data import build_dataset
from raymtl.engine import TrainConfig, evaluate, fit, fit_stl, task_losses
from raymtl.errors import ConfigError
from raymtl.models import create_model
from raymtl.tasks import TaskSpec
from raymtl.weighting import WEIGHTINGS


@pytest.fixture(scope="module")
def tiny():
    return build_dataset("synthetic", n_train=96, n_test=48, image_size=16)


@pytest.mark.parametrize("weighting", WEIGHTINGS.names())
def test_every_weighting_trains_a_model_and_changes_its_weights(tiny, weighting):
    model = create_model("small_cnn", tiny.tasks, width=4, image_size=16)
    before = [p.detach().clone() for p in model.shared_parameters()]
    config = TrainConfig(epochs=2, batch_size=32, weighting=weighting)
    result = fit(model, tiny.train, tiny.test, tiny.tasks, config)
    assert len(result.history) == 2
    assert set(result.test["tasks"]) == {t.name for t in tiny.tasks}
    assert 0.0 <= result.test["mean_score"] <= 1.0
    assert any(
        not torch.equal(b, p) for b, p in zip(before, model.shared_parameters(), strict=True)
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_training_lowers_the_loss_on_a_learnable_problem():
    bundle = build_dataset("synthetic", n_train=512, n_test=128, image_size=16)
    tasks = [bundle.task("noisy"), bundle.task("background")]
    model = create_model("small_cnn", tasks, width=8, image_size=16)
    result = fit(
        model, bundle.train, bundle.test, tasks, TrainConfig(epochs=6, batch_size=32, lr=3e-3)
    )
    assert result.history[-1]["train/loss"] < 0.6 * result.history[0]["train/loss"]
    assert result.test["tasks"]["noisy"]["balanced_accuracy"] > 0.75


def test_stl_mode_trains_one_model_per_task(tiny):
    tasks = tiny.tasks[:3]
    made = []

    def make(ts):
        made.append([t.name for t in ts])
        return create_model("small_cnn", ts, width=4, image_size=16)

    result = fit_stl(make, tiny.train, tiny.test, tasks, TrainConfig(epochs=1, batch_size=32))
    assert made == [[t.name] for t in tasks]
    assert set(result.test["tasks"]) == {t.name for t in tasks}
    assert "test/mean_score" in result.history[-1]


def test_dense_training_reports_dense_metrics():
    bundle = build_dataset("synthetic_dense", n_train=32, n_test=16, image_size=16)
    model = create_model("small_cnn", bundle.tasks, width=4, image_size=16)
    result = fit(
        model, bundle.train, bundle.test, bundle.tasks, TrainConfig(epochs=1, batch_size=16)
    )
    metrics = result.test["tasks"]
    assert set(metrics["segmentation"]) == {"miou", "pixel_accuracy"}
    assert set(metrics["depth"]) == {"abs_rel", "delta1"}
    assert set(metrics["normals"]) == {"mean_angle", "within_11_25", "within_22_5", "within_30"}


def test_loss_masks_drop_exactly_the_masked_sample_task_pairs():
    tasks = [TaskSpec("a", "binary"), TaskSpec("b", "binary")]
    outputs = {"a": torch.tensor([[2.0], [-1.0], [0.5]]), "b": torch.tensor([[0.0], [1.0], [3.0]])}
    targets = {"a": torch.tensor([1, 1, 0]), "b": torch.tensor([0, 1, 1])}
    full = task_losses(outputs, {"targets": targets}, tasks)
    masks = {"a": torch.tensor([1.0, 0.0, 1.0]), "b": torch.tensor([1.0, 1.0, 1.0])}
    masked = task_losses(outputs, {"targets": targets, "masks": masks}, tasks)
    per_sample_a = tasks[0].loss(outputs["a"], targets["a"])
    assert masked[0].item() == pytest.approx((per_sample_a[0] + per_sample_a[2]).item() / 2)
    assert masked[1].item() == pytest.approx(full[1].item())


def test_evaluate_is_deterministic_and_leaves_the_model_unchanged(tiny):
    model = create_model("small_cnn", tiny.tasks, width=4, image_size=16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = evaluate(model, tiny.test, tiny.tasks)
    second = evaluate(model, tiny.test, tiny.tasks)
    assert first["tasks"] == second["tasks"]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_bad_train_config_values_are_config_errors():
    with pytest.raises(ConfigError, match="invalid epochs"):
        TrainConfig(epochs=0).validate()
    with pytest.raises(ConfigError, match="lr_milestones"):
        TrainConfig(lr_milestones=(1.5,)).validate()


def _run_train(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "raymtl.train", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_train_cli_writes_config_metrics_and_tensorboard(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run_train(
        "--epochs",
        "1",
        "--n-train",
        "64",
        "--n-test",
        "32",
        "--image-size",
        "16",
        "--run-dir",
        str(run_dir),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mean score" in proc.stdout
    config = (run_dir / "config.yaml").read_text()
    assert (
        "command: python -m raymtl.train --epochs 1" in config and "backbone: small_cnn" in config
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["test"]["tasks"]) >= {"large", "hue"}
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--dataset", "celebb"],
            "unknown dataset 'celebb'; available: celeba, chestxray14, nyuv2, synthetic, synthetic_dense, utkface",
        ),
        (["--backbone", "resnet19"], "unknown backbone 'resnet19'; available: densenet121"),
        (["--weighting", "nash"], "unknown weighting strategy 'nash'; available: aligned_mtl"),
        (["--lr", "-1"], "argument --lr: expected a positive number, got '-1'"),
        (["--epochs", "zero"], "argument --epochs: expected a positive integer, got 'zero'"),
        (["--mode", "both"], "argument --mode: invalid choice: 'both'"),
    ],
)
def test_train_cli_bad_input_is_one_line_and_status_2(tmp_path, run_command, args, expected):
    run_dir = tmp_path / "run"
    proc = run_command("raymtl.train", *args, "--run-dir", run_dir, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]
    assert not run_dir.exists()
