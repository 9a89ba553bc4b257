"""Each metric against values computed by hand."""

import math

import pytest
import torch

from raymtl import metrics as M
from raymtl.tasks import IGNORE_INDEX, TaskSpec, mean_primary


def test_binary_accuracy_balanced_accuracy_and_auc_by_hand():
    scores = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0])
    targets = torch.tensor([1, 0, 0, 0, 1])
    out = M.binary_metrics(scores, targets)
    assert out["accuracy"] == pytest.approx(4 / 5)
    # recall of class 1 = 2/2, of class 0 = 2/3
    assert out["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    assert out["roc_auc"] == pytest.approx(1.0)


def test_roc_auc_textbook_case_and_ties():
    assert M.roc_auc(
        torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])
    ) == pytest.approx(0.75)
    assert M.roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == pytest.approx(0.5)
    # one positive tied with one of two negatives, above the other: (1 + 0.5) / 2
    assert M.roc_auc(torch.tensor([0.5, 0.5, 0.1]), torch.tensor([1, 0, 0])) == pytest.approx(0.75)
    assert math.isnan(M.roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))


def test_multiclass_accuracy_and_balanced_accuracy_by_hand():
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 0, 2])
    confusion = M.confusion_matrix(predicted, targets, 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    out = M.multiclass_metrics_from_confusion(confusion)
    assert out["accuracy"] == pytest.approx(5 / 7)
    assert out["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)


def test_relabelling_recovers_a_permuted_victim_but_not_a_guessing_one():
    """A victim that learned the labels flipped/permuted scores 0 balanced accuracy and 1 after
    relabelling; one that predicts a single class stays at chance either way."""
    flipped = M.binary_metrics(torch.tensor([1.0, 2.0, -1.0, -2.0]), torch.tensor([0, 0, 1, 1]))
    assert flipped["balanced_accuracy"] == 0.0
    assert flipped["relabelled_balanced_accuracy"] == 1.0
    partly = M.binary_metrics(torch.tensor([1.0, -1.0, -1.0, -2.0]), torch.tensor([0, 0, 1, 1]))
    assert partly["relabelled_balanced_accuracy"] == pytest.approx(0.75)  # 1 − (1/2 + 0) / 2
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    rotated = M.confusion_matrix((targets + 1) % 3, targets, 3)
    out = M.multiclass_metrics_from_confusion(rotated)
    assert out["balanced_accuracy"] == 0.0 and out["relabelled_balanced_accuracy"] == 1.0
    constant = M.confusion_matrix(torch.zeros(7, dtype=torch.long), targets, 3)
    assert M.relabelled_balanced_accuracy(constant) == pytest.approx(1 / 3)
    confusion = torch.tensor([[3, 1, 0], [0, 1, 3], [2, 2, 0]])
    # identity: (3/4 + 1/4 + 0) / 3; best: 0→col 0, 1→col 2, 2→col 1: (3/4 + 3/4 + 1/2) / 3
    assert M.relabelled_balanced_accuracy(confusion) == pytest.approx((0.75 + 0.75 + 0.5) / 3)


def test_segmentation_miou_and_pixel_accuracy_by_hand_with_ignored_pixels():
    target = torch.tensor([[0, 0], [1, 1], [IGNORE_INDEX, IGNORE_INDEX]])
    predicted = torch.tensor([[0, 1], [1, 1], [0, 0]])
    out = M.segmentation_metrics_from_confusion(M.confusion_matrix(predicted, target, 2))
    # class 0: TP 1, FN 1 -> IoU 1/2; class 1: TP 2, FP 1 -> IoU 2/3
    assert out["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert out["pixel_accuracy"] == pytest.approx(3 / 4)


def test_depth_abs_rel_and_delta1_by_hand_ignoring_zero_depth():
    predicted = torch.tensor([1.0, 2.0, 4.0, 9.0])
    target = torch.tensor([1.0, 1.0, 4.0, 0.0])
    out = M.depth_metrics_from_sums(M.depth_metric_sums(predicted, target))
    assert out["abs_rel"] == pytest.approx((0 + 1 + 0) / 3)
    assert out["delta1"] == pytest.approx(2 / 3)


def _unit(deg: float) -> list[float]:
    r = math.radians(deg)
    return [math.sin(r), 0.0, math.cos(r)]


def test_normal_angles_and_thresholds_by_hand():
    target = torch.tensor([[0.0, 0.0, 1.0]] * 5).T.reshape(1, 3, 1, 5)
    predicted = torch.tensor(
        [_unit(0), _unit(10), _unit(20), [2.0, 0.0, 2.0], _unit(90)]
    ).T.reshape(1, 3, 1, 5)
    angles = M.normal_angles_deg(predicted, target)
    assert angles.tolist() == pytest.approx([0, 10, 20, 45, 90], abs=1e-5)
    out = M.normal_metrics_from_sums(M.normal_metric_sums(predicted, target))
    assert out["mean_angle"] == pytest.approx(165 / 5)
    assert out["within_11_25"] == pytest.approx(2 / 5)
    assert out["within_22_5"] == pytest.approx(3 / 5)
    assert out["within_30"] == pytest.approx(3 / 5)


def test_normals_without_a_true_normal_are_ignored():
    target = torch.zeros(1, 3, 1, 2)
    target[0, 2, 0, 0] = 1.0
    predicted = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 2)
    out = M.normal_metrics_from_sums(M.normal_metric_sums(predicted, target))
    assert out["mean_angle"] == pytest.approx(0.0, abs=1e-6)


def test_task_meter_streams_batches_like_one_big_batch():
    task = TaskSpec("t", "multiclass", 3)
    logits = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(2))
    meter = task.new_meter()
    for chunk in range(4):
        meter.update(logits[chunk * 10 : (chunk + 1) * 10], targets[chunk * 10 : (chunk + 1) * 10])
    whole = M.multiclass_metrics_from_confusion(M.confusion_matrix(logits.argmax(1), targets, 3))
    assert meter.compute() == whole


def test_per_sample_losses_have_batch_shape_for_every_kind():
    b = 3
    cases = [
        (TaskSpec("b", "binary"), torch.randn(b, 1), torch.tensor([0, 1, 1])),
        (TaskSpec("m", "multiclass", 4), torch.randn(b, 4), torch.tensor([0, 3, 1])),
        (TaskSpec("s", "segmentation", 4), torch.randn(b, 4, 5, 5), torch.randint(0, 4, (b, 5, 5))),
        (TaskSpec("d", "depth"), torch.rand(b, 1, 5, 5), torch.rand(b, 5, 5) + 0.5),
        (TaskSpec("n", "normals"), torch.randn(b, 3, 5, 5), torch.randn(b, 3, 5, 5)),
    ]
    for task, output, target in cases:
        loss = task.loss(output, target)
        assert loss.shape == (b,), task.kind
        assert torch.isfinite(loss).all()


def test_unknown_task_kind_is_a_config_error():
    from raymtl.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown kind"):
        TaskSpec("x", "regression")


def test_mean_primary_uses_each_kinds_headline_metric():
    tasks = [TaskSpec("a", "binary"), TaskSpec("s", "segmentation", 3)]
    per_task = {
        "a": {"balanced_accuracy": 0.8, "accuracy": 0.1},
        "s": {"miou": 0.4, "pixel_accuracy": 0.9},
    }
    assert mean_primary(per_task, tasks) == pytest.approx(0.6)
