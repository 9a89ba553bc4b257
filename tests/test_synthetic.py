"""The embedded synthetic data sets: determinism, stable ids, exact labels, consistent geometry."""

import numpy as np
import pytest
import torch

from raymtl.data import DATASETS, build_dataset
from raymtl.data.synthetic import (
    BINARY_ATTRIBUTES,
    MULTICLASS_TASKS,
    TEST_ID_OFFSET,
    labels_from_factors,
    normals_from_depth,
    render_classification,
)
from raymtl.errors import ConfigError


@pytest.fixture(scope="module")
def small():
    return build_dataset("synthetic", n_train=300, n_test=100)


def test_task_list_has_at_least_ten_binary_and_two_multiclass_tasks(small):
    kinds = [t.kind for t in small.tasks]
    assert kinds.count("binary") >= 10 and len(BINARY_ATTRIBUTES) >= 10
    assert kinds.count("multiclass") >= 2 and len(MULTICLASS_TASKS) >= 2


def test_same_seed_same_bytes_other_seed_other_images(small):
    again = build_dataset("synthetic", n_train=300, n_test=100)
    assert torch.equal(small.train.images, again.train.images)
    assert all(
        torch.equal(small.train.targets[k], again.train.targets[k]) for k in small.train.targets
    )
    other = build_dataset("synthetic", n_train=300, n_test=100, seed=1)
    assert not torch.equal(small.train.images, other.train.images)


def test_sample_ids_are_stable_across_split_sizes(small):
    bigger = build_dataset("synthetic", n_train=600, n_test=50)
    assert torch.equal(bigger.train.images[:300], small.train.images)
    assert torch.equal(bigger.test.images[:50], small.test.images[:50])
    assert small.train.ids.tolist() == list(range(300))
    assert small.test.ids[0].item() == TEST_ID_OFFSET
    assert set(small.train.ids.tolist()).isdisjoint(small.test.ids.tolist())


def test_every_label_is_the_exact_function_of_the_factors(small):
    for row in range(len(small.train)):
        factors = {k: int(v[row]) for k, v in small.train.factors.items()}
        labels = labels_from_factors(factors)
        for name, target in small.train.targets.items():
            assert int(target[row]) == labels[name]


def test_render_is_a_pure_function_of_seed_and_id():
    a, fa = render_classification(0, 42, 32)
    b, fb = render_classification(0, 42, 32)
    assert np.array_equal(a, b) and fa == fb
    assert a.dtype == np.uint8 and a.shape == (3, 32, 32)


def test_labels_are_roughly_balanced(small):
    for name in BINARY_ATTRIBUTES:
        rate = small.train.targets[name].float().mean().item()
        assert 0.15 < rate < 0.85, name


def test_image_size_is_configurable():
    bundle = build_dataset("synthetic", n_train=4, n_test=2, image_size=48)
    assert bundle.train.images.shape == (4, 3, 48, 48)


def test_dense_scenes_have_consistent_depth_normals_and_segmentation():
    bundle = build_dataset("synthetic_dense", n_train=20, n_test=5)
    names = [t.name for t in bundle.tasks]
    assert names == ["segmentation", "depth", "normals"]
    depth = bundle.train.targets["depth"]
    normals = bundle.train.targets["normals"]
    segmentation = bundle.train.targets["segmentation"]
    assert (depth > 0).all()
    assert segmentation.min() >= 0 and segmentation.max() < bundle.tasks[0].num_classes
    assert (segmentation > 0).any()
    norms = normals.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    for row in range(len(depth)):
        recomputed = normals_from_depth(depth[row].double().numpy(), 4.0 / 32)
        assert np.allclose(recomputed, normals[row].numpy(), atol=1e-4)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="does not take option"):
        build_dataset("synthetic", n_tran=3)
    with pytest.raises(ConfigError, match="n_train and n_test must be >= 1"):
        build_dataset("synthetic", n_train=0)
    with pytest.raises(ConfigError, match="unknown dataset 'celebb'; available: "):
        build_dataset("celebb")
    assert "synthetic" in DATASETS


def test_batched_fetch_matches_single_fetch(small):
    batch = small.train.__getitems__([3, 7])
    single = small.train[7]
    assert torch.equal(batch["image"][1], single["image"])
    assert batch["id"].tolist() == [3, 7]
    assert batch["targets"]["shape"][1] == single["targets"]["shape"]


def test_contrast_option_keeps_labels_and_lowers_feature_contrast():
    from raymtl.errors import ConfigError

    default = build_dataset("synthetic", n_train=40, n_test=4, image_size=32)
    same = build_dataset("synthetic", n_train=40, n_test=4, image_size=32, contrast=1.0)
    faint = build_dataset("synthetic", n_train=40, n_test=4, image_size=32, contrast=0.3)
    assert torch.equal(default.train.images, same.train.images)
    assert faint.options["contrast"] == 0.3 and "contrast" not in default.options
    for name in default.train.targets:
        assert torch.equal(default.train.targets[name], faint.train.targets[name])

    # Every image is less varied: its pixels sit closer to their own median (the background).
    def spread(images):
        x = images.float().flatten(1)
        return (x - x.median(1, keepdim=True).values).abs().mean(1)

    assert (spread(faint.train.images) < spread(default.train.images)).float().mean() > 0.9
    with pytest.raises(ConfigError, match=r"contrast must be in \(0, 1\], got 0.0"):
        build_dataset("synthetic", n_train=4, n_test=4, contrast=0)


def test_dense_contrast_blends_toward_a_label_free_scene_and_keeps_labels():
    from raymtl.errors import ConfigError

    def dense(contrast=None):
        extra = {} if contrast is None else {"contrast": contrast}
        return build_dataset("synthetic_dense", n_train=30, n_test=2, image_size=32, **extra)

    default, same, faint, half = dense(), dense(1.0), dense(0.3), dense(0.65)
    assert torch.equal(default.train.images, same.train.images)
    assert faint.options["contrast"] == 0.3 and "contrast" not in default.options
    for name in default.train.targets:
        assert torch.equal(default.train.targets[name], faint.train.targets[name])
    # The same scene blended linearly: 0.3 moves each pixel about twice as far as 0.65 does
    # (up to rounding and clipping to 8 bits), and every image is less varied around its median
    # (the floor).
    full = default.train.images.float()
    far, near = faint.train.images.float() - full, half.train.images.float() - full
    assert ((far - 2 * near).abs() <= 2).float().mean() > 0.99 and far.abs().max() > 20

    def spread(images):
        x = images.float().flatten(1)
        return (x - x.median(1, keepdim=True).values).abs().mean(1)

    assert (spread(faint.train.images) < spread(default.train.images)).float().mean() > 0.9
    with pytest.raises(ConfigError, match=r"contrast must be in \(0, 1\], got 1.5"):
        dense(1.5)


def test_options_given_as_text_are_parsed_or_rejected_in_one_line():
    bundle = build_dataset("synthetic", n_train="12", n_test="4", image_size="16")
    assert len(bundle.train) == 12 and bundle.image_size == 16
    with pytest.raises(ConfigError, match="n_train must be an integer, got 'many'"):
        build_dataset("synthetic", n_train="many")
    with pytest.raises(ConfigError, match="contrast must be a number, got 'low'"):
        build_dataset("synthetic", contrast="low")
