"""Readers of the publishers' formats, tested on tiny files written in exactly those formats."""

import io
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from raymtl.data import build_dataset
from raymtl.data.base import collate_batch
from raymtl.data.celeba import ATTRIBUTES
from raymtl.data.fake import (
    CHEST_HEADER,
    encode,
    write_celeba,
    write_chestxray14,
    write_nyuv2,
    write_utkface,
)
from raymtl.data.files import BadSampleError, hashed_id
from raymtl.data.utkface import age_bin, name_stem, parse_name
from raymtl.engine import make_loader
from raymtl.errors import ConfigError
from raymtl.tasks import IGNORE_INDEX


def _jpeg(size=(178, 218)):
    return encode(np.full((size[1], size[0], 3), 128, np.uint8), "JPEG")


def _handmade_celeba(root, rows, partition, count=None, header=None):
    (root / "img_align_celeba").mkdir(parents=True)
    names = header if header is not None else " ".join(ATTRIBUTES) + " "
    lines = [str(count if count is not None else len(rows)), names, *rows]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    for row in rows:
        (root / "img_align_celeba" / row.split()[0]).write_bytes(_jpeg())
    return root


def _celeba_row(name, positive):
    return name + " " + " ".join(" 1" if a in positive else "-1" for a in ATTRIBUTES)


# ------------------------------------------------------------------ CelebA


def test_celeba_parses_header_lines_multiple_spaces_and_minus_one_one(tmp_path):
    rows = [
        _celeba_row("000001.jpg", {"Smiling", "Young"}),
        _celeba_row("000002.jpg", {"Male"}),
        _celeba_row("000003.jpg", set()),
    ]
    rows[1] = rows[1].replace(" ", "   ", 3)  # runs of spaces between columns
    root = _handmade_celeba(
        tmp_path / "celeba", rows, ["000001.jpg 0", "000002.jpg 0", "000003.jpg 2"]
    )
    bundle = build_dataset("celeba", str(root))
    assert [t.name for t in bundle.tasks] == list(ATTRIBUTES) and len(bundle.tasks) == 40
    assert bundle.train.ids.tolist() == [1, 2] and bundle.test.ids.tolist() == [3]
    assert bundle.train.labels["Smiling"].tolist() == [1, 0]
    assert bundle.train.labels["Male"].tolist() == [0, 1]
    assert bundle.test.labels["Young"].tolist() == [0]
    sample = bundle.train[0]
    assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.float32
    assert sample["targets"]["Young"].item() == 1


def test_celeba_attribute_subset(tmp_path):
    root = write_celeba(tmp_path / "c", 20, width=80, height=90)
    bundle = build_dataset("celeba", str(root), attributes="Smiling,Male")
    assert [t.name for t in bundle.tasks] == ["Smiling", "Male"]
    assert set(bundle.train[0]["targets"]) == {"Smiling", "Male"}
    with pytest.raises(ConfigError, match="unknown attribute"):
        build_dataset("celeba", str(root), attributes="Smiling,Grinning")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.__setitem__(0, r[0] + " 1"), "line 3 has 42 columns, expected 41"),
        (
            lambda r: r.__setitem__(1, r[1].replace("-1", " 0", 1)),
            "line 4: attribute value '0', expected -1 or 1",
        ),
    ],
)
def test_celeba_malformed_label_rows_name_the_file_and_line(tmp_path, mutate, message):
    rows = [_celeba_row("000001.jpg", {"Smiling"}), _celeba_row("000002.jpg", set())]
    mutate(rows)
    root = _handmade_celeba(tmp_path / "c", rows, ["000001.jpg 0", "000002.jpg 2"])
    with pytest.raises(ConfigError, match=re.escape("list_attr_celeba.txt: " + message)):
        build_dataset("celeba", str(root))


def test_celeba_count_line_image_without_label_and_missing_files(tmp_path):
    rows = [_celeba_row("000001.jpg", set()), _celeba_row("000002.jpg", set())]
    root = _handmade_celeba(tmp_path / "a", rows, ["000001.jpg 0", "000002.jpg 2"], count=5)
    with pytest.raises(ConfigError, match="line 1 declares 5 images but 2 rows follow"):
        build_dataset("celeba", str(root))
    root = _handmade_celeba(tmp_path / "b", rows, ["000001.jpg 0", "000002.jpg 2"])
    (root / "img_align_celeba" / "000009.jpg").write_bytes(_jpeg())
    with pytest.raises(
        ConfigError, match=re.escape("000009.jpg: image has no row in list_attr_celeba.txt")
    ):
        build_dataset("celeba", str(root))
    (root / "list_eval_partition.txt").unlink()
    with pytest.raises(ConfigError, match=re.escape("list_eval_partition.txt: missing file")):
        build_dataset("celeba", str(root))
    with pytest.raises(ConfigError, match="missing folder"):
        build_dataset("celeba", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="needs --data-root"):
        build_dataset("celeba")


# ------------------------------------------------------------------ ChestX-ray14


def _handmade_chest(root, entries, train, test, folder="images"):
    (root / folder).mkdir(parents=True)
    lines = [CHEST_HEADER]
    for name, findings in entries:
        (root / folder / name).write_bytes(encode(np.full((300, 300), 90, np.uint8), "PNG"))
        lines.append(f"{name},{findings},0,1,50,M,PA,300,300,0.143,0.143,")
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(train) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return root


def test_chestxray_no_finding_and_multi_labels_in_official_order(tmp_path):
    entries = [
        ("00000001_000.png", "No Finding"),
        ("00000001_001.png", "Cardiomegaly|Effusion"),
        ("00000002_000.png", "Hernia"),
    ]
    root = _handmade_chest(
        tmp_path / "x",
        entries,
        ["00000001_000.png", "00000001_001.png"],
        ["00000002_000.png"],
        folder="images_001/images",
    )
    bundle = build_dataset("chestxray14", str(root))
    assert [t.name for t in bundle.tasks][:3] == ["Atelectasis", "Cardiomegaly", "Effusion"]
    assert [t.name for t in bundle.tasks][-1] == "Hernia" and len(bundle.tasks) == 14
    assert all(t.primary_metric == "roc_auc" for t in bundle.tasks)
    assert bundle.train.ids.tolist() == [1000, 1001] and bundle.test.ids.tolist() == [2000]
    train_labels = {
        t: bundle.train.labels[t].tolist() for t in ("Cardiomegaly", "Effusion", "Hernia", "Mass")
    }
    assert train_labels == {
        "Cardiomegaly": [0, 1],
        "Effusion": [0, 1],
        "Hernia": [0, 0],
        "Mass": [0, 0],
    }
    assert bundle.test.labels["Hernia"].tolist() == [1]
    sample = bundle.test[0]
    assert sample["image"].shape == (1, 224, 224)


def test_chestxray_distributed_folder_layout_and_errors(tmp_path):
    root = write_chestxray14(tmp_path / "x", 10, layout="split")
    assert (root / "images_002" / "images").is_dir()
    bundle = build_dataset("chestxray14", str(root))
    assert len(bundle.train) + len(bundle.test) == 10
    bad = _handmade_chest(
        tmp_path / "y", [("00000001_000.png", "Cardiomegaly|Flu")], ["00000001_000.png"], []
    )
    with pytest.raises(
        ConfigError, match=re.escape("line 2: bad Finding Labels 'Cardiomegaly|Flu'")
    ):
        build_dataset("chestxray14", str(bad))
    text = (root / "Data_Entry_2017.csv").read_text().splitlines()
    text[3] = text[3].rstrip(",")
    (root / "Data_Entry_2017.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(
        ConfigError, match=re.escape("Data_Entry_2017.csv: line 4 has 11 columns, expected 12")
    ):
        build_dataset("chestxray14", str(root))


# ------------------------------------------------------------------ UTKFace


def test_utkface_names_age_bins_and_malformed_names(tmp_path):
    assert [age_bin(a) for a in (0, 2, 3, 9, 10, 19, 69, 70, 116)] == [0, 0, 1, 1, 2, 2, 7, 8, 8]
    assert parse_name("26_1_3_20170119180000000.jpg.chip.jpg") == (3, 1, 3)
    assert parse_name("39_1_20170116174525125.jpg.chip.jpg") is None  # race missing
    assert parse_name("26_2_3_20170119180000000.jpg") is None  # gender out of range
    root = write_utkface(tmp_path / "u", 30, malformed=3, chip=True)
    bundle = build_dataset("utkface", str(root))
    assert bundle.options["malformed_names_skipped"] == 3
    assert len(bundle.train) + len(bundle.test) == 30
    names = sorted(p.name for p in (root / "UTKFace").iterdir() if parse_name(p.name))
    assert set(bundle.train.ids.tolist()) | set(bundle.test.ids.tolist()) == {
        hashed_id(n.removesuffix(".jpg.chip.jpg")) for n in names
    }
    assert name_stem("26_1_3_2017.jpg.chip.png") == name_stem("26_1_3_2017.jpg") == "26_1_3_2017"
    assert bundle.train[0]["image"].shape == (3, 128, 128)


def test_utkface_split_is_seeded_and_independent_of_file_order(tmp_path):
    root = write_utkface(tmp_path / "u", 60)
    first = build_dataset("utkface", str(root), seed=0)
    again = build_dataset("utkface", str(root), seed=0)
    other = build_dataset("utkface", str(root), seed=1)
    assert first.test.ids.tolist() == again.test.ids.tolist()
    assert set(first.test.ids.tolist()) != set(other.test.ids.tolist())
    assert 0.6 < len(first.train) / 60 < 0.95


# ------------------------------------------------------------------ NYUv2


def test_nyuv2_layout_targets_and_ignore_label(tmp_path):
    root = write_nyuv2(tmp_path / "n", 3, 2)
    bundle = build_dataset("nyuv2", str(root))
    assert [t.name for t in bundle.tasks] == ["segmentation", "depth", "normals"]
    assert bundle.tasks[0].num_classes == 13
    sample = bundle.test[0]
    assert sample["image"].shape == (3, 24, 32)
    assert sample["targets"]["depth"].shape == (24, 32) and sample["targets"]["normals"].shape == (
        3,
        24,
        32,
    )
    stem = next(
        p.stem
        for p in (root / "val" / "label").iterdir()
        if hashed_id(f"val/{p.stem}") == sample["id"]
    )
    raw = np.load(root / "val" / "label" / f"{stem}.npy")
    segmentation = sample["targets"]["segmentation"]
    assert torch.equal(segmentation == IGNORE_INDEX, torch.from_numpy(raw < 0))
    assert torch.equal(segmentation[raw >= 0], torch.from_numpy(raw[raw >= 0].astype(np.int64)))
    assert set(segmentation.unique().tolist()) <= set(range(13)) | {IGNORE_INDEX}
    (root / "train" / "depth" / "1.npy").unlink()
    with pytest.raises(ConfigError, match=r"train/image/1.npy: image has no depth/1.npy"):
        build_dataset("nyuv2", str(root))


# ------------------------------------------------------------------ ids, bad samples, loaders


def test_ids_and_labels_do_not_depend_on_shuffle_or_worker_count(tmp_path):
    root = write_celeba(tmp_path / "c", 40, width=80, height=90)
    bundle = build_dataset("celeba", str(root))
    expected = dict(
        zip(bundle.train.ids.tolist(), bundle.train.labels["Smiling"].tolist(), strict=True)
    )
    for workers, shuffle in ((0, False), (2, True)):
        seen = {}
        for batch in make_loader(bundle.train, 7, shuffle=shuffle, seed=3, num_workers=workers):
            seen.update(
                zip(batch["id"].tolist(), batch["targets"]["Smiling"].tolist(), strict=True)
            )
        assert seen == expected


def test_corrupt_image_error_names_the_file_and_skip_counts(tmp_path):
    root = write_celeba(tmp_path / "c", 12, width=80, height=90, split_every=(11, 0, 1))
    (root / "img_align_celeba" / "000004.jpg").write_bytes(b"not a jpeg at all")
    (root / "img_align_celeba" / "000007.jpg").unlink()
    strict = build_dataset("celeba", str(root))
    with pytest.raises(
        BadSampleError, match=re.escape("000004.jpg: celeba image: cannot decode image")
    ):
        strict.train[3]
    with pytest.raises(BadSampleError, match=re.escape("000007.jpg: cannot read")):
        strict.train[6]
    lenient = build_dataset("celeba", str(root), on_bad_sample="skip")
    assert lenient.train[3] is None
    delivered = sum(
        len(b["id"]) for b in make_loader(lenient.train, 5, shuffle=False) if b is not None
    )
    assert delivered == 9  # 11 training images, 2 of them bad
    assert collate_batch([None, None]) is None
    with pytest.raises(ConfigError, match="--on-bad-sample must be one of error, skip"):
        build_dataset("celeba", str(root), on_bad_sample="ignore")


def test_image_decoding_matches_the_paper_preprocessing(tmp_path):
    root = tmp_path / "c"
    rows = [_celeba_row("000001.jpg", set()), _celeba_row("000002.jpg", set())]
    _handmade_celeba(root, rows, ["000001.jpg 2", "000002.jpg 0"])
    pixels = np.zeros((218, 178, 3), np.uint8)
    pixels[:109] = 255  # top half white
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    (root / "img_align_celeba" / "000001.jpg").write_bytes(
        buffer.getvalue()
    )  # PNG bytes decode too
    image = build_dataset("celeba", str(root)).test[0]["image"]
    assert image.shape == (3, 64, 64)
    assert image[:, :20].mean() > 0.95 and image[:, -20:].mean() < 0.05


def _run_data_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "raymtl.data", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_data_cli_bad_input_is_one_line_status_2(tmp_path, run_command):
    proc = _run_data_cli(
        "convert",
        "--dataset",
        "celeba",
        "--root",
        str(tmp_path / "none"),
        "--out",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "missing folder (the celeba data root)" in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = run_command(
        "raymtl.data",
        "convert",
        "--dataset",
        "synthetic",
        "--root",
        str(tmp_path),
        "--out",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "does not take option(s) on_bad_sample" in proc.stderr
