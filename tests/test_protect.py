"""Protection: δ bounds, δ keyed by sample id, resuming, regularisers, bad input."""

import json
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from raymtl.data import build_dataset
from raymtl.engine import make_loader
from raymtl.errors import ConfigError
from raymtl.protect import (
    PerturbationStore,
    ProtectConfig,
    SurrogateConfig,
    protect,
    protect_split,
    write_store,
)
from raymtl.protect.bases import target_labels
from raymtl.protect.generator import MTLUEGenerator, inter_task_loss, intra_task_loss
from raymtl.protect.store import apply_integer_deltas, quantise_delta
from raymtl.tasks import TaskSpec

TINY_SURROGATE = SurrogateConfig(clean_epochs=1, sep_checkpoints=2, batch_size=64)


@pytest.fixture(scope="module")
def tiny():
    return build_dataset("synthetic", n_train=160, n_test=32, image_size=16)


def _config(**kw):
    settings = {
        "epochs": 2,
        "width": 8,
        "pgd_steps": 2,
        "batch_size": 64,
        "surrogate": TINY_SURROGATE,
    }
    return ProtectConfig(**{**settings, **kw})


def _module(name, *args):
    """Run ``python -m <name> args``; the finished process (checked for success)."""
    proc = subprocess.run(
        [sys.executable, "-m", name, *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def _assert_delta_follows_labels(deltas, label_rows):
    """Rows with equal label tuples carry equal δ; returns the number of distinct tuples."""
    first = {}
    for row, key in enumerate(map(tuple, label_rows)):
        if key in first:
            assert np.array_equal(deltas[row], deltas[first[key]])
        first.setdefault(key, row)
    return len(first)


@pytest.mark.parametrize(
    ("method", "base"),
    [("mtlue", "em"), ("mtlue", "tap"), ("mtlue", "sep"), ("pgd", "em"), ("pgd", "tap")],
)
def test_stored_deltas_respect_epsilon_and_pixels_stay_in_range(tiny, tmp_path, method, base):
    epsilon = 8 / 255
    result = protect(
        tiny.train,
        tiny.tasks,
        3,
        16,
        _config(method=method, base=base, epsilon=epsilon),
        progress=False,
    )
    assert result.deltas.dtype == np.int8 and result.deltas.shape == tuple(tiny.train.images.shape)
    assert np.abs(result.deltas).max() <= 8
    assert np.abs(result.deltas).max() > 0
    write_store(tmp_path / "s", result.ids, result.deltas, {"method": method})
    protected = protect_split(tiny.train, PerturbationStore(tmp_path / "s"))
    change = protected.images.short() - tiny.train.images.short()
    assert change.abs().max() <= 8
    assert protected.images.dtype == torch.uint8


def test_quantisation_never_exceeds_epsilon_and_clipping_by_hand():
    assert np.abs(quantise_delta(torch.tensor([0.9, -0.9, 8.4 / 255]), 8.5 / 255)).max() == 8
    images = torch.tensor([[[[250, 3, 100]]]], dtype=torch.uint8)
    deltas = np.array([[[[8, -8, -5]]]], dtype=np.int8)
    assert apply_integer_deltas(images, deltas).tolist() == [[[[255, 0, 95]]]]


def test_perturbations_follow_the_sample_id_not_the_position(tiny, tmp_path):
    rng = np.random.default_rng(0)
    ids = tiny.train.ids.numpy()
    deltas = rng.integers(-8, 9, size=tiny.train.images.shape).astype(np.int8)
    permutation = rng.permutation(len(ids))
    write_store(tmp_path / "s", ids[permutation], deltas[permutation], {}, shard_size=50)
    store = PerturbationStore(tmp_path / "s")
    protected = protect_split(tiny.train, store)
    expected = {
        int(i): apply_integer_deltas(tiny.train.images[p : p + 1], deltas[p : p + 1])[0]
        for p, i in enumerate(ids)
    }
    for position, sample_id in enumerate(protected.ids.tolist()):
        assert torch.equal(protected.images[position], expected[sample_id])
    reordered = protect_split(tiny.train.subset(torch.tensor(permutation)), store)
    for position, sample_id in enumerate(reordered.ids.tolist()):
        assert torch.equal(reordered.images[position], expected[sample_id])
    for workers in (0, 2):
        for batch in make_loader(protected, 32, shuffle=True, seed=5, num_workers=workers):
            for row, sample_id in enumerate(batch["id"].tolist()):
                assert torch.equal(
                    (batch["image"][row] * 255).round().to(torch.uint8), expected[sample_id]
                )


def test_a_store_that_does_not_match_the_data_set_is_refused(tiny, tmp_path):
    ids = tiny.train.ids.numpy()
    write_store(tmp_path / "other", ids + 1, np.zeros(tiny.train.images.shape, np.int8), {})
    with pytest.raises(
        ConfigError,
        match="store has no perturbation for sample id 0; it does not match this data set",
    ):
        protect_split(tiny.train, PerturbationStore(tmp_path / "other"))
    write_store(tmp_path / "shape", ids, np.zeros((len(ids), 3, 8, 8), np.int8), {})
    with pytest.raises(
        ConfigError,
        match=re.escape("perturbation shape (3, 8, 8) does not match image shape (3, 16, 16)"),
    ):
        protect_split(tiny.train, PerturbationStore(tmp_path / "shape"))
    write_store(tmp_path / "ok", ids, np.zeros(tiny.train.images.shape, np.int8), {}, shard_size=64)
    shard = tmp_path / "ok" / "delta-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x01")
    with pytest.raises(ConfigError, match=re.escape("delta-00001.npy: checksum does not match")):
        PerturbationStore(tmp_path / "ok")


def test_interrupted_generation_resumes_from_its_checkpoint(tiny, tmp_path, monkeypatch):
    import raymtl.protect.bases as bases

    config = _config(method="mtlue", base="tap", epochs=3)
    uninterrupted = protect(tiny.train, tiny.tasks, 3, 16, config, progress=False)
    calls = {"n": 0}
    real = bases.TargetedAdversarialPoisoning.after_epoch

    def interrupt_on_second(self, perturb, train):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, perturb, train)

    monkeypatch.setattr(bases.TargetedAdversarialPoisoning, "after_epoch", interrupt_on_second)
    with pytest.raises(KeyboardInterrupt):
        protect(tiny.train, tiny.tasks, 3, 16, config, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(bases.TargetedAdversarialPoisoning, "after_epoch", real)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["epoch"] == 1
    prepared = {"n": 0}
    real_prepare = bases.TargetedAdversarialPoisoning.prepare
    monkeypatch.setattr(
        bases.TargetedAdversarialPoisoning,
        "prepare",
        lambda self, train: (prepared.__setitem__("n", 1), real_prepare(self, train)),
    )
    resumed = protect(
        tiny.train, tiny.tasks, 3, 16, config, checkpoint_dir=tmp_path, progress=False
    )
    assert prepared["n"] == 0  # the clean model came from the checkpoint, not retrained
    assert [row["epoch"] for row in resumed.log] == [1, 2, 3]
    assert np.array_equal(resumed.deltas, uninterrupted.deltas)
    with pytest.raises(ConfigError, match="checkpoint of another configuration"):
        protect(
            tiny.train,
            tiny.tasks,
            3,
            16,
            _config(method="mtlue", base="tap", epochs=4),
            checkpoint_dir=tmp_path,
            progress=False,
        )


def test_regularisers_on_hand_made_embeddings():
    tasks = [TaskSpec("a", "binary"), TaskSpec("b", "binary")]
    generator = MTLUEGenerator(tasks, 3, 16, 8 / 255, variant="class", width=4)
    e = torch.zeros(16, 8, 8)
    e[0, 0, 0] = 1.0
    f = torch.zeros(16, 8, 8)
    f[1, 0, 0] = 1.0
    with torch.no_grad():
        generator.embeddings["a"].copy_(torch.stack([e, -e]))  # opposite classes: cosine -1
        generator.embeddings["b"].copy_(torch.stack([f, f]))  # identical classes: cosine +1
    # intra: task a -> (-1 + 1) = 0, task b -> (1 + 1) = 2; mean 1. inter: a ⟂ b -> 0.
    assert intra_task_loss(generator).item() == pytest.approx(1.0)
    assert inter_task_loss(generator).item() == pytest.approx(0.0)


def test_generator_variants_and_the_epsilon_clamp():
    tasks = [TaskSpec("a", "binary"), TaskSpec("c", "multiclass", 3)]
    targets = {"a": torch.tensor([0, 1]), "c": torch.tensor([2, 0])}
    for variant in ("sample", "class", "z_only"):
        for bound in ("tanh", "clamp"):
            generator = MTLUEGenerator(tasks, 3, 16, 4 / 255, variant, 4, bound=bound)
            delta = generator(torch.rand(2, 3, 16, 16), targets)
            assert delta.shape == (2, 3, 16, 16) and delta.abs().max() <= 4 / 255 + 1e-7
    class_wise = MTLUEGenerator(tasks, 3, 16, 4 / 255, variant="class", width=4)
    same_labels = {"a": torch.tensor([1, 1]), "c": torch.tensor([0, 0])}
    delta = class_wise(torch.rand(2, 3, 16, 16), same_labels)
    assert torch.allclose(delta[0], delta[1])  # class-wise: δ depends on the labels only


@pytest.mark.parametrize("variant", ["sample", "class", "z_only"])
@pytest.mark.parametrize("unprotected", [(), ("c",)])
def test_the_decoder_mixes_its_input_as_the_concatenation_would(variant, unprotected):
    """The part-by-part 1x1 mix equals the paper's concatenate-then-mix, values and gradients,
    with a dense task's label map and an unprotected task's mean embedding among the parts."""
    tasks = [
        TaskSpec("a", "binary"),
        TaskSpec("c", "multiclass", 3),
        TaskSpec("seg", "segmentation", 4),
    ]
    targets = {
        "a": torch.tensor([0, 1, 1]),
        "c": torch.tensor([2, 0, 2]),
        "seg": torch.randint(0, 4, (3, 16, 16)),
    }
    torch.manual_seed(0)
    generator = MTLUEGenerator(tasks, 3, 16, 4 / 255, variant, 4, unprotected=unprotected)
    images = torch.rand(3, 3, 16, 16)
    mixed = generator.mixed_input(images, targets)
    reference = generator.decoder[0](generator.concatenated_input(images, targets))
    assert mixed.shape == reference.shape == (3, 8, 8, 8)
    assert torch.allclose(mixed, reference, atol=1e-5)
    weights = torch.randn_like(reference)
    params = [p for p in generator.parameters() if p.requires_grad]
    got = torch.autograd.grad((mixed * weights).sum(), params, allow_unused=True)
    want = torch.autograd.grad((reference * weights).sum(), params, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            assert torch.allclose(g, w, atol=1e-4)


def test_the_generator_benchmark_times_both_forms_of_the_same_function(benchmark_script, capsys):
    rows = benchmark_script("generator_mix").main(
        ["--batch-size", "4", "--image-size", "16", "--width", "4", "--steps", "1", "--rounds", "1"]
    )
    assert [r["work"] for r in rows] == ["δ pass (no grad)", "training step"]
    assert all(r["reference_s"] > 0 and r["raymtl_s"] > 0 for r in rows)
    difference = float(re.search(r"largest \|δ difference\|: (\S+)", capsys.readouterr().out)[1])
    assert difference < 1e-6  # the reference (concatenation, InstanceNorm2d) gives the same δ


def test_the_tanh_bound_keeps_every_pixel_trainable_where_the_clamp_does_not():
    tasks = [TaskSpec("a", "binary"), TaskSpec("c", "multiclass", 3)]
    targets = {"a": torch.tensor([0, 1]), "c": torch.tensor([2, 0])}
    trainable = {}
    for bound in ("tanh", "clamp"):
        torch.manual_seed(0)
        generator = MTLUEGenerator(tasks, 3, 16, 4 / 255, "class", 4, bound=bound)
        delta = generator(torch.rand(2, 3, 16, 16), targets)
        (grad,) = torch.autograd.grad(delta.sum(), generator.decoder[-1].weight)
        assert grad.abs().sum() > 0
        trainable[bound] = float((delta.abs() < 4 / 255 - 1e-7).float().mean())
    assert trainable["tanh"] == 1.0
    assert trainable["clamp"] < 0.5  # most pixels saturate at initialisation: zero gradient
    with pytest.raises(ConfigError, match="unknown bound 'sigmoid'"):
        ProtectConfig(bound="sigmoid").validate()


def test_tap_and_sep_share_one_clean_training_run(tiny, monkeypatch):
    import raymtl.protect.bases as bases

    calls = []
    real_fit = bases.fit
    monkeypatch.setattr(bases, "fit", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    monkeypatch.setattr(bases, "_CLEAN_RUNS", {})
    config = SurrogateConfig(clean_epochs=2, sep_checkpoints=2, batch_size=64, seed=3)
    tap = bases.UE_BASES.create("tap", tiny.tasks, 3, 16, config)
    sep = bases.UE_BASES.create("sep", tiny.tasks, 3, 16, config)
    tap.prepare(tiny.train)
    sep.prepare(tiny.train)
    assert len(calls) == 1
    assert len(sep.models) == 2 and tap.models[0] is sep.models[-1]
    other = bases.UE_BASES.create("sep", tiny.tasks, 3, 16, SurrogateConfig(clean_epochs=1))
    other.prepare(tiny.train)
    assert len(calls) == 2  # other settings: another run


@pytest.mark.parametrize(("method", "restarts"), [("mtlue", 0), ("mtlue", 2), ("pgd", 1)])
def test_em_restarts_fit_fresh_surrogates_before_the_stop_rule_ends_generation(
    tiny, method, restarts
):
    every_epoch_fits = replace(TINY_SURROGATE, em_stop_error=1.0, em_restarts=restarts)
    config = _config(method=method, base="em", epochs=5, surrogate=every_epoch_fits)
    result = protect(tiny.train, tiny.tasks, 3, 16, config, progress=False)
    assert len(result.log) == restarts + 1


def test_an_em_restart_replaces_the_surrogate_and_survives_a_checkpoint(tiny):
    import raymtl.protect.bases as bases

    config = replace(TINY_SURROGATE, em_stop_error=1.0, em_restarts=1, em_steps_per_epoch=1)
    em = bases.UE_BASES.create("em", tiny.tasks, 3, 16, config)
    em.prepare(tiny.train)
    first = em.surrogate

    def no_noise(images, targets, ids):
        return torch.zeros_like(images)

    assert em.after_epoch(no_noise, tiny.train) is False  # fitted, but a restart is left
    assert em.surrogate is not first and em.restarts_done == 1
    fresh = [p.detach().clone() for p in em.surrogate.parameters()]
    trained = [p.detach() for p in first.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(fresh, trained, strict=True))
    resumed = bases.UE_BASES.create("em", tiny.tasks, 3, 16, config)
    resumed.prepare_for_resume(tiny.train)
    resumed.load_state_dict(em.state_dict())
    assert resumed.restarts_done == 1
    assert resumed.after_epoch(no_noise, tiny.train) is True  # no restart left: stop
    with pytest.raises(ConfigError, match="surrogate em_restarts must be >= 0, got -1"):
        _config(surrogate=replace(TINY_SURROGATE, em_restarts=-1)).validate()


def test_a_training_surrogate_perturbs_each_drawn_sample_once_and_as_drawn(tiny, monkeypatch):
    import raymtl.protect.bases as bases

    calls = []
    generator = MTLUEGenerator(tiny.tasks, 3, 16, 8 / 255, "sample", 8).eval()

    def perturb(images, targets, ids):
        calls.append(ids.tolist())
        return generator(images, targets)

    config = replace(TINY_SURROGATE, em_steps_per_epoch=6)
    surrogates = []
    for cache_bytes in (bases.DELTA_CACHE_BYTES, 0):  # cached, then batch by batch
        monkeypatch.setattr(bases, "DELTA_CACHE_BYTES", cache_bytes)
        calls.clear()
        em = bases.UE_BASES.create("em", tiny.tasks, 3, 16, config)
        em.prepare(tiny.train)
        em.train_surrogate(perturb, tiny.train, 6)
        surrogates.append(em.surrogate)
        perturbed = [i for ids in calls for i in ids]
        if cache_bytes:  # 6 x 64 draws from 160 samples repeat some: each is perturbed once
            assert len(perturbed) == len(set(perturbed)) < 6 * 64
    assert [len(ids) for ids in calls] == [64] * 6  # no room: each batch perturbed as drawn
    for cached, direct in zip(*(s.parameters() for s in surrogates), strict=True):
        torch.testing.assert_close(cached, direct, rtol=1e-4, atol=1e-6)


def test_the_em_surrogate_benchmark_times_both_ways_of_the_same_training(benchmark_script):
    row = benchmark_script("em_surrogate").main(
        ["--n-train", "64", "--image-size", "16", "--width", "4", "--steps", "2", "--rounds", "1"]
    )
    assert row["per_batch_s"] > 0 and row["once_per_sample_s"] > 0
    assert row["weight_difference"] < 1e-4  # the same batches, the same δ up to rounding


def test_tap_target_labels():
    assert target_labels(TaskSpec("b", "binary"), torch.tensor([0, 1])).tolist() == [1, 0]
    assert target_labels(TaskSpec("m", "multiclass", 5), torch.tensor([0, 3, 4])).tolist() == [
        2,
        0,
        1,
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epsilon", "0"], "epsilon must be in (0, 1]"),
        (["--epsilon", "1.5"], "epsilon must be in (0, 1]"),
        (["--epsilon", "8/0"], "argument --epsilon: expected a number or a fraction like 8/255"),
        (["--lambda2", "-3"], "lambda2 must be >= 0"),
        (["--em-restarts", "-1"], "argument --em-restarts: expected an integer >= 0"),
        (["--base", "lsp"], "unknown base method 'lsp'; available: em, sep, tap"),
        (
            ["--method", "magic"],
            "unknown protection method 'magic'; available: ar, lsp, mtlue, pgd",
        ),
    ],
)
def test_protect_cli_bad_input_is_one_line_status_2_and_writes_nothing(
    tmp_path, run_command, args, message
):
    out = tmp_path / "store"
    proc = run_command("raymtl.protect", "--out", out, *args)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr
    assert not out.exists()


def test_the_table_command_runs_at_a_tiny_size(tmp_path, benchmark_script):
    rows = benchmark_script("mtlue_table").main(
        [
            "--n-train",
            "96",
            "--n-test",
            "32",
            "--image-size",
            "16",
            "--victim-epochs",
            "1",
            "--generator-epochs",
            "1",
            "--samples-per-epoch",
            "64",
            "--width",
            "4",
            "--pgd-steps",
            "1",
            "--pgd-rounds",
            "1",
            "--em-steps-per-epoch",
            "2",
            "--clean-epochs",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert [r["data"] for r in rows] == [
        "clean",
        "EM",
        "TAP",
        "SEP",
        "MTL-UE+EM",
        "MTL-UE+TAP",
        "MTL-UE+SEP",
    ]
    assert (tmp_path / "table.csv").read_text().count("\n") == 8
    assert "MTL-UE+SEP" in (tmp_path / "table.md").read_text()
    for row in rows:  # relabelling can only help an attacker, and never below chance per task
        assert row["mean_relabelled_balanced_accuracy"] >= row["mean_balanced_accuracy"]
    assert "after relabelling" in (tmp_path / "table.md").read_text()


def test_the_table_repeats_cells_over_seeds_and_reports_mean_and_sd(tmp_path, benchmark_script):
    tiny = ["--n-train", "256", "--n-test", "64", "--image-size", "16", "--victim-epochs", "2"]
    rows = benchmark_script("mtlue_table").main(
        [*tiny, "--cells", "clean,LSP", "--seeds", "0,1", "--out", str(tmp_path)]
    )
    lines = (tmp_path / "table.csv").read_text().splitlines()
    assert lines[0].startswith("data,seed,") and len(lines) == 1 + 2 * 2  # cell x seed
    per_seed = [float(line.split(",")[2]) for line in lines[1:] if line.startswith("clean,")]
    assert per_seed[0] != per_seed[1]  # another victim seed, another victim
    clean = rows[0]
    assert clean["seeds"] == 2
    assert clean["mean_balanced_accuracy"] == pytest.approx(sum(per_seed) / 2, abs=1e-4)
    assert clean["mean_balanced_accuracy_sd"] == pytest.approx(
        abs(per_seed[0] - per_seed[1]) / 2**0.5, abs=1e-4
    )
    assert "mean ± sd over 2 seeds" in (tmp_path / "table.md").read_text()
    with pytest.raises(SystemExit):
        benchmark_script("mtlue_table").main(["--seeds", "0,x", "--out", str(tmp_path / "bad")])


def test_partial_protection_command_runs_at_a_tiny_size_and_judges_both_groups(
    tmp_path, benchmark_script
):
    module = benchmark_script("partial_protect")
    tiny = ["--n-train", "96", "--n-test", "32", "--image-size", "16", "--victim-epochs", "1"]
    tiny += ["--generator-epochs", "1", "--samples-per-epoch", "64", "--width", "4"]
    tiny += ["--clean-epochs", "1", "--protected-tasks", "large,shape", "--out", str(tmp_path)]
    outcome = module.main(tiny)
    assert outcome["protected"] == ["large", "shape"]
    assert set(outcome["scores"]) == {"clean", "full", "partial"}
    rows = (tmp_path / "partial.csv").read_text().splitlines()
    assert rows[0] == "task,group,clean,full,partial" and len(rows) == 1 + 14
    assert any(r.startswith("shape,protected,") for r in rows)
    assert any(r.startswith("hue,unprotected,") for r in rows)
    assert "protected tasks (2)" in (tmp_path / "partial.md").read_text()
    with pytest.raises(SystemExit):
        module.main(["--protected-tasks", "nonexistent", "--out", str(tmp_path / "x")])


def test_partial_protection_verdicts_compare_the_right_victims(benchmark_script):
    verdicts = benchmark_script("partial_protect").verdicts
    scores = {
        "clean": {"a": 0.90, "b": 0.90},
        "full": {"a": 0.50, "b": 0.50},
        "partial": {"a": 0.54, "b": 0.88},  # a protected near full, b unprotected near clean
    }
    (_, unprotected_gap, unprotected_met), (_, protected_gap, protected_met) = verdicts(
        scores, ["a"], ["b"]
    )
    assert unprotected_gap == pytest.approx(-0.02) and unprotected_met
    assert protected_gap == pytest.approx(0.04) and protected_met
    scores["partial"] = {"a": 0.60, "b": 0.85}
    checks = verdicts(scores, ["a"], ["b"])
    assert [met for _, _, met in checks] == [False, False]


def test_protect_then_victim_commands_end_to_end(tmp_path):
    store, run = tmp_path / "store", tmp_path / "victim"
    common = ["--n-train", "64", "--n-test", "32", "--image-size", "16"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "raymtl.protect",
            "--out",
            str(store),
            "--base",
            "tap",
            "--epochs",
            "1",
            "--width",
            "4",
            "--clean-epochs",
            "1",
            *common,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert PerturbationStore(store).metadata["base"] == "tap"
    assert not (store / "checkpoint.pt").exists()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "raymtl.victim",
            "--store",
            str(store),
            "--epochs",
            "1",
            "--run-dir",
            str(run),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mean score on the CLEAN test set" in proc.stdout
    assert (run / "metrics.json").is_file() and (run / "test_metrics.md").is_file()
    assert "store_metadata" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("combine", ["average", "grid"])
def test_lsp_is_class_wise_per_task_within_epsilon(tiny, combine):
    from raymtl.protect.patterns import grid_regions

    result = protect(
        tiny.train,
        tiny.tasks,
        3,
        16,
        _config(method="lsp", combine=combine, patch_size=4),
        progress=False,
    )
    assert np.abs(result.deltas).max() == 8
    labels = np.stack([tiny.train.targets[t.name].numpy() for t in tiny.tasks], 1)
    _assert_delta_follows_labels(result.deltas, labels)  # a function of the label vector only
    if combine == "grid":
        # In task k's region, δ depends on task k's label alone.
        for k, (rows, cols) in enumerate(grid_regions(len(tiny.tasks), 16)):
            task = tiny.tasks[k]
            for value in np.unique(labels[:, k]):
                region = result.deltas[labels[:, k] == value][..., rows, cols]
                assert (region == region[:1]).all(), task.name


def test_lsp_needs_no_base_and_rejects_unknown_combine():
    ProtectConfig(method="lsp", base="whatever").validate()
    with pytest.raises(ConfigError, match="combine must be one of average, grid"):
        ProtectConfig(method="lsp", combine="mosaic").validate()


def test_real_format_data_is_protected_and_attacked_from_its_files(tmp_path):
    """UTKFace-format files -> protect (LSP) -> victim, δ keyed by the files' stable ids."""
    from raymtl.data.base import materialise
    from raymtl.data.fake import write_utkface

    root = write_utkface(tmp_path / "data", 40, size=40)
    store, run = tmp_path / "store", tmp_path / "victim"
    data = ["--dataset", "utkface", "--data-root", str(root)]
    _module("raymtl.protect", "--method", "lsp", "--out", store, *data)
    saved = PerturbationStore(store)
    bundle = build_dataset("utkface", str(root))
    assert sorted(saved.ids.tolist()) == sorted(bundle.train.ids.tolist())
    once, twice = (
        materialise(bundle.train, progress=False),
        materialise(bundle.train, progress=False),
    )
    assert torch.equal(once.images, twice.images)  # deterministic decode: no random crop/flip
    protected = protect_split(once, saved)
    change = protected.images.short() - once.images.short()
    assert 0 < change.abs().max() <= 8
    proc = _module("raymtl.victim", "--store", store, "--epochs", 1, "--run-dir", run)
    assert "mean score on the CLEAN test set" in proc.stdout


def test_partial_protection_never_injects_unprotected_labels(tiny):
    tasks = tiny.tasks
    generator = MTLUEGenerator(tasks, 3, 16, 8 / 255, "class", 4, unprotected=["left", "hue"])
    batch = tiny.train.__getitems__(list(range(8)))
    flipped = dict(batch["targets"])
    flipped["left"] = 1 - flipped["left"]
    flipped["hue"] = (flipped["hue"] + 1) % 6
    assert torch.equal(
        generator(batch["image"], batch["targets"]), generator(batch["image"], flipped)
    )
    flipped["large"] = 1 - flipped["large"]
    assert not torch.equal(
        generator(batch["image"], batch["targets"]), generator(batch["image"], flipped)
    )
    # LSP: δ is a function of the protected tasks' labels only.
    result = protect(
        tiny.train,
        tasks,
        3,
        16,
        _config(method="lsp", protected_tasks=["large", "top"]),
        progress=False,
    )
    key = torch.stack([tiny.train.targets["large"], tiny.train.targets["top"]], 1).tolist()
    assert _assert_delta_follows_labels(result.deltas, key) == 4
    with pytest.raises(ConfigError, match="protected task 'smile' is not a task of this data set"):
        protect(tiny.train, tasks, 3, 16, _config(protected_tasks=["smile"]), progress=False)


def test_partial_tap_keeps_the_unprotected_tasks_predictions(tiny):
    """TAP/SEP with partial protection: the clean model has every task's head, and the loss adds
    keep_weight × its true-label loss on the unprotected tasks (0 leaves only the targeted part)."""
    from raymtl.protect.bases import mean_task_loss
    from raymtl.protect.run import create_base

    tasks = tiny.tasks
    protected = [t for t in tasks if t.name in ("large", "hue")]
    kept = [t for t in tasks if t not in protected]
    config = _config(base="sep", protected_tasks=["large", "hue"], keep_unprotected=0.5)
    base = create_base(config, tasks, protected, 3, 16)
    base.prepare(tiny.train)
    probe = tiny.train.images[:2].float() / 255
    assert all(set(m(probe)) == {t.name for t in tasks} for m in base.models)
    batch = tiny.train.__getitems__(list(range(16)))
    wanted = {t.name: target_labels(t, batch["targets"][t.name]) for t in protected}
    targeted = sum(mean_task_loss(m, batch["image"], wanted, protected) for m in base.models)
    keeping = sum(mean_task_loss(m, batch["image"], batch["targets"], kept) for m in base.models)
    got = base.loss(batch["image"], batch["targets"])
    assert torch.allclose(got, targeted + 0.5 * keeping, atol=1e-5)
    base.keep_weight = 0.0
    assert torch.allclose(base.loss(batch["image"], batch["targets"]), targeted, atol=1e-5)
    with pytest.raises(ConfigError, match="keep_unprotected must be >= 0"):
        ProtectConfig(keep_unprotected=-1).validate()


def test_partial_protection_end_to_end_reports_both_groups(tmp_path):
    store, run = tmp_path / "store", tmp_path / "victim"
    common = ["--n-train", "64", "--n-test", "32", "--image-size", "16"]
    _module(
        "raymtl.protect",
        "--epochs",
        1,
        "--width",
        4,
        "--protect-tasks",
        "large,left",
        "--out",
        store,
        *common,
    )
    assert PerturbationStore(store).metadata["protected_tasks"] == ["large", "left"]
    proc = _module("raymtl.victim", "--store", store, "--epochs", 1, "--run-dir", run)
    assert re.search(
        r"protected tasks \(2\): mean score [0-9.]+; unprotected tasks \(12\)", proc.stdout
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"protected_mean_score", "unprotected_mean_score"} <= set(metrics["test"])


def test_ar_patterns_follow_their_own_recurrence_and_delta_follows_labels(tiny):
    from raymtl.protect.autoregressive import ar_patterns

    patterns, weights = ar_patterns(tiny.tasks[:2], 3, 16, seed=1)

    def residual(pattern, w):
        # p[i, j] minus its prediction from the 8 earlier window positions, over the interior.
        p = pattern.double().numpy()
        out = [
            p[:, i, j] - np.einsum("ab,cab->c", w, p[:, i - 2 : i + 1, j - 2 : j + 1])
            for i in range(2, 16)
            for j in range(2, 16)
        ]
        return np.abs(np.stack(out)).max()

    for task in tiny.tasks[:2]:
        own, other = patterns[task.name], weights[task.name]
        assert residual(own[0], other[0]) < 1e-4  # each class's filter annihilates its pattern
        assert residual(own[0], other[1]) > 1e-2  # ...but not another class's
        assert (own.abs() > 0.05).float().mean() >= 0.5  # no degenerate (exploded) pattern
    result = protect(tiny.train, tiny.tasks, 3, 16, _config(method="ar"), progress=False)
    assert np.abs(result.deltas).max() == 8
    labels = np.stack([tiny.train.targets[t.name].numpy() for t in tiny.tasks], 1)
    _assert_delta_follows_labels(result.deltas, labels)


def test_with_deltas_matches_rows_by_sample_id(tiny):
    from raymtl.protect.store import with_deltas

    split = tiny.train
    ids = split.ids.numpy()[::-1].copy()  # another order than the split's
    deltas = np.zeros((len(ids), *split.images.shape[1:]), np.int16)
    deltas[:, 0, 0, 0] = np.arange(len(ids)) % 7 + 1
    protected = with_deltas(split, ids, deltas)
    change = protected.images.short() - split.images.short()
    where = {int(i): r for r, i in enumerate(ids)}
    for position, sample_id in enumerate(split.ids.tolist()[:20]):
        expected = min(
            int(deltas[where[sample_id], 0, 0, 0]), 255 - int(split.images[position, 0, 0, 0])
        )
        assert int(change[position, 0, 0, 0]) == expected
    with pytest.raises(ConfigError, match="no perturbation for sample id"):
        with_deltas(split, ids[1:], deltas[1:])
