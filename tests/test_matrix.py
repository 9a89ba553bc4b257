"""The victim matrix: cells, names checked up front, one table row per cell."""

import csv
import socket

import numpy as np
import pytest

from raymtl.data import build_dataset
from raymtl.errors import ConfigError
from raymtl.matrix import Cell, main, matrix_cells
from raymtl.protect import write_store

TINY = ["--n-train", "48", "--n-test", "16", "--image-size", "16", "--epochs", "1"]


def test_cells_cover_the_product_with_stl_once_per_backbone_and_defence():
    cells = matrix_cells(["small_cnn"], ["ls", "uw"], ["mtl", "stl"], ["none", "jpeg"])
    assert len(cells) == 2 * 2 + 2
    assert Cell("small_cnn", "-", "stl", "jpeg") in cells
    assert Cell("small_cnn", "uw", "mtl", "none") in cells
    for bad, message in [
        ((["resnet19"], ["ls"], ["mtl"], ["none"]), "unknown backbone 'resnet19'"),
        ((["small_cnn"], ["nash"], ["mtl"], ["none"]), "unknown weighting strategy 'nash'"),
        ((["small_cnn"], ["ls"], ["both"], ["none"]), "unknown mode 'both'"),
        ((["small_cnn"], ["ls"], ["mtl"], ["blur"]), "unknown defence 'blur'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            matrix_cells(*bad)


def test_matrix_command_writes_one_row_per_cell(tmp_path):
    run = tmp_path / "run"
    argv = [*TINY, "--weightings", "ls,uw", "--modes", "mtl,stl", "--defences", "none,bdr"]
    assert main([*argv, "--run-dir", str(run)]) == 0
    rows = list(csv.DictReader((run / "matrix.csv").open()))
    assert len(rows) == 6
    assert {(r["mode"], r["weighting"], r["defence"]) for r in rows} == {
        ("mtl", "ls", "none"),
        ("mtl", "uw", "none"),
        ("mtl", "ls", "bdr"),
        ("mtl", "uw", "bdr"),
        ("stl", "-", "none"),
        ("stl", "-", "bdr"),
    }
    assert all(0 <= float(r["mean_balanced_accuracy"]) <= 1 for r in rows)
    table = (run / "matrix.md").read_text().strip().splitlines()
    assert len(table) == 2 + 6
    assert (run / "config.yaml").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_matrix_on_a_store_with_clean_reference(tmp_path):
    bundle = build_dataset("synthetic", n_train=48, n_test=16, image_size=16)
    deltas = np.full(tuple(bundle.train.images.shape), 8, np.int8)
    write_store(
        tmp_path / "store",
        bundle.train.ids.numpy(),
        deltas,
        {"dataset": "synthetic", "dataset_options": bundle.options},
    )
    run = tmp_path / "run"
    argv = ["--store", str(tmp_path / "store"), "--with-clean", "--epochs", "1"]
    main([*argv, "--run-dir", str(run)])
    rows = list(csv.DictReader((run / "matrix.csv").open()))
    assert [r["data"] for r in rows] == ["protected", "clean"]
    header = (run / "matrix.md").read_text().splitlines()[0]
    assert "mean score (protected)" in header and "drop from clean" in header


def test_matrix_refuses_a_single_defence_flag(tmp_path):
    with pytest.raises(ConfigError, match="--defences"):
        main([*TINY, "--defence", "jpeg", "--run-dir", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_matrix_cli_bad_name_is_one_line_status_2(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "raymtl.matrix", "--defences", "none,blur", "--run-dir", str(run)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "python -m raymtl.matrix: error: unknown defence 'blur'; available: bdr, grayscale, jpeg, pgd_at"
    ]
    assert not run.exists()


def test_matrix_cli_refuses_an_unreachable_address_before_writing_anything(tmp_path, run_command):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = tmp_path / "run"
    for args, expected in [
        (["--ray", "--address", f"127.0.0.1:{port}"], f"--address 127.0.0.1:{port}: no Ray"),
        (["--address", "auto"], "--address attaches the --ray run to a cluster; add --ray"),
    ]:
        proc = run_command("raymtl.matrix", *TINY, *args, "--run-dir", run)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], proc.stderr
        assert not run.exists()


def _rows_without_time(run_dir):
    rows = list(csv.DictReader((run_dir / "matrix.csv").open()))
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_matrix_on_ray_runs_one_trial_per_job_with_the_local_rows(tmp_path, ray_cluster):
    import torch

    argv = [*TINY, "--weightings", "ls,uw", "--modes", "mtl,stl"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each 1-CPU trial, so both runs compute in the same order
    try:
        assert main([*argv, "--run-dir", str(tmp_path / "local")]) == 0
    finally:
        torch.set_num_threads(threads)
    ray_run = tmp_path / "ray"
    assert main([*argv, "--ray", "--cpus-per-cell", "1", "--run-dir", str(ray_run)]) == 0
    local, on_ray = _rows_without_time(tmp_path / "local"), _rows_without_time(ray_run)
    assert len(on_ray) == 3
    assert on_ray == local  # same cells, same order, same scores: every victim seeded alike
    trials = sorted(p.name for p in (ray_run / "tune" / "matrix").iterdir() if p.is_dir())
    assert trials == [
        "000-small_cnn-mtl-ls-none-clean",
        "001-small_cnn-mtl-uw-none-clean",
        "002-small_cnn-stl-none-clean",
    ]
    assert len((ray_run / "matrix.md").read_text().strip().splitlines()) == 2 + 3
    assert list((ray_run / "tensorboard").glob("events.out.tfevents.*"))


def test_a_failing_matrix_trial_is_named_and_the_others_keep_their_rows(tmp_path, ray_cluster):
    from raymtl.data.base import MultiTaskArrays
    from raymtl.engine import TrainConfig
    from raymtl.matrix import MatrixInputs, ModelFactory, matrix_jobs
    from raymtl.scale.matrix import TrialResources, run_jobs_as_trials

    bundle = build_dataset("synthetic", n_train=48, n_test=16, image_size=16)
    train = bundle.train
    first = bundle.tasks[0].name
    broken = MultiTaskArrays(  # one task's labels missing: training it fails
        train.images, {k: v for k, v in train.targets.items() if k != first}, train.ids, "train"
    )
    datasets = {"clean": train, "broken": broken}
    cells = matrix_cells(["small_cnn"], ["ls"], ["mtl"], ["none"])
    inputs = MatrixInputs(
        datasets, bundle.test, bundle.tasks, ModelFactory(3, 16), TrainConfig(epochs=1)
    )
    jobs = matrix_jobs(cells, list(datasets))
    rows, errors = run_jobs_as_trials(
        jobs, inputs, str(tmp_path / "tune"), TrialResources(cpus=1, max_concurrent=2)
    )
    assert rows[0] is not None and rows[0]["data"] == "clean" and rows[1] is None
    assert len(errors) == 1 and errors[0].startswith("small_cnn/mtl/ls/none [broken]: ")
