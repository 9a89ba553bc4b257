"""Victim-side defences: each does what defines it, on tiny inputs; the engine applies them."""

import pytest
import torch

from raymtl.data import build_dataset
from raymtl.defences import DEFENCES, create_defence
from raymtl.engine import TrainConfig, fit, task_losses
from raymtl.errors import ConfigError
from raymtl.models import create_model
from raymtl.tasks import TaskSpec


@pytest.fixture(scope="module")
def tiny():
    return build_dataset("synthetic", n_train=64, n_test=16, image_size=16)


def _batch(tiny, n=8):
    return tiny.train.__getitems__(list(range(n)))


def test_registry_lists_the_four_defences_and_rejects_unknown_names_and_options():
    assert {"jpeg", "bdr", "grayscale", "pgd_at"} <= set(DEFENCES.names())
    with pytest.raises(ConfigError, match="unknown defence 'blur'; available: bdr"):
        create_defence("blur")
    with pytest.raises(ConfigError, match="defence jpeg: bad option"):
        create_defence("jpeg", strength=3)
    with pytest.raises(ConfigError, match=r"quality must be in 1\.\.100"):
        create_defence("jpeg", quality=0)
    with pytest.raises(ConfigError, match=r"bits must be in 1\.\.8"):
        create_defence("bdr", bits=9)
    with pytest.raises(ConfigError, match="defence pgd_at: need 0 < epsilon <= 1"):
        create_defence("pgd_at", epsilon="-8/255")


def test_jpeg_changes_pixels_keeps_shape_and_range(tiny):
    images = _batch(tiny)["image"]
    out = create_defence("jpeg", quality=10)(images, {}, None, [])
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert (out - images).abs().mean() > 2 / 255
    gentle = create_defence("jpeg", quality=95)(images, {}, None, [])
    assert (gentle - images).abs().mean() < (out - images).abs().mean()


def test_bit_depth_reduction_leaves_four_levels():
    images = torch.rand(4, 3, 8, 8)
    out = create_defence("bdr")(images, {}, None, [])
    levels = torch.unique(out)
    assert len(levels) <= 4
    assert torch.allclose(levels, torch.tensor([0, 1 / 3, 2 / 3, 1])[: len(levels)].to(levels))
    assert (out - images).abs().max() <= 1 / 6 + 1e-6  # nearest level


def test_grayscale_has_equal_channels_with_the_luma():
    images = torch.rand(2, 3, 4, 4)
    out = create_defence("grayscale")(images, {}, None, [])
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    assert torch.allclose(out[:, 0], luma)


def test_pgd_adversarial_examples_stay_inside_epsilon_and_raise_the_loss(tiny):
    torch.manual_seed(0)
    model = create_model("small_cnn", tiny.tasks, 3, 16)
    batch = _batch(tiny, 16)
    epsilon = 4 / 255
    attack = create_defence("pgd_at", epsilon=epsilon, step="1/255", steps=5)
    model.train()
    adversarial = attack(batch["image"], batch, model, tiny.tasks)
    assert model.training  # the attack restores the model's mode
    assert (adversarial - batch["image"]).abs().max() <= epsilon + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    model.eval()
    with torch.no_grad():
        clean_loss = task_losses(model(batch["image"]), batch, tiny.tasks).sum()
        adversarial_loss = task_losses(model(adversarial), batch, tiny.tasks).sum()
    assert adversarial_loss > clean_loss


def test_fit_trains_on_the_defended_batches(tiny, monkeypatch):
    import raymtl.defences.grayscale as grayscale

    seen = []
    original = grayscale.Grayscale.__call__

    def spy(self, images, batch, model, tasks):
        out = original(self, images, batch, model, tasks)
        seen.append(out)
        return out

    monkeypatch.setattr(grayscale.Grayscale, "__call__", spy)
    model = create_model("small_cnn", tiny.tasks, 3, 16)
    fit(
        model,
        tiny.train,
        None,
        tiny.tasks,
        TrainConfig(epochs=1, batch_size=32, defence="grayscale"),
    )
    assert len(seen) == 2 and all(torch.equal(x[:, 0], x[:, 2]) for x in seen)
    with pytest.raises(ConfigError, match="unknown defence"):
        TrainConfig(defence="nope").validate()


def test_single_channel_tasks_pass_through_grayscale():
    images = torch.rand(2, 1, 4, 4)
    assert torch.equal(
        create_defence("grayscale")(images, {}, None, [TaskSpec("a", "binary")]), images
    )
