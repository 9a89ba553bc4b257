"""Measuring unlearning: per-task metrics on forget, retain and test data, UIS, the
retrain-anchored distance and membership-inference AUC.

Definitions (raymtl's, after OrthoGrad; O = original model, U = unlearned, R = retrained), with
each task's primary metric (higher is better):
- forget set of a target task t: the instances whose t label was withdrawn; of a non-target task
  (partial requests): the request's instances, whose t label stays in the training data;
- retain set: training instances with no withdrawn label (a seeded sample of at most
  ``retain_limit``);
- UIS_t (lower is better), target task: ½(|O_test − U_test| / O_test + |O_test − U_forget| / O_test);
  non-target task: ½(|O_test − U_test| / O_test + |O_forget − U_forget| / O_forget);
- retrain distance_t: ½(|U_test − R_test| + |U_forget − R_forget|);
- MIA AUC_t (target tasks): how well the per-sample loss (or the confidence in the true label)
  tells the forget pairs from test samples; 0.5 = indistinguishable, retraining's value is the target.
- calibrated MIA AUC_t: a shadow-free attack (logistic regression on loss, confidence and entropy)
  fitted on retain samples (members) against one half of the test set, scored on the forget pairs
  against the other half; with a 95 % bootstrap interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from raymtl.data.base import MultiTaskArrays
from raymtl.engine import evaluate, make_loader, to_device
from raymtl.metrics import roc_auc
from raymtl.tasks import TaskSpec
from raymtl.unlearn.request import DeletionRequest


@dataclass
class ModelReport:
    """One model's numbers: per task, the primary metric on each split and MIA AUCs."""

    test: dict[str, float]
    forget: dict[str, float]
    retain: dict[str, float]
    mia_loss: dict[str, float] = field(default_factory=dict)
    mia_confidence: dict[str, float] = field(default_factory=dict)
    mia_calibrated: dict[str, tuple[float, float, float]] = field(default_factory=dict)


@torch.no_grad()
def per_sample_scores(
    model: nn.Module, dataset: Any, tasks: list[TaskSpec], device: torch.device
) -> dict[str, dict[str, Tensor]]:
    """Per task: each sample's loss and its confidence in the true label (classification: the
    probability of the true class, averaged over valid pixels for segmentation; regression: −loss)."""
    model.eval()
    out: dict[str, dict[str, list[Tensor]]] = {
        t.name: {"loss": [], "confidence": [], "entropy": []} for t in tasks
    }
    for batch in make_loader(dataset, 256, shuffle=False):
        if batch is None:
            continue
        batch = to_device(batch, device)
        outputs = model(batch["image"])
        for task in tasks:
            output, target = outputs[task.name].float(), batch["targets"][task.name]
            loss = task.loss(output, target)
            entropy = torch.zeros_like(loss)
            if task.kind == "binary":
                p = torch.sigmoid(output.reshape(len(output)))
                confidence = torch.where(target.bool(), p, 1 - p)
                entropy = -(p * p.clamp_min(1e-12).log() + (1 - p) * (1 - p).clamp_min(1e-12).log())
            elif task.kind in ("multiclass", "segmentation"):
                probs = torch.softmax(output, 1)
                pixel_entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
                entropy = (
                    pixel_entropy.flatten(1).mean(1)
                    if task.kind == "segmentation"
                    else pixel_entropy
                )
                confidence = (
                    torch.exp(-loss)
                    if task.kind == "segmentation"
                    else probs.gather(1, target.long()[:, None]).squeeze(1)
                )
            else:
                confidence = -loss
            out[task.name]["loss"].append(loss.cpu())
            out[task.name]["confidence"].append(confidence.cpu())
            out[task.name]["entropy"].append(entropy.cpu())
    return {t: {k: torch.cat(v) for k, v in d.items()} for t, d in out.items()}


def membership_auc(member: Tensor, non_member: Tensor) -> float:
    """AUC of a score that should be higher for members (training pairs) than for non-members."""
    scores = torch.cat([member, non_member])
    labels = torch.cat([torch.ones(len(member)), torch.zeros(len(non_member))])
    return roc_auc(scores, labels)


def attack_features(scores: dict[str, Tensor]) -> Tensor:
    """Per-sample attack features [N, 3]: loss, confidence in the true label, output entropy."""
    return torch.stack([scores["loss"], scores["confidence"], scores["entropy"]], 1).double()


def calibrated_mia(
    members: Tensor,
    non_members: Tensor,
    calibration_members: Tensor,
    calibration_non_members: Tensor,
    bootstrap: int = 200,
    seed: int = 0,
) -> tuple[float, float, float]:
    """A shadow-free membership attack: logistic regression on attack features, fitted on
    calibration data (retain samples = members, one half of the test set = non-members) and scored
    on the forget pairs against the other half of the test set. Returns the AUC and a 95 %
    bootstrap interval."""
    x = torch.cat([calibration_members, calibration_non_members])
    y = torch.cat([torch.ones(len(calibration_members)), torch.zeros(len(calibration_non_members))])
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    x = (x - mean) / std
    weights = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weights], max_iter=100)

    def closure() -> Tensor:
        optimiser.zero_grad()
        logits = x @ weights[:-1] + weights[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.double())
        loss = loss + 1e-3 * (weights[:-1] ** 2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        score_in = ((members - mean) / std) @ weights[:-1]
        score_out = ((non_members - mean) / std) @ weights[:-1]
    auc = membership_auc(score_in, score_out)
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(bootstrap):
        a = score_in[torch.randint(len(score_in), (len(score_in),), generator=generator)]
        b = score_out[torch.randint(len(score_out), (len(score_out),), generator=generator)]
        samples.append(membership_auc(a, b))
    valid = torch.tensor([v for v in samples if not math.isnan(v)], dtype=torch.float64)
    if not len(valid):
        return auc, math.nan, math.nan
    return auc, float(valid.quantile(0.025)), float(valid.quantile(0.975))


def forget_sets(request: DeletionRequest, tasks: list[TaskSpec]) -> dict[str, Tensor]:
    """Per task, the ids of its forget set (see the module docstring)."""
    everyone = torch.tensor(request.forget_ids)  # a copy: arrays from Ray are read-only
    targets = set(request.target_tasks)
    return {
        t.name: torch.tensor(request.pairs[t.name]) if t.name in targets else everyone
        for t in tasks
    }


def _rows(train: MultiTaskArrays, ids: Tensor) -> Tensor:
    return torch.nonzero(torch.isin(train.ids, ids)).flatten()


def measure(
    model: nn.Module,
    train: MultiTaskArrays,
    test: Any,
    tasks: list[TaskSpec],
    request: DeletionRequest,
    device: torch.device,
    retain_limit: int = 2000,
    seed: int = 0,
    test_scores: dict[str, dict[str, Tensor]] | None = None,
    membership: bool = True,
) -> ModelReport:
    """Evaluate one model on the test set, each task's forget set and a retain sample; with
    ``membership`` (default) also the MIA AUCs on the target tasks' forget sets."""
    model.eval()
    primary = {t.name: t.primary_metric for t in tasks}
    test_eval = evaluate(model, test, tasks, device=device)["tasks"]
    report = ModelReport(test={t: test_eval[t][primary[t]] for t in primary}, forget={}, retain={})
    keep = torch.nonzero(~torch.isin(train.ids, torch.from_numpy(request.forget_ids))).flatten()
    generator = torch.Generator().manual_seed(seed)
    keep = keep[torch.randperm(len(keep), generator=generator)[:retain_limit]]
    retain_split = train.subset(keep, split="retain")
    retain_eval = evaluate(model, retain_split, tasks, device=device)["tasks"]
    report.retain = {t: retain_eval[t][primary[t]] for t in primary}
    groups: dict[tuple[int, ...], list[TaskSpec]] = {}
    sets = forget_sets(request, tasks)
    for task in tasks:
        groups.setdefault(tuple(sets[task.name].tolist()), []).append(task)
    retain_scores: dict[str, dict[str, Tensor]] | None = None
    for ids, members in groups.items():
        subset = train.subset(_rows(train, torch.tensor(ids, dtype=torch.long)), split="forget")
        metrics = evaluate(model, subset, members, device=device)["tasks"]
        report.forget.update({t.name: metrics[t.name][primary[t.name]] for t in members})
        if not membership or not any(t.name in request.target_tasks for t in members):
            continue
        scores = per_sample_scores(model, subset, members, device)
        if test_scores is None:
            test_scores = per_sample_scores(model, test, tasks, device)
        if retain_scores is None:
            retain_scores = per_sample_scores(model, retain_split, tasks, device)
        n_test = len(next(iter(test_scores.values()))["loss"])
        halves = torch.randperm(n_test, generator=torch.Generator().manual_seed(seed + 1))
        calibrate, held_out = halves[: n_test // 2], halves[n_test // 2 :]
        for t in members:
            if t.name not in request.target_tasks:
                continue
            report.mia_loss[t.name] = membership_auc(
                -scores[t.name]["loss"], -test_scores[t.name]["loss"]
            )
            report.mia_confidence[t.name] = membership_auc(
                scores[t.name]["confidence"], test_scores[t.name]["confidence"]
            )
            test_features = attack_features(test_scores[t.name])
            report.mia_calibrated[t.name] = calibrated_mia(
                attack_features(scores[t.name]),
                test_features[held_out],
                attack_features(retain_scores[t.name]),
                test_features[calibrate],
                seed=seed,
            )
    return report


def _relative(a: float, b: float, scale: float) -> float:
    return abs(a - b) / scale if scale > 0 else math.nan


def uis(
    original: ModelReport, unlearned: ModelReport, request: DeletionRequest
) -> dict[str, float]:
    """Per-task Unlearning Impact Score (lower is better); see the module docstring."""
    out = {}
    for task, o_test in original.test.items():
        generalisation = _relative(o_test, unlearned.test[task], o_test)
        if task in request.target_tasks:
            forgetting = _relative(o_test, unlearned.forget[task], o_test)
        else:
            forgetting = _relative(
                original.forget[task], unlearned.forget[task], original.forget[task]
            )
        out[task] = 0.5 * (generalisation + forgetting)
    return out


def retrain_distance(unlearned: ModelReport, retrained: ModelReport) -> dict[str, float]:
    """Per task, ½(|U_test − R_test| + |U_forget − R_forget|) (0 = behaves like retraining)."""
    return {
        t: 0.5
        * (
            abs(unlearned.test[t] - retrained.test[t])
            + abs(unlearned.forget[t] - retrained.forget[t])
        )
        for t in unlearned.test
    }


def mean(values: dict[str, float], keys: list[str] | None = None) -> float:
    """Mean of the values (of ``keys`` only, when given), NaN when empty."""
    chosen = [v for k, v in values.items() if keys is None or k in keys]
    chosen = [v for v in chosen if not math.isnan(v)]
    return sum(chosen) / len(chosen) if chosen else math.nan
