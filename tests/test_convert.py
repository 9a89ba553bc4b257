"""The Parquet converter: identical samples, checksums, bad samples and resuming."""

import json
import re

import pytest
import torch

import raymtl.data.convert as conversion
from raymtl.data import build_dataset
from raymtl.data.convert import convert, verify
from raymtl.data.fake import write_celeba, write_nyuv2
from raymtl.errors import ConfigError


@pytest.fixture
def celeba_root(tmp_path):
    return write_celeba(tmp_path / "celeba", 30, width=80, height=90)


def test_converted_shards_yield_identical_samples(celeba_root, tmp_path):
    report = convert("celeba", str(celeba_root), str(tmp_path / "pq"), shard_size=8, progress=False)
    assert (report.rows, report.shards, report.skipped) == (30, 4, 0)
    assert verify(str(tmp_path / "pq")) == 30
    raw, converted = (
        build_dataset("celeba", str(celeba_root)),
        build_dataset("celeba", str(tmp_path / "pq")),
    )
    assert converted.options["source"] == "parquet"
    for name in ("train", "test"):
        a, b = getattr(raw, name), getattr(converted, name)
        assert a.ids.tolist() == b.ids.tolist()
        assert all((a.labels[k] == b.labels[k]).all() for k in a.labels)
    for i in range(len(raw.test)):
        assert torch.equal(raw.test[i]["image"], converted.test[i]["image"])


def test_dense_data_sets_convert_too(tmp_path):
    root = write_nyuv2(tmp_path / "n", 3, 2)
    convert("nyuv2", str(root), str(tmp_path / "pq"), shard_size=2, progress=False)
    raw, converted = build_dataset("nyuv2", str(root)), build_dataset("nyuv2", str(tmp_path / "pq"))
    for key in ("segmentation", "depth", "normals"):
        assert torch.equal(raw.test[1]["targets"][key], converted.test[1]["targets"][key])


def test_an_interrupted_conversion_resumes_without_redoing_shards(
    celeba_root, tmp_path, monkeypatch
):
    out = tmp_path / "pq"
    real_write = conversion.pq.write_table
    calls = {"n": 0}

    def fail_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(conversion.pq, "write_table", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        convert("celeba", str(celeba_root), str(out), shard_size=8, progress=False)
    monkeypatch.setattr(conversion.pq, "write_table", real_write)
    assert not (out / "_manifest.json").exists()
    progress = json.loads((out / "_progress.json").read_text())
    assert [s["number"] for s in progress["shards"]] == [0, 1]
    first = (out / "part-00000.parquet").stat().st_mtime_ns
    report = convert("celeba", str(celeba_root), str(out), shard_size=8, progress=False)
    assert report.resumed_shards == 2 and report.rows == 30 and report.shards == 4
    assert (out / "part-00000.parquet").stat().st_mtime_ns == first
    assert not (out / "_progress.json").exists() and not list(out.glob("*.tmp"))
    assert verify(str(out)) == 30


def test_resume_refuses_other_settings(celeba_root, tmp_path):
    out = tmp_path / "pq"
    out.mkdir()
    (out / "_progress.json").write_text(
        json.dumps({"settings": {"dataset": "celeba", "shard_size": 99}, "shards": []})
    )
    with pytest.raises(ConfigError, match="partial conversion of other input or settings"):
        convert("celeba", str(celeba_root), str(out), shard_size=8, progress=False)


def test_bad_samples_stop_or_are_skipped_and_counted(celeba_root, tmp_path):
    (celeba_root / "img_align_celeba" / "000005.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ConfigError, match=r"000005.jpg: celeba image: cannot decode image"):
        convert("celeba", str(celeba_root), str(tmp_path / "strict"), shard_size=8, progress=False)
    assert not (tmp_path / "strict" / "_manifest.json").exists()
    report = convert(
        "celeba",
        str(celeba_root),
        str(tmp_path / "lenient"),
        shard_size=8,
        on_bad_sample="skip",
        progress=False,
    )
    assert (report.rows, report.skipped) == (29, 1)
    manifest = json.loads((tmp_path / "lenient" / "_manifest.json").read_text())
    assert manifest["skipped_bad_samples"] == 1


def test_checksum_mismatch_is_detected(celeba_root, tmp_path):
    convert("celeba", str(celeba_root), str(tmp_path / "pq"), shard_size=16, progress=False)
    shard = tmp_path / "pq" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ConfigError, match=re.escape("part-00001.parquet: checksum does not match")):
        verify(str(tmp_path / "pq"))
