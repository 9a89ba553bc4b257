"""Metric functions for every task kind, on whole arrays, plus streaming meters used by the engine.

Functions take torch tensors (any device) and return plain floats so they can be tested by hand.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def binary_metrics(scores: Tensor, targets: Tensor) -> dict[str, float]:
    """Accuracy (score > 0), balanced accuracy and ROC-AUC of binary logits against 0/1 targets."""
    scores = scores.detach().flatten().double().cpu()
    targets = targets.detach().flatten().long().cpu()
    predicted = (scores > 0).long()
    accuracy = (predicted == targets).double().mean().item() if len(targets) else math.nan
    recalls = []
    for cls in (0, 1):
        members = targets == cls
        if members.any():
            recalls.append((predicted[members] == cls).double().mean().item())
    balanced = sum(recalls) / len(recalls) if recalls else math.nan
    return {
        "accuracy": accuracy,
        "balanced_accuracy": balanced,
        "relabelled_balanced_accuracy": max(balanced, 1 - balanced),
        "roc_auc": roc_auc(scores, targets),
    }


def roc_auc(scores: Tensor, targets: Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count one half); NaN if a class is absent."""
    scores = scores.detach().flatten().double().cpu()
    targets = targets.detach().flatten().bool().cpu()
    n_pos = int(targets.sum())
    n_neg = len(targets) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(scores)
    rank_sum_pos = ranks[targets].sum().item()
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks where tied values share the mean of their ranks."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    ranks_sorted = torch.arange(1, len(values) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(
        sorted_values, return_inverse=True, return_counts=True
    )
    ends = torch.cumsum(counts, 0).double()
    starts = ends - counts.double() + 1
    ranks_sorted = ((starts + ends) / 2)[inverse]
    ranks = torch.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def confusion_matrix(predicted: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """Rows = true class, columns = predicted class; entries outside [0, num_classes) are ignored."""
    predicted = predicted.detach().flatten().long()
    targets = targets.detach().flatten().long()
    valid = (targets >= 0) & (targets < num_classes)
    index = targets[valid] * num_classes + predicted[valid]
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().long()


def multiclass_metrics_from_confusion(confusion: Tensor) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over classes that occur) and the relabelled
    balanced accuracy (``relabelled_balanced_accuracy``)."""
    confusion = confusion.double()
    total = confusion.sum().item()
    accuracy = confusion.diag().sum().item() / total if total else math.nan
    support = confusion.sum(1)
    present = support > 0
    recalls = confusion.diag()[present] / support[present]
    balanced = recalls.mean().item() if present.any() else math.nan
    return {
        "accuracy": accuracy,
        "balanced_accuracy": balanced,
        "relabelled_balanced_accuracy": relabelled_balanced_accuracy(confusion),
    }


def relabelled_balanced_accuracy(confusion: Tensor) -> float:
    """Balanced accuracy after the best one-to-one relabelling of the predicted classes (binary:
    max(b, 1 − b)). A victim that learned a task's labels permuted (TAP's flipped targets) scores
    below chance on balanced accuracy, yet an attacker who checks it on a few labelled clean
    images undoes the permutation: this is what such an attacker gets back. Near chance only
    when the victim really learned nothing."""
    from scipy.optimize import linear_sum_assignment

    confusion = confusion.double()
    support = confusion.sum(1)
    present = support > 0
    if not present.any():
        return math.nan
    rates = (confusion[present] / support[present, None]).numpy()  # P(predicted | true class)
    rows, columns = linear_sum_assignment(rates, maximize=True)
    return float(rates[rows, columns].sum() / len(rows))


def segmentation_metrics_from_confusion(confusion: Tensor) -> dict[str, float]:
    """Mean IoU over classes with a non-empty union, and pixel accuracy."""
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    miou = (intersection[present] / union[present]).mean().item() if present.any() else math.nan
    total = confusion.sum().item()
    pixel_accuracy = intersection.sum().item() / total if total else math.nan
    return {"miou": miou, "pixel_accuracy": pixel_accuracy}


def depth_metric_sums(predicted: Tensor, targets: Tensor) -> Tensor:
    """[sum of |p-t|/t, count of max(p/t, t/p) < 1.25, valid pixel count] over pixels with t > 0."""
    predicted = predicted.detach().flatten().double()
    targets = targets.detach().flatten().double()
    valid = targets > 0
    p = predicted[valid].clamp_min(1e-6)
    t = targets[valid]
    abs_rel = ((p - t).abs() / t).sum()
    delta1 = (torch.maximum(p / t, t / p) < 1.25).double().sum()
    return torch.stack([abs_rel, delta1, valid.sum().double()]).cpu()


def depth_metrics_from_sums(sums: Tensor) -> dict[str, float]:
    """Abs-rel error (lower is better) and the fraction of pixels with δ < 1.25."""
    count = sums[2].item()
    if count == 0:
        return {"abs_rel": math.nan, "delta1": math.nan}
    return {"abs_rel": sums[0].item() / count, "delta1": sums[1].item() / count}


NORMAL_THRESHOLDS_DEG = (11.25, 22.5, 30.0)


def normal_angles_deg(predicted: Tensor, targets: Tensor) -> Tensor:
    """Angle in degrees between predicted and true normals ([B,3,H,W]) at pixels with a true normal."""
    predicted = predicted.detach().double()
    targets = targets.detach().double()
    valid = targets.norm(dim=1) > 0
    p = torch.nn.functional.normalize(predicted, dim=1)
    t = torch.nn.functional.normalize(targets, dim=1)
    cosine = (p * t).sum(1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cosine))[valid]


def normal_metric_sums(predicted: Tensor, targets: Tensor) -> Tensor:
    """[sum of angles, count within each threshold..., valid count] for streaming accumulation."""
    angles = normal_angles_deg(predicted, targets)
    within = [(angles < t).double().sum() for t in NORMAL_THRESHOLDS_DEG]
    return torch.stack([angles.sum(), *within, torch.tensor(float(len(angles)))]).cpu()


def normal_metrics_from_sums(sums: Tensor) -> dict[str, float]:
    """Mean angular error in degrees and the fraction of pixels within 11.25, 22.5 and 30 degrees."""
    count = sums[-1].item()
    names = ["within_11_25", "within_22_5", "within_30"]
    if count == 0:
        return {"mean_angle": math.nan, **{n: math.nan for n in names}}
    out = {"mean_angle": sums[0].item() / count}
    out.update({name: sums[1 + i].item() / count for i, name in enumerate(names)})
    return out
