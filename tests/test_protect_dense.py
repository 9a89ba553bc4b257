"""Dense protection (issue 5): MTL-UE on segmentation, depth and normals label maps."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from raymtl.data import build_dataset
from raymtl.protect import PerturbationStore, ProtectConfig, SurrogateConfig, protect
from raymtl.protect.bases import mean_error, target_labels
from raymtl.protect.generator import MTLUEGenerator, inter_task_loss, intra_task_loss
from raymtl.tasks import IGNORE_INDEX, TaskSpec

TINY_SURROGATE = SurrogateConfig(clean_epochs=1, batch_size=32, em_steps_per_epoch=1)


@pytest.fixture(scope="module")
def dense():
    return build_dataset("synthetic_dense", n_train=48, n_test=16, image_size=16)


def test_tap_targets_of_dense_tasks():
    seg = TaskSpec("s", "segmentation", 4)
    labels = torch.tensor([[[0, 1], [3, IGNORE_INDEX]]])
    assert target_labels(seg, labels).tolist() == [[[2, 3], [1, IGNORE_INDEX]]]
    depth = TaskSpec("d", "depth")
    maps = torch.tensor([[[1.0, 2.0], [4.0, 0.0]], [[3.0, 3.0], [5.0, 9.0]]])
    mirrored = target_labels(depth, maps)
    # each sample's valid range is kept and reversed (near <-> far); unknown depth stays unknown
    assert mirrored.tolist() == [[[4.0, 3.0], [1.0, 0.0]], [[9.0, 9.0], [7.0, 3.0]]]
    normals = torch.randn(2, 3, 4, 4)
    assert torch.equal(target_labels(TaskSpec("n", "normals"), normals), -normals)


def test_dense_generator_reads_label_maps_and_stays_within_epsilon(dense):
    epsilon = 8 / 255
    generator = MTLUEGenerator(dense.tasks, 3, 16, epsilon, "class", 4)
    batch = dense.train.__getitems__(list(range(6)))
    delta = generator(batch["image"], batch["targets"])
    assert delta.shape == batch["image"].shape
    assert delta.abs().max() <= epsilon
    for name in ("segmentation", "depth", "normals"):
        changed = dict(batch["targets"])
        changed[name] = target_labels(dense.task(name), changed[name])
        assert not torch.equal(delta, generator(batch["image"], changed)), name
    # no class embeddings, so no regulariser terms (the paper uses none for dense tasks)
    assert float(intra_task_loss(generator)) == 0 and float(inter_task_loss(generator)) == 0
    # an unprotected dense task's label map never reaches δ
    partial = MTLUEGenerator(dense.tasks, 3, 16, epsilon, "class", 4, unprotected=["depth"])
    changed = dict(batch["targets"], depth=batch["targets"]["depth"] * 2)
    assert torch.equal(partial(batch["image"], batch["targets"]), partial(batch["image"], changed))


def test_dense_error_is_one_minus_the_primary_metric(dense):
    """The stop rules read a dense task's error as 1 − mIoU / δ<1.25 / % within 30°."""

    class Oracle(torch.nn.Module):
        def forward(self, images):
            seg = torch.nn.functional.one_hot(truth["segmentation"].long(), 4)
            return {
                "segmentation": seg.permute(0, 3, 1, 2).float(),
                "depth": truth["depth"].unsqueeze(1),
                "normals": truth["normals"],
            }

    truth = dense.train.__getitems__(list(range(8)))["targets"]
    no_delta = lambda images, targets, ids: torch.zeros_like(images)  # noqa: E731
    assert mean_error([Oracle()], no_delta, dense.train, dense.tasks, limit=8) < 1e-6


@pytest.mark.parametrize("base", ["em", "tap"])
def test_dense_mtlue_generates_bounded_deltas(dense, base):
    config = ProtectConfig(
        method="mtlue",
        base=base,
        epochs=1,
        width=4,
        batch_size=16,
        surrogate=TINY_SURROGATE,
    )
    result = protect(dense.train, dense.tasks, 3, 16, config, progress=False)
    assert result.deltas.shape == tuple(dense.train.images.shape)
    assert 0 < np.abs(result.deltas).max() <= 8


def test_nyuv2_format_files_are_protected_exported_and_attacked(tmp_path):
    """NYUv2-format files (non-square, 13 classes with ignored pixels) -> MTL-UE+TAP -> export
    in NYUv2's own layout -> victim on the exported folder, scored with the dense metrics."""
    from raymtl.data.base import materialise
    from raymtl.data.fake import write_nyuv2
    from raymtl.protect.export import export_protected
    from raymtl.protect.store import apply_integer_deltas

    root = write_nyuv2(tmp_path / "nyu", 12, 4, height=16, width=24)
    originals = {p: p.read_bytes() for p in sorted(root.rglob("*.npy"))}
    store, exported, run = tmp_path / "store", tmp_path / "exported", tmp_path / "victim"
    data = ["--dataset", "nyuv2", "--data-root", str(root)]
    common = ["--epochs", "1", "--width", "4", "--clean-epochs", "1"]
    protect_args = ["--base", "tap", *common, "--out", store, *data]
    victim_args = ["--exported", exported, "--epochs", "1", "--run-dir", run]
    for module, args in (("raymtl.protect", protect_args), ("raymtl.victim", victim_args)):
        if module == "raymtl.victim":
            export_protected(store, exported, progress=False)
        proc = subprocess.run(
            [sys.executable, "-m", module, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
    saved = PerturbationStore(store)
    assert saved.deltas.shape[1:] == (3, 16, 24)
    assert 0 < np.abs(saved.deltas).max() <= 8
    assert "mean score on the CLEAN test set" in proc.stdout
    assert "miou" in proc.stdout

    assert {p: p.read_bytes() for p in sorted(root.rglob("*.npy"))} == originals
    for path, data_bytes in originals.items():  # the layout is kept; label maps copied as they are
        copy = exported / path.relative_to(root)
        assert copy.is_file(), copy
        if path.parent.name != "image":
            assert copy.read_bytes() == data_bytes, copy
    clean, protected = build_dataset("nyuv2", str(root)), build_dataset("nyuv2", str(exported))
    before, after = materialise(clean.train), materialise(protected.train)
    want = apply_integer_deltas(before.images, saved.deltas_for(before.ids.tolist()))
    order = [after.ids.tolist().index(i) for i in before.ids.tolist()]
    assert after.images.dtype == torch.uint8  # materialised at the image's quantisation
    assert torch.equal(after.images[order], want)
    for task in ("segmentation", "depth", "normals"):
        assert torch.equal(after.targets[task][order], before.targets[task])
    clean_test, exported_test = materialise(clean.test), materialise(protected.test)
    assert torch.equal(exported_test.images, clean_test.images)  # test images are not perturbed


def test_input_independent_predictor_uses_per_pixel_training_statistics(dense, benchmark_script):
    prior = benchmark_script("dense_protect").InputIndependentPredictor(dense.train, dense.tasks)
    out = prior(torch.zeros(2, 3, 16, 16))
    seg = dense.train.targets["segmentation"]
    counts = torch.stack([(seg == c).sum(0) for c in range(4)])
    assert torch.equal(out["segmentation"][0].argmax(0), counts.argmax(0))
    assert torch.equal(out["segmentation"][0], out["segmentation"][1])
    depth = dense.train.targets["depth"]
    assert torch.allclose(out["depth"][0, 0, 3, 5], depth[:, 3, 5][depth[:, 3, 5] > 0].median())
    assert torch.allclose(out["normals"][0].norm(dim=0), torch.ones(16, 16), atol=1e-5)


def test_the_dense_table_command_runs_at_a_tiny_size(tmp_path, benchmark_script):
    rows = benchmark_script("dense_protect").main(
        [
            *("--n-train", "48", "--n-test", "16", "--image-size", "16"),
            *("--victim-epochs", "1", "--clean-epochs", "1", "--generator-epochs", "1"),
            *("--width", "4", "--threads", "1", "--out", str(tmp_path)),
        ]
    )
    assert [r["data"] for r in rows] == ["input-independent", "clean", "MTL-UE+EM", "MTL-UE+TAP"]
    assert "least margin removed" in rows[-1]
    table = (tmp_path / "dense.md").read_text()
    assert "segmentation/miou" in table and "MTL-UE+TAP" in table


def test_the_label_code_probe_writes_each_pixels_labels_within_epsilon(dense, benchmark_script):
    code = benchmark_script("dense_protect").label_coded_deltas
    deltas = code(dense.train, list(dense.tasks), 8 / 255)
    assert deltas.dtype == torch.int16 and deltas.shape == dense.train.images.shape
    assert deltas.abs().amax(dim=(1, 2, 3)).eq(8).all()  # each image reaches ε and no further
    # The code follows the labels, not the image: other images, same δ; other classes, other δ.
    negative = dense.train.subset(range(len(dense.train)))
    negative.images = 255 - negative.images
    assert torch.equal(code(negative, list(dense.tasks), 8 / 255), deltas)
    relabelled = dense.train.subset(range(len(dense.train)))
    relabelled.targets["segmentation"] = (relabelled.targets["segmentation"] + 1) % 4
    assert not torch.equal(code(relabelled, list(dense.tasks), 8 / 255), deltas)
