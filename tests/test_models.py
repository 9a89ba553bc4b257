"""Backbone registry and the multi-task model."""

import pytest
import torch

from raymtl.data.synthetic import classification_tasks, dense_tasks
from raymtl.errors import ConfigError
from raymtl.models import BACKBONES, create_model


def test_registry_has_the_paper_backbones_and_a_small_cnn():
    assert set(BACKBONES.names()) >= {
        "small_cnn",
        "resnet18",
        "resnet50",
        "densenet121",
        "vgg16",
        "vit_b_16",
    }
    with pytest.raises(ConfigError, match="unknown backbone 'resnet19'"):
        create_model("resnet19", classification_tasks())


@pytest.mark.parametrize(
    "name", ["small_cnn", "resnet18", "resnet50", "densenet121", "vgg16", "vit_b_16"]
)
def test_every_backbone_serves_classification_and_dense_heads_at_32px(name):
    torch.manual_seed(0)
    tasks = [*classification_tasks()[:2], classification_tasks()[-1], *dense_tasks()]
    model = create_model(name, tasks, image_size=32)
    out = model(torch.rand(2, 3, 32, 32))
    assert out["large"].shape == (2, 1)
    assert out["hue"].shape == (2, 6)
    assert out["segmentation"].shape == (2, 4, 32, 32)
    assert out["depth"].shape == (2, 1, 32, 32)
    assert out["normals"].shape == (2, 3, 32, 32)


def test_grayscale_input_and_large_input_stem():
    model = create_model("resnet18", classification_tasks()[:1], in_channels=1, image_size=224)
    assert model.encoder.reduction == 32
    assert model(torch.rand(1, 1, 224, 224))["large"].shape == (1, 1)


def test_shared_and_task_parameters_partition_the_model():
    model = create_model("small_cnn", classification_tasks() + dense_tasks())
    shared = {id(p) for p in model.shared_parameters()}
    heads = {id(p) for p in model.task_parameters()}
    every = {id(p) for p in model.parameters()}
    assert shared.isdisjoint(heads) and shared | heads == every
    assert {id(p) for p in model.task_parameters("hue")} < heads


def test_channels_last_is_kept_off_modules_with_a_narrow_strided_1x1_convolution():
    from torch import nn

    from raymtl.models.mtl import channels_last_is_safe, to_channels_last

    narrow = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 1, stride=2))
    assert not channels_last_is_safe(narrow)
    assert to_channels_last(narrow)[1].weight.is_contiguous()  # left as it was
    for fine in (nn.Conv2d(8, 16, 1, stride=2), nn.Conv2d(4, 8, 3, stride=2), nn.Conv2d(4, 8, 1)):
        assert channels_last_is_safe(fine)
        assert to_channels_last(fine).weight.is_contiguous(memory_format=torch.channels_last)


GENERATOR_GRADIENTS = """
import copy, torch
from raymtl.data.synthetic import dense_tasks
from raymtl.protect.generator import MTLUEGenerator
torch.set_num_threads(1)
torch.manual_seed(0)
tasks = dense_tasks()
g = MTLUEGenerator(tasks, 3, 16, 8 / 255, width=4)
reference = copy.deepcopy(g).to(memory_format=torch.contiguous_format)
images = torch.rand(48, 3, 16, 16)
targets = {
    "segmentation": torch.randint(0, 4, (48, 16, 16)),
    "depth": torch.rand(48, 16, 16) + 1,
    "normals": torch.nn.functional.normalize(torch.randn(48, 3, 16, 16), dim=1),
}
for net in (g, reference):
    net(images, targets).square().sum().backward()
for (name, a), b in zip(g.named_parameters(), reference.parameters()):
    assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
print("equal")
"""


def test_a_narrow_generator_has_the_gradients_of_its_contiguous_copy():
    # In a subprocess: on an affected machine the unguarded layout corrupts the heap.
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", GENERATOR_GRADIENTS], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "equal", out.stderr[-2000:]
