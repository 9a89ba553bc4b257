"""Exporting a protected data set in its publisher's format, and reading it back."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raymtl.data import build_dataset
from raymtl.data.base import collate_batch, materialise
from raymtl.data.fake import write_celeba, write_chestxray14, write_utkface
from raymtl.errors import ConfigError
from raymtl.protect.__main__ import main as protect_main
from raymtl.protect.export import export_protected, rename_tokens
from raymtl.protect.store import PerturbationStore, apply_integer_deltas

WRITERS = {
    "celeba": lambda root: write_celeba(root, 20),
    "utkface": lambda root: write_utkface(root, 24, size=40, chip=True),
    "chestxray14": lambda root: write_chestxray14(root, 20, size=64),
}
OPTIONS = {"celeba": ["--data-option", "attributes=Male,Smiling,Young"]}


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _by_id(dataset, shuffle: bool) -> dict[int, torch.Tensor]:
    """Each sample's uint8 image by id, read through a (shuffled) DataLoader."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=7, shuffle=shuffle, collate_fn=collate_batch
    )
    out = {}
    for batch in loader:
        images = (batch["image"] * 255).round().byte()
        out.update({int(i): image for i, image in zip(batch["id"], images, strict=True)})
    return out


@pytest.fixture(params=sorted(WRITERS))
def protected_store(request, tmp_path):
    name = request.param
    root = WRITERS[name](tmp_path / "original")
    store = tmp_path / "store"
    argv = ["--method", "lsp", "--dataset", name, "--data-root", str(root), "--out", str(store)]
    assert protect_main(argv + OPTIONS.get(name, [])) == 0
    return name, root, store, tmp_path


def test_export_rereads_with_each_sample_keeping_its_delta(protected_store):
    name, root, store, tmp_path = protected_store
    before = _tree_digest(root)
    report = export_protected(store, tmp_path / "exported", progress=False)
    assert _tree_digest(root) == before  # the original data set is only read
    saved = PerturbationStore(store)
    options = dict(saved.metadata["dataset_options"])
    options.pop("root")
    original = build_dataset(name, str(root), **options)
    exported = build_dataset(name, str(report.out), **options)
    assert exported.in_channels == original.in_channels
    assert report.protected == len(original.train) and report.protected == len(saved.ids)

    clean = materialise(original.train, progress=False)
    want = apply_integer_deltas(clean.images, saved.deltas_for(clean.ids.tolist()))
    expected = {int(i): image for i, image in zip(clean.ids, want, strict=True)}
    got = _by_id(exported.train, shuffle=True)  # shuffled order: δ still follows the id
    assert set(got) == set(expected)
    for sample_id, image in got.items():
        assert torch.equal(image, expected[sample_id]), sample_id
    assert any(
        not torch.equal(got[i], c) for i, c in zip(clean.ids.tolist(), clean.images, strict=True)
    )

    clean_test = _by_id(original.test, shuffle=False)
    assert _by_id(exported.test, shuffle=True).keys() == clean_test.keys()
    for sample_id, image in _by_id(exported.test, shuffle=True).items():
        assert torch.equal(image, clean_test[sample_id])  # test images are not perturbed

    again = materialise(exported.train, progress=False)
    order = {int(i): k for k, i in enumerate(again.ids)}
    for task, values in clean.targets.items():  # the label files still give every label
        rows = [order[int(i)] for i in clean.ids]
        assert torch.equal(again.targets[task][rows], values), task


def test_celeba_export_is_a_celeba_folder_a_third_party_script_can_read(tmp_path):
    root = write_celeba(tmp_path / "original", 10)
    store = tmp_path / "store"
    protect_main(
        ["--method", "lsp", "--dataset", "celeba", "--data-root", str(root), "--out", str(store)]
    )
    out = export_protected(store, tmp_path / "exported", progress=False).out
    lines = (out / "list_attr_celeba.txt").read_text().splitlines()
    assert (
        lines[0] == "10"
        and lines[1].split() == (root / "list_attr_celeba.txt").read_text().splitlines()[1].split()
    )
    for line in lines[2:] + (out / "list_eval_partition.txt").read_text().splitlines():
        name = line.split()[0]
        assert name.endswith(".png") and (out / "img_align_celeba" / name).is_file()
    original_rows = (root / "list_attr_celeba.txt").read_text().splitlines()[2:]
    assert [r.split()[1:] for r in lines[2:]] == [r.split()[1:] for r in original_rows]


def test_victim_trains_on_an_exported_folder(tmp_path):
    root = write_utkface(tmp_path / "original", 30, size=40)
    store, exported = tmp_path / "store", tmp_path / "exported"
    protect_main(
        ["--method", "lsp", "--dataset", "utkface", "--data-root", str(root), "--out", str(store)]
    )
    export_protected(store, exported, progress=False)
    proc = subprocess.run(
        [sys.executable, "-m", "raymtl.victim", "--exported", str(exported), "--epochs", "1",
         "--run-dir", str(tmp_path / "victim")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "mean score on the CLEAN test set" in proc.stdout


def test_export_refuses_generated_data_existing_folders_and_mismatched_sizes(tmp_path):
    store = tmp_path / "store"
    protect_main(
        ["--method", "lsp", "--dataset", "synthetic", "--data-option", "n_train=64",
         "--data-option", "n_test=16", "--out", str(store)]
    )  # fmt: skip
    with pytest.raises(ConfigError, match="generated, not read from files"):
        export_protected(store, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

    root = write_utkface(tmp_path / "original", 20, size=40)
    real = tmp_path / "real"
    protect_main(
        ["--method", "lsp", "--dataset", "utkface", "--data-root", str(root), "--out", str(real)]
    )
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        export_protected(real, tmp_path / "taken", progress=False)
    out = export_protected(real, tmp_path / "exported", progress=False).out
    marker = out / "raymtl_export.json"
    marker.write_text(marker.read_text().replace('"image_size": 128', '"image_size": 64'))
    with pytest.raises(ConfigError, match="exported at size 64, this reader uses 128"):
        build_dataset("utkface", str(out))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_rename_tokens_replaces_whole_names_only():
    text = "000001.jpg 1 -1\n000011.jpg,x\n"
    assert rename_tokens(text, {"000001.jpg": "000001.png"}) == "000001.png 1 -1\n000011.jpg,x\n"


def test_grayscale_format_reports_one_channel(tmp_path):
    bundle = build_dataset("chestxray14", str(write_chestxray14(tmp_path, 10, size=64)))
    assert bundle.in_channels == 1
    assert np.asarray(bundle.train[0]["image"]).shape[0] == 1
