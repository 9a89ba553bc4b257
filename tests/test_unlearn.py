"""Multi-task unlearning: requests, the retrain loss mask, per-sample gradients, the projection,
the methods, the metrics and the command."""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys

import pytest
import torch
import yaml

from raymtl.data import build_dataset
from raymtl.engine import TrainConfig, evaluate, fit, task_losses
from raymtl.errors import ConfigError
from raymtl.models import create_model
from raymtl.unlearn import (
    UNLEARN_METHODS,
    UnlearnData,
    class_request,
    default_options,
    load_request,
    random_request,
    retain_split,
    run_method,
)
from raymtl.unlearn.evaluation import ModelReport, membership_auc, retrain_distance, uis
from raymtl.unlearn.gradients import (
    JointProjector,
    per_sample_gradients,
    per_sample_task_gradients,
    top_directions,
    weighted_loss_gradient,
)
from raymtl.unlearn.interference import (
    per_task_gradients,
    shared_parameter_names,
    task_groups,
    task_subspaces,
)
from raymtl.unlearn.report import average_rows
from raymtl.unlearn.request import request_from_pairs
from raymtl.unlearn.tuned import (
    load_tuned_defaults,
    resolve_method_options,
    tuned_options,
)


@pytest.fixture(scope="module")
def tiny():
    bundle = build_dataset("synthetic", n_train=120, n_test=40, image_size=16)
    tasks = bundle.tasks[:4]
    config = TrainConfig(epochs=2, batch_size=32, device="cpu")

    def make(t):
        return create_model("small_cnn", t, 3, 16, width=8)

    original = fit(make(tasks), bundle.train, None, tasks, config).model.eval()
    losses = evaluate(original, bundle.test, tasks)["loss"]
    return bundle, tasks, make, config, original, losses


def _data(tiny):
    bundle, tasks, make, config, _, losses = tiny
    return UnlearnData(bundle.train, tasks, make, config, losses)


# ---------------------------------------------------------------- requests


def test_random_requests_are_seeded_and_know_full_from_partial(tiny):
    bundle, tasks = tiny[0], tiny[1]
    full = random_request(bundle.train.ids, tasks, 0.1, seed=3)
    assert full.full and len(full.forget_ids) == 12 and full.target_tasks == [t.name for t in tasks]
    assert (
        full.forget_ids == random_request(bundle.train.ids, tasks, 0.1, seed=3).forget_ids
    ).all()
    partial = random_request(bundle.train.ids, tasks, 0.1, [tasks[1].name], seed=3)
    assert not partial.full and partial.target_tasks == [tasks[1].name]
    with pytest.raises(ConfigError, match="unknown task"):
        random_request(bundle.train.ids, tasks, 0.1, ["nope"])
    with pytest.raises(ConfigError, match="fraction"):
        random_request(bundle.train.ids, tasks, 1.5)


def test_request_files_load_and_bad_rows_name_file_and_row(tiny, tmp_path):
    bundle, tasks = tiny[0], tiny[1]
    ids = bundle.train.ids.tolist()
    good = tmp_path / "request.csv"
    good.write_text(f"id,task\n{ids[0]},{tasks[0].name}\n{ids[1]},*\n")
    request = load_request(good, tasks, bundle.train.ids)
    assert request.pairs[tasks[0].name].tolist() == sorted(ids[:2])
    assert request.pairs[tasks[2].name].tolist() == [ids[1]]
    as_json = tmp_path / "request.json"
    as_json.write_text(json.dumps([{"id": ids[0], "task": tasks[0].name}]))
    assert load_request(as_json, tasks, bundle.train.ids).target_tasks == [tasks[0].name]
    bad_id = tmp_path / "bad_id.csv"
    bad_id.write_text(f"id,task\n{ids[0]},{tasks[0].name}\n999999999,{tasks[0].name}\n")
    with pytest.raises(
        ConfigError, match=r"bad_id.csv: row 2: id 999999999 is not in the training"
    ):
        load_request(bad_id, tasks, bundle.train.ids)
    bad_task = tmp_path / "bad_task.csv"
    bad_task.write_text(f"id,task\n{ids[0]},age\n")
    with pytest.raises(ConfigError, match=r"bad_task.csv: row 1: unknown task 'age'"):
        load_request(bad_task, tasks, bundle.train.ids)
    header = tmp_path / "header.csv"
    header.write_text("sample,label\n1,a\n")
    with pytest.raises(ConfigError, match="header 'id,task'"):
        load_request(header, tasks, bundle.train.ids)
    with pytest.raises(ConfigError, match="missing file"):
        load_request(tmp_path / "none.csv", tasks, bundle.train.ids)


def test_class_request_takes_every_instance_with_the_label(tiny):
    bundle, tasks = tiny[0], tiny[1]
    request = class_request(bundle.train, tasks, tasks[0].name, 1)
    expected = bundle.train.ids[bundle.train.targets[tasks[0].name] == 1]
    assert sorted(request.forget_ids.tolist()) == sorted(expected.tolist())


# ---------------------------------------------------------------- the retrain oracle's data


def test_full_request_drops_instances_partial_keeps_their_other_tasks(tiny):
    bundle, tasks, make = tiny[0], tiny[1], tiny[2]
    full = random_request(bundle.train.ids, tasks, 0.1, seed=1)
    dropped = retain_split(bundle.train, full)
    assert len(dropped) == len(bundle.train) - 12
    assert not torch.isin(dropped.ids, torch.from_numpy(full.forget_ids)).any()

    target, other = tasks[0].name, tasks[1].name
    partial = random_request(bundle.train.ids, tasks, 0.1, [target], seed=1)
    kept = retain_split(bundle.train, partial)
    assert len(kept) == len(bundle.train)  # the instances stay
    rows = torch.nonzero(torch.isin(bundle.train.ids, torch.from_numpy(partial.forget_ids)))
    batch = kept.__getitems__(rows.flatten().tolist())  # only the withdrawn instances
    assert batch["masks"][target].sum() == 0 and batch["masks"][other].sum() == len(rows)
    model = make(tasks)
    losses = task_losses(model(batch["image"]), batch, tasks)
    assert losses[0] == 0 and losses[1] > 0
    losses.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.task_parameters(target))
    assert any(p.grad is not None and p.grad.any() for p in model.task_parameters(other))


# ---------------------------------------------------------------- gradients and projection


def test_per_sample_gradients_match_one_sample_at_a_time(tiny):
    bundle, tasks, original = tiny[0], tiny[1], tiny[4]
    batch = bundle.train.__getitems__([0, 1, 2])
    weights = {t.name: torch.tensor([1.0, 0.5, 0.0]) for t in tasks}
    names = [n for n, _ in original.named_parameters()]
    grads = per_sample_gradients(original, batch["image"], batch["targets"], weights, tasks, names)
    for i in range(3):
        original.zero_grad()
        out = original(batch["image"][i : i + 1])
        loss = sum(
            weights[t.name][i] * t.loss(out[t.name], batch["targets"][t.name][i : i + 1]).sum()
            for t in tasks
        )
        loss.backward()
        for n, p in original.named_parameters():
            expected = p.grad if p.grad is not None else torch.zeros_like(p)
            assert torch.allclose(grads[n][i], expected, atol=1e-5), (i, n)
    original.zero_grad()


def test_per_sample_gradients_of_necks_and_heads_run_the_encoder_once_per_batch(tiny, monkeypatch):
    bundle, tasks, original = tiny[0], tiny[1], tiny[4]
    batch = bundle.train.__getitems__([0, 1, 2, 3])
    weights = {t.name: torch.tensor([1.0, 0.5, 0.0, 2.0]) for t in tasks}
    names = [n for n, _ in original.named_parameters()]
    late = [n for n in names if not n.startswith("encoder.")]
    whole = per_sample_gradients(original, batch["image"], batch["targets"], weights, tasks, names)
    calls = []
    real = type(original.encoder).forward

    def counted(self, x):
        calls.append(x.shape)
        return real(self, x)

    monkeypatch.setattr(type(original.encoder), "forward", counted)
    split = per_sample_gradients(original, batch["image"], batch["targets"], weights, tasks, late)
    assert calls == [batch["image"].shape]  # one batched encoder pass, no per-sample one
    assert set(split) == set(late)
    for n in late:
        torch.testing.assert_close(split[n], whole[n], rtol=1e-5, atol=1e-6)


def test_per_sample_task_gradients_match_the_per_task_per_sample_gradients(tiny):
    bundle, tasks, original = tiny[0], tiny[1], tiny[4]
    batch = bundle.train.__getitems__([0, 1, 2, 3])
    names = ["neck.2.weight", "neck.2.bias", "encoder.features.0.weight"]
    names = [n for n in names if n in dict(original.named_parameters())]
    assert len(names) >= 2
    joint = per_sample_task_gradients(original, batch["image"], batch["targets"], tasks, names)
    for k, task in enumerate(tasks):
        ones = {task.name: torch.ones(4)}
        alone = per_sample_gradients(
            original, batch["image"], batch["targets"], ones, [task], names
        )
        for n in names:
            torch.testing.assert_close(joint[n][:, k], alone[n], rtol=1e-4, atol=1e-6)


def test_top_directions_keep_rank_or_energy():
    torch.manual_seed(0)
    rows = torch.randn(10, 3) @ torch.randn(3, 50)  # rank 3
    basis = top_directions(rows, rank=8)
    assert basis.shape == (50, 3)  # never more than the rank
    assert torch.allclose(basis.T @ basis, torch.eye(3), atol=1e-4)
    assert top_directions(rows, energy=0.01).shape[1] == 1
    residual = rows - (rows @ basis) @ basis.T
    assert residual.abs().max() < 1e-3


def test_task_bases_built_in_groups_under_a_memory_bound_equal_the_bases_built_at_once(tiny):
    bundle, tasks, original = tiny[0], tiny[1], tiny[4]
    request = random_request(bundle.train.ids, tasks, 0.1, [tasks[0].name], seed=0)
    shared = shared_parameter_names(original, "neck")  # the default projected layers: quick
    sizes = [dict(original.named_parameters())[n].numel() for n in shared]
    one_task_mb = 8 * sum(sizes) * 4 / 2**20
    groups = task_groups(tasks, 8, sizes, memory_mb=one_task_mb * 1.5)
    assert [len(g) for g in groups] == [1] * len(tasks)  # 1.5 tasks' worth: one at a time
    assert [len(g) for g in task_groups(tasks, 8, sizes, memory_mb=0)] == [len(tasks)]
    at_once = task_subspaces(original, bundle.train, request, tasks, shared, 3, None, 8, seed=0)
    grouped = task_subspaces(
        original, bundle.train, request, tasks, shared, 3, None, 8, seed=0,
        memory_mb=one_task_mb * 1.5,
    )  # fmt: skip
    assert grouped.keys() == at_once.keys()
    for task in at_once:
        for name in shared:
            a, b = at_once[task][name], grouped[task][name]
            assert a.shape == b.shape
            # the same subspace (each direction's sign may differ): equal projectors
            torch.testing.assert_close(a @ a.T, b @ b.T, rtol=1e-4, atol=1e-5)


def test_projected_update_is_orthogonal_to_retain_gradients_and_protected_subspaces(tiny):
    bundle, tasks, original = tiny[0], tiny[1], tiny[4]
    request = random_request(bundle.train.ids, tasks, 0.1, [tasks[0].name], seed=0)
    shared = shared_parameter_names(original)
    bases = task_subspaces(original, bundle.train, request, tasks, shared, 3, None, 16, seed=0)
    batch = bundle.train.__getitems__(list(range(20, 28)))
    weights = {t.name: torch.ones(8) for t in tasks}
    retain = per_sample_gradients(
        original, batch["image"], batch["targets"], weights, tasks, shared
    )
    target = tasks[0].name
    for name in shared:
        projector = JointProjector({k: bases[k][name] for k in bases})
        projector.set_retain(retain[name].flatten(1))
        gradient = torch.randn_like(retain[name][0])
        projected = projector.project(gradient, target).flatten()
        scale = gradient.norm()
        assert (retain[name].flatten(1) @ projected).abs().max() <= 1e-3 * scale * retain[
            name
        ].flatten(1).norm(dim=1).max().clamp_min(1e-12)
        for other in tasks[1:]:
            assert (bases[other.name][name].T @ projected).abs().max() <= 1e-3 * scale, name
        own = bases[target][name].T @ projected  # the target's own directions are not removed
        assert projected.norm() > 0 or own.numel() == 0


def test_the_batched_weighted_gradient_is_the_sum_of_the_per_sample_gradients(tiny):
    bundle, tasks, original = tiny[0], tiny[1], tiny[4]
    batch = bundle.train.__getitems__(list(range(10)))
    generator = torch.Generator().manual_seed(0)
    weights = {t.name: torch.rand(10, generator=generator) for t in tasks[:3]}
    weights[tasks[0].name][:4] = 0  # withdrawn pairs
    params = dict(original.named_parameters())
    summed = weighted_loss_gradient(
        original, batch["image"], batch["targets"], weights, tasks, params
    )
    per_sample = per_sample_gradients(
        original, batch["image"], batch["targets"], weights, tasks, list(params)
    )
    assert summed.keys() == per_sample.keys()
    for name, gradient in summed.items():
        torch.testing.assert_close(gradient, per_sample[name].sum(0), rtol=1e-4, atol=1e-6)
    head = f"heads.{tasks[3].name}.weight"  # a task without weights gets no gradient
    assert not summed[head].any() and summed[f"heads.{tasks[0].name}.weight"].any()


def test_projecting_all_target_tasks_at_once_equals_projecting_each(tiny):
    bundle, tasks, original = tiny[0], tiny[1], tiny[4]
    request = random_request(bundle.train.ids, tasks, 0.1, seed=0)
    shared = shared_parameter_names(original, "neck")
    bases = task_subspaces(original, bundle.train, request, tasks, shared, 2, None, 16, seed=0)
    batch = bundle.train.__getitems__(list(range(20, 26)))
    weights = {t.name: torch.ones(6) for t in tasks}
    retain = per_sample_gradients(
        original, batch["image"], batch["targets"], weights, tasks, shared
    )
    generator = torch.Generator().manual_seed(0)
    for name in shared:
        projector = JointProjector({k: bases[k][name] for k in bases})
        projector.set_retain(retain[name].flatten(1))
        shape = retain[name][0].shape
        gradients = {t.name: torch.randn(shape, generator=generator) for t in tasks}
        projector.project = None  # the batched path must not fall back to one task at a time
        together = projector.project_many(gradients)
        del projector.project
        assert list(together) == list(gradients)
        rows = retain[name].flatten(1)
        for task, gradient in gradients.items():
            alone = projector.project(gradient, task)
            scale = float(gradient.abs().max())
            assert together[task].shape == shape
            # float32 in another order; the small systems can amplify rounding 1e3-fold
            torch.testing.assert_close(together[task], alone, rtol=0, atol=1e-3 * scale)
            flat = together[task].flatten()  # and it has the property that defines it
            assert (rows @ flat).abs().max() <= 1e-3 * scale * rows.norm(dim=1).max()
            for other in tasks:
                if other.name != task:
                    assert (bases[other.name][name].T @ flat).abs().max() <= 1e-3 * scale
            assert (flat - gradient.flatten()).norm() > 1e-2 * gradient.norm()  # ~14 directions


# ---------------------------------------------------------------- methods


ALL_METHODS = [
    "retrain", "finetune", "gradient_ascent", "neggrad_plus", "interference_aware", "l1_sparse",
    "salun", "scrub", "projected_gradient", "orthogonalisation_only",
]  # fmt: skip


@pytest.mark.parametrize("name", ALL_METHODS)
def test_every_method_returns_a_new_model_and_its_cost(tiny, name):
    bundle, tasks, original = tiny[0], tiny[1], tiny[4]
    before = {k: v.clone() for k, v in original.state_dict().items()}
    request = random_request(bundle.train.ids, tasks, 0.1, seed=0)
    options = {"epochs": 1} if name in ("retrain", "finetune") else {"steps": 2}
    result = run_method(name, original, request, _data(tiny), options)
    assert result.model is not original and result.log["sample_passes"] > 0
    assert result.log["seconds"] > 0 and result.log["options"][
        "epochs" if "epochs" in options else "steps"
    ] in (1, 2)
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in before.items())
    changed = any(
        not torch.equal(p, q)
        for p, q in zip(result.model.parameters(), original.parameters(), strict=True)
    )
    assert changed


def test_method_names_and_options_are_checked(tiny):
    bundle, tasks, original = tiny[0], tiny[1], tiny[4]
    request = random_request(bundle.train.ids, tasks, 0.1, seed=0)
    with pytest.raises(ConfigError, match="unknown unlearning method 'scrubby'"):
        run_method("scrubby", original, request, _data(tiny))
    with pytest.raises(ConfigError, match=r"unknown option.*rnak"):
        run_method("interference_aware", original, request, _data(tiny), {"rnak": 2})
    with pytest.raises(ConfigError, match="option lr must be float, got '7e-4'"):
        run_method("neggrad_plus", original, request, _data(tiny), {"lr": "7e-4"})
    from raymtl.unlearn.__main__ import scalar

    assert [scalar(v) for v in ("7e-4", "3", "false", "neck")] == [7e-4, 3, False, "neck"]
    with pytest.raises(ConfigError, match="alpha"):
        run_method("neggrad_plus", original, request, _data(tiny), {"alpha": 2.0})
    with pytest.raises(ConfigError, match="basis_memory_mb >= 0"):
        run_method("interference_aware", original, request, _data(tiny), {"basis_memory_mb": -1.0})
    assert {"retrain", "finetune", "gradient_ascent", "neggrad_plus", "interference_aware"} <= set(
        UNLEARN_METHODS.names()
    )


def test_per_task_gradients_in_one_batched_pass_match_one_backward_per_task(tiny):
    bundle, tasks, _, _, original, _ = tiny
    model = copy.deepcopy(original)
    params = dict(model.named_parameters())
    batch = bundle.train.__getitems__(list(range(16)))
    outputs = model(batch["image"])
    terms = {t.name: t.loss(outputs[t.name], batch["targets"][t.name]).mean() for t in tasks[:3]}
    shared = shared_parameter_names(model)
    heads = {t.name: [n for n in params if n.startswith(f"heads.{t.name}.")] for t in tasks}
    batched = per_task_gradients(terms, params, shared, heads)
    assert list(batched) == list(terms)
    for task, term in terms.items():
        names = shared + heads[task]
        expected = torch.autograd.grad(term, [params[n] for n in names], retain_graph=True)
        assert set(batched[task]) == set(names)  # its own head, never another task's
        for n, g in zip(names, expected, strict=True):
            torch.testing.assert_close(batched[task][n], g, rtol=1e-4, atol=1e-6)


def test_ours_never_sends_the_forget_signal_to_non_target_heads(tiny):
    bundle, tasks, original = tiny[0], tiny[1], tiny[4]
    target = tasks[0].name
    request = random_request(bundle.train.ids, tasks, 0.2, [target], seed=0)
    result = run_method(
        "interference_aware", original, request, _data(tiny),
        {"steps": 3, "alpha": 0.0, "objective": "ascent", "lr": 0.1},
    )  # fmt: skip
    model = result.model
    for task in tasks[1:]:
        for p, q in zip(
            model.task_parameters(task.name), original.task_parameters(task.name), strict=True
        ):
            assert torch.equal(p, q), task.name
    assert any(
        not torch.equal(p, q)
        for p, q in zip(
            model.task_parameters(target), original.task_parameters(target), strict=True
        )
    )


def test_ours_takes_per_sample_retain_gradients_only_where_a_forget_gradient_needs_them(
    tiny, monkeypatch
):
    import raymtl.unlearn.interference as ours

    bundle, tasks, original = tiny[0], tiny[1], tiny[4]
    request = random_request(bundle.train.ids, tasks, 0.1, seed=0)
    options = {"steps": 8, "lr": 0.1, "task_projection": False}
    calls = {"n": 0}
    real = ours.per_sample_gradients

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ours, "per_sample_gradients", counted)
    result = run_method("interference_aware", original, request, _data(tiny), options)
    idle = result.log["steps_without_forget_signal"]
    assert 0 < idle < options["steps"]  # both kinds of step were taken
    assert calls["n"] == options["steps"] - idle

    calls["n"] = 0
    plain = {**options, "instance_orthogonal": False, "objective": "ascent", "optimizer": "sgd"}
    result = run_method("interference_aware", original, request, _data(tiny), plain)
    assert calls["n"] == 0  # nothing to orthogonalise: no per-sample gradients at all

    # The retain gradient then comes from one batched backward pass: the same step as the sum
    # of the per-sample gradients it replaces.
    def summed_per_sample(model, images, targets, weights, tasks_, params):
        grads = real(model, images, targets, weights, tasks_, list(params))
        return {n: g.sum(0) for n, g in grads.items()}

    monkeypatch.setattr(ours, "weighted_loss_gradient", summed_per_sample)
    reference = run_method("interference_aware", original, request, _data(tiny), plain)
    for p, q in zip(result.model.parameters(), reference.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_ours_orthogonalises_only_the_instance_layers_it_is_given(tiny, monkeypatch):
    import raymtl.unlearn.interference as ours

    bundle, tasks, original = tiny[0], tiny[1], tiny[4]
    request = random_request(bundle.train.ids, tasks, 0.1, seed=0)
    options = {"steps": 3, "lr": 0.01, "objective": "ascent", "task_projection": False}
    asked = []
    real = ours.per_sample_gradients

    def recorded(model, images, targets, weights, tasks_, names):
        asked.append(list(names))
        return real(model, images, targets, weights, tasks_, names)

    monkeypatch.setattr(ours, "per_sample_gradients", recorded)
    data = _data(tiny)
    late = run_method(
        "interference_aware", original, request, data, {**options, "instance_layers": "neck,heads"}
    )
    assert asked and all(
        n.startswith(("neck.", "heads.")) for names in asked for n in names
    )  # the encoder's update is not orthogonalised, so it needs no per-sample gradients
    assert (
        late.log["sample_passes"]
        > run_method("interference_aware", original, request, data, options).log["sample_passes"]
    )  # its retain gradient takes one more batched pass
    # Every layer named is the default (every parameter), step for step.
    everything = run_method(
        "interference_aware", original, request, data,
        {**options, "instance_layers": "encoder,neck,heads"},
    )  # fmt: skip
    default = run_method("interference_aware", original, request, data, options)
    for p, q in zip(everything.model.parameters(), default.model.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    changed = any(
        not torch.allclose(p, q)
        for p, q in zip(late.model.parameters(), default.model.parameters(), strict=True)
    )
    assert changed  # the encoder's forget update is no longer orthogonalised
    with pytest.raises(ConfigError, match="instance_layers='nothing'"):
        run_method("interference_aware", original, request, data, {"instance_layers": "nothing"})


def test_dense_tasks_unlearn_with_the_bounded_objective():
    bundle = build_dataset("synthetic_dense", n_train=24, n_test=8, image_size=16)
    config = TrainConfig(epochs=1, batch_size=8, device="cpu")

    def make(t):
        return create_model("small_cnn", t, 3, 16, width=8)

    original = fit(make(bundle.tasks), bundle.train, None, bundle.tasks, config).model.eval()
    losses = evaluate(original, bundle.test, bundle.tasks)["loss"]
    data = UnlearnData(bundle.train, bundle.tasks, make, config, losses)
    request = random_request(bundle.train.ids, bundle.tasks, 0.2, ["depth"], seed=0)
    for objective in ("bounded", "uninformed"):
        result = run_method(
            "interference_aware", original, request, data,
            {"steps": 2, "objective": objective, "forget_batch": 4, "retain_batch": 4, "basis_samples": 4},
        )  # fmt: skip
        assert all(torch.isfinite(p).all() for p in result.model.parameters())


# ---------------------------------------------------------------- metrics


def test_uis_follows_its_definition_for_target_and_non_target_tasks(tiny):
    tasks = tiny[1]
    request = request_from_pairs([(int(tiny[0].train.ids[0]), "large")], tasks, tiny[0].train.ids)
    original = ModelReport(
        test={"large": 0.8, "left": 0.5}, forget={"large": 1.0, "left": 0.9}, retain={}
    )
    unlearned = ModelReport(
        test={"large": 0.7, "left": 0.5}, forget={"large": 0.8, "left": 0.6}, retain={}
    )
    scores = uis(original, unlearned, request)
    assert scores["large"] == pytest.approx(0.5 * (0.1 / 0.8 + 0.0 / 0.8))  # target
    assert scores["left"] == pytest.approx(0.5 * (0.0 + 0.3 / 0.9))  # non-target
    assert retrain_distance(unlearned, unlearned) == {"large": 0.0, "left": 0.0}
    assert membership_auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert membership_auc(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.5


# ---------------------------------------------------------------- the command


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "raymtl.unlearn", *map(str, args)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_unlearn_command_writes_the_comparison(tmp_path):
    run = tmp_path / "run"
    proc = _run(
        "--n-train", 96, "--n-test", 32, "--image-size", 16, "--epochs", 1,
        "--methods", "retrain,gradient_ascent,interference_aware@no_projection",
        "--method-option", "interference_aware@no_projection.task_projection=false",
        "--method-option", "interference_aware@no_projection.steps=2",
        "--method-option", "gradient_ascent.steps=2",
        "--forget-tasks", "large,left", "--run-dir", run,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = (run / "summary.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in summary[1:]] == [
        "original", "retrain", "gradient_ascent", "interference_aware@no_projection"
    ]  # fmt: skip
    per_task = (run / "per_task.csv").read_text().splitlines()
    assert len(per_task) == 1 + 4 * 14
    assert "partial-task request" in proc.stdout
    assert (run / "request.csv").read_text().startswith("id,task\n")
    assert any((run / "tensorboard").iterdir()) and (run / "original.pt").is_file()
    assert (run / "uis_vs_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the tuned defaults of the synthetic set apply; explicit options win over them
    methods = yaml.safe_load((run / "config.yaml").read_text())["methods"]
    tuned = tuned_options("gradient_ascent", "synthetic", "partial")
    assert tuned and methods["gradient_ascent"] == {
        **default_options("gradient_ascent"), **tuned, "steps": 2
    }  # fmt: skip


def test_unlearn_command_rejects_bad_input_in_one_line(tmp_path, run_command):
    bad = tmp_path / "request.csv"
    bad.write_text("id,task\n99999,large\n")
    cases = [
        (["--methods", "retrain,magic"], "unknown unlearning method 'magic'"),
        (["--request", bad], "row 1: id 99999 is not in the training split"),
        (["--method-option", "retrain.speed=3", "--methods", "retrain"], "has no option 'speed'"),
        (["--forget-tasks", "nope"], "unknown task(s) nope"),
    ]
    for extra, message in cases:
        run = tmp_path / f"run{len(message)}"
        proc = run_command(
            "raymtl.unlearn", "--n-train", 32, "--n-test", 8, "--image-size", 16, "--run-dir", run,
            *extra,
        )  # fmt: skip
        assert proc.returncode == 2, (extra, proc.stderr)
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not run.exists()


# ---------------------------------------------------------------- the baselines' defining properties


def test_salun_updates_only_its_salient_weights(tiny):
    from raymtl.unlearn.base import batch_to, clone_for_unlearning, endless, forget_split
    from raymtl.unlearn.salun import saliency_mask

    bundle, tasks, original = tiny[0], tiny[1], tiny[4]
    request = random_request(bundle.train.ids, tasks, 0.1, seed=0)
    data = _data(tiny)
    split = forget_split(bundle.train, request)
    probe = clone_for_unlearning(original, torch.device("cpu"))
    first = [batch_to(next(endless(split, len(split), data.seed)), torch.device("cpu"))]
    mask = saliency_mask(probe, first, tasks, 0.1)
    total = sum(m.numel() for m in mask.values())
    assert 0.09 * total <= sum(float(m.sum()) for m in mask.values()) <= 0.11 * total
    result = run_method("salun", original, request, data, {"steps": 3, "fraction": 0.1, "lr": 1e-2})
    after = dict(result.model.named_parameters())
    changed = 0
    for name, param in original.named_parameters():
        moved = after[name].detach() != param.detach()
        assert not (moved & (mask[name] == 0)).any(), name  # nothing outside the mask moves
        changed += int(moved.sum())
    assert changed > 0


def test_l1_sparse_lowers_the_weights_l1_norm_more_than_plain_fine_tuning(tiny):
    bundle, tasks, original = tiny[0], tiny[1], tiny[4]
    request = random_request(bundle.train.ids, tasks, 0.1, seed=0)
    options = {"steps": 10, "lr": 1e-3}
    sparse = run_method("l1_sparse", original, request, _data(tiny), {**options, "gamma": 1e-2})
    plain = run_method("l1_sparse", original, request, _data(tiny), {**options, "gamma": 0.0})
    before = float(sum(p.detach().abs().sum() for p in original.parameters()))
    assert sparse.log["l1_norm"] < plain.log["l1_norm"] and sparse.log["l1_norm"] < before


def test_scrub_moves_the_student_away_from_the_teacher_on_forget_data():
    from raymtl.unlearn.base import forget_split
    from raymtl.unlearn.scrub import task_distance

    # A tiny original that memorises its 48 training images, so forget and retain data differ.
    bundle = build_dataset("synthetic", n_train=48, n_test=16, image_size=16)
    tasks = bundle.tasks[:4]
    config = TrainConfig(epochs=40, batch_size=16, device="cpu")

    def make(t):
        return create_model("small_cnn", t, 3, 16, width=16)

    original = fit(make(tasks), bundle.train, None, tasks, config).model.eval()
    data = UnlearnData(
        bundle.train, tasks, make, config, evaluate(original, bundle.test, tasks)["loss"]
    )
    request = random_request(bundle.train.ids, tasks, 0.25, seed=0)
    options = {"steps": 20, "max_steps": 20, "lr": 2e-3, "forget_batch": 12, "retain_batch": 36}
    result = run_method("scrub", original, request, data, options)
    forget = forget_split(bundle.train, request).split
    keep = ~torch.isin(bundle.train.ids, torch.from_numpy(request.forget_ids))
    retain = bundle.train.subset(torch.nonzero(keep).flatten())
    with torch.no_grad():
        distances = []
        for split in (forget, retain):
            batch = split.__getitems__(list(range(len(split))))
            student, teacher = result.model(batch["image"]), original(batch["image"])
            distances.append(float(task_distance(tasks, student, teacher, batch, None)))
    assert distances[0] > 1.5 * distances[1], distances


def test_calibrated_attack_finds_members_only_when_they_differ():
    from raymtl.unlearn.evaluation import calibrated_mia

    generator = torch.Generator().manual_seed(0)

    def draw(n, shift):
        return torch.randn(n, 3, generator=generator, dtype=torch.float64) + shift

    auc, low, high = calibrated_mia(draw(200, 2.0), draw(200, 0.0), draw(200, 2.0), draw(200, 0.0))
    assert auc > 0.9 and low <= auc <= high
    auc, low, high = calibrated_mia(draw(200, 0.0), draw(200, 0.0), draw(200, 1.0), draw(200, 0.0))
    assert 0.4 < auc < 0.6 and low < 0.5 < high


@pytest.mark.parametrize("name", ["utkface", "nyuv2"])
def test_unlearning_runs_on_real_format_files(tmp_path, name):
    from raymtl.data.fake import write_nyuv2, write_utkface
    from raymtl.unlearn.__main__ import main

    root = (
        write_utkface(tmp_path / "data", 40, size=40)
        if name == "utkface"
        else write_nyuv2(tmp_path / "data", 24, 8)
    )
    run = tmp_path / "run"
    status = main(
        ["--dataset", name, "--data-root", str(root), "--epochs", "1", "--batch-size", "8",
         "--forget-fraction", "0.1", "--methods", "retrain,interference_aware",
         "--method-option", "interference_aware.steps=2", "--run-dir", str(run)]
    )  # fmt: skip
    assert status == 0
    rows = (run / "summary.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["original", "retrain", "interference_aware"]


# ---------------------------------------------------------------- tuned defaults


def test_tuned_defaults_cover_every_tuned_method_and_resolve_with_explicit_options_first(
    tmp_path, benchmark_script
):
    shipped = load_tuned_defaults()
    tune = benchmark_script("unlearn_tune")
    grids = tune.GRIDS
    for dataset in ("synthetic", "synthetic_dense"):
        for setting in ("full", "partial"):
            assert set(shipped[dataset][setting]) == set(grids), (dataset, setting)
            for method, options in shipped[dataset][setting].items():
                fixed = tune.FIXED.get((method, dataset, setting), {})
                assert set(options) == set(grids[method]) | set(fixed)
                assert {k: options[k] for k in fixed} == fixed  # the cost choices, as fixed
                assert set(options) <= set(default_options(method))
    path = tmp_path / "tuned.yaml"
    path.write_text(
        "synthetic:\n  full:\n    interference_aware: {lr: 0.002, alpha: 0.3}\n"
        "    scrub: {lr: 0.001}\n"
    )
    methods = {"scrub": {"lr": 0.5}, "interference_aware@fast": {"steps": 3},
               "projected_gradient": {}, "finetune": {}}  # fmt: skip
    resolved = resolve_method_options(methods, "synthetic", "full", path)
    assert resolved == {
        "scrub": {"lr": 0.5},  # explicit wins
        "interference_aware@fast": {"lr": 0.002, "alpha": 0.3, "steps": 3},  # NAME@LABEL: NAME's
        "projected_gradient": {"lr": 0.002, "alpha": 0.3},  # an ablation inherits ours'
        "finetune": {},  # nothing tuned: signature defaults
    }
    assert resolve_method_options(methods, "synthetic", "partial", path)["scrub"] == {"lr": 0.5}
    assert tuned_options("scrub", "celeba", "full", path) == {}
    with pytest.raises(ConfigError, match="setting must be one of"):
        tuned_options("scrub", "synthetic", "both", path)
    for text, message in [("a: [1", "not valid YAML"), ("synthetic: {most: {}}", "settings among")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message) as err:
            load_tuned_defaults(path)
        assert str(path) in str(err.value)
    assert load_tuned_defaults(tmp_path / "absent.yaml") == {}


def test_tuning_picks_each_methods_lowest_uis_point_and_merges_the_file(
    tmp_path, benchmark_script, monkeypatch
):
    tune = benchmark_script("unlearn_tune")
    assert tune.grid_points({"lr": [1, 2], "steps": [3]}) == [
        {"lr": 1, "steps": 3}, {"lr": 2, "steps": 3}
    ]  # fmt: skip
    rows = [{"method": "original", "uis_mean": 0.0}, {"method": "a@0", "uis_mean": 0.3},
            {"method": "a@1", "uis_mean": 0.1}, {"method": "b@0", "uis_mean": 0.2}]  # fmt: skip
    assert tune.best_points(rows) == {"a": (1, 0.1), "b": (0, 0.2)}
    path = tmp_path / "tuned.yaml"
    path.write_text("celeba:\n  full:\n    scrub: {lr: 0.001}\n")
    # A fixed cost choice rides along with every grid point and is written with the winner.
    monkeypatch.setitem(tune.GRIDS, "finetune", {"lr": [3e-4, 1e-3, 3e-3]})
    monkeypatch.setattr(tune, "FIXED", {("finetune", "synthetic", "full"): {"epochs": 2}})
    tuned = tune.main(
        ["--datasets", "synthetic", "--settings", "full", "--methods", "finetune",
         "--scale", "0.02", "--epochs", "1", "--requests", "2", "--write", str(path),
         "--out", str(tmp_path / "out")]
    )  # fmt: skip
    chosen = tuned["synthetic"]["full"]["finetune"]
    assert chosen["epochs"] == 2 and {"lr": chosen["lr"]} in tune.grid_points(
        tune.GRIDS["finetune"]
    )
    assert load_tuned_defaults(path) == {
        "celeba": {"full": {"scrub": {"lr": 0.001}}},  # entries of other data sets stay
        "synthetic": {"full": {"finetune": chosen}},
    }
    lines = (tmp_path / "out" / "synthetic-full.txt").read_text().splitlines()
    assert len(lines) == 3 and all(" ± " in line for line in lines)  # mean over 2 requests
    assert all("'epochs': 2" in line for line in lines)


def test_average_rows_means_each_numeric_column_and_spreads_the_chosen_ones():
    first = [{"method": "a", "uis_mean": 0.1, "seconds": float("nan")},
             {"method": "b", "uis_mean": 0.4, "seconds": 2.0}]  # fmt: skip
    second = [{"method": "a", "uis_mean": 0.3, "seconds": 1.0},
              {"method": "b", "uis_mean": 0.2, "seconds": 4.0}]  # fmt: skip
    rows = average_rows([first, second], ("method",), spread=("uis_mean",))
    assert [r["method"] for r in rows] == ["a", "b"]
    assert rows[0]["uis_mean"] == pytest.approx(0.2)
    assert rows[0]["uis_mean_sd"] == pytest.approx(0.1414214, rel=1e-5)
    assert rows[0]["seconds"] == 1.0  # a NaN is skipped, not propagated
    assert rows[1]["seconds"] == 3.0 and "seconds_sd" not in rows[1]
    assert rows[1]["runs"] == 2


def test_unlearn_table_without_a_baseline_says_so(tmp_path, benchmark_script):
    """--methods retrain (ours is always added): the verdict names the missing rival."""
    verdicts = benchmark_script("unlearn_table").main(
        ["--datasets", "synthetic", "--settings", "full", "--methods", "retrain",
         "--scale", "0.04", "--epochs", "1", "--out", str(tmp_path / "t")]
    )  # fmt: skip
    assert "no baseline run" in verdicts[2]


def test_unlearn_table_averages_several_requests(tmp_path, benchmark_script):
    out = tmp_path / "table"
    verdicts = benchmark_script("unlearn_table").main(
        ["--datasets", "synthetic", "--settings", "partial", "--requests", "2",
         "--methods", "gradient_ascent,finetune", "--scale", "0.06", "--epochs", "1",
         "--out", str(out)]
    )  # fmt: skip
    folder = out / "synthetic-partial"
    with pytest.raises(SystemExit):  # an unknown method name is refused before any work
        benchmark_script("unlearn_table").main(["--methods", "magic", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()

    def ours(path):
        rows = list(csv.DictReader(path.open()))
        return next(r for r in rows if r["method"] == "interference_aware")

    each = [float(ours(folder / f"request-{s}" / "summary.csv")["uis_mean"]) for s in (0, 1)]
    assert each[0] != each[1]  # two different requests
    averaged = ours(folder / "summary.csv")
    assert float(averaged["uis_mean"]) == pytest.approx(sum(each) / 2)
    assert float(averaged["uis_mean_sd"]) == pytest.approx(abs(each[0] - each[1]) / 2**0.5)
    assert averaged["runs"] == "2"
    assert (folder / "uis_vs_cost.png").stat().st_size > 0
    assert len(verdicts) == 3 and "/2 |" in verdicts[2]
    assert (out / "verdict.md").read_text().splitlines() == verdicts
    cells = [c.strip() for c in verdicts[2].strip("|").split("|")]
    rival = cells[3]

    def uis(seed, method):
        rows = csv.DictReader((folder / f"request-{seed}" / "summary.csv").open())
        return float(next(r for r in rows if r["method"] == method)["uis_mean"])

    gaps = [uis(s, rival) - uis(s, "interference_aware") for s in (0, 1)]
    error = abs(gaps[0] - gaps[1]) / 2**0.5 / 2**0.5  # sd of two values over sqrt(2)
    below = sum(g > 0 for g in gaps)
    assert cells[7] == f"{sum(gaps) / 2:+.4f} ± {error:.4f} ({below}/2)"
