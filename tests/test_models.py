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
