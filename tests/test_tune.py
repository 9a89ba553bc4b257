"""``python -m raymtl.tune``: a real (tiny) Optuna + ASHA study on the session's Ray cluster."""

import csv
import functools
import json
import socket
import subprocess
import sys
import time

import pytest

from raymtl.tune.cli import build_parser, main, per_task_from_flat, pick_best

TINY = [
    "--n-train",
    "160",
    "--n-test",
    "64",
    "--image-size",
    "16",
    "--epochs",
    "3",
    "--grace-period",
    "1",
]
TRIALS = 4
LEFT_BEHIND: list[str] = []  # placement groups still held once the tiny study returned


@pytest.fixture(scope="module")
def tiny_study(ray_cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("study") / "run"
    space = tmp_path_factory.mktemp("space") / "space.yaml"
    # a wide learning-rate range: some trials are hopeless, so ASHA stops them early
    space.write_text(
        "lr: {type: log_float, low: 1.0e-7, high: 1.0e-2, default: 2.0e-3}\n"
        "weighting: {type: categorical, choices: [ls, pcgrad], default: ls}\n"
    )
    args = ["victim", *TINY, "--num-samples", str(TRIALS), "--search-space", str(space)]
    status = main([*args, "--run-dir", str(run_dir)])
    assert status == 0
    time.sleep(0.5)  # as the conftest guard does: a Train run's own shutdown comes just after
    groups = ray_cluster.util.placement_group_table().items()
    LEFT_BEHIND.extend(k for k, g in groups if g["state"] == "CREATED")
    return run_dir


@pytest.mark.ray
def test_study_writes_config_results_and_best_trial(tiny_study, capsys):
    config = (tiny_study / "config.yaml").read_text()
    assert (
        "command: " in config and "algorithm: optuna-tpe" in config and "scheduler: asha" in config
    )
    with open(tiny_study / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == TRIALS
    assert {"lr", "weighting", "val/mean_score", "test/mean_score"} <= set(rows[0])
    # the first trial is the search space's default point
    assert any(r["weighting"] == "ls" and float(r["lr"]) == pytest.approx(2e-3) for r in rows)
    best = json.loads((tiny_study / "best.json").read_text())
    assert set(best["config"]) == {"lr", "weighting"}
    assert best["val/mean_score"] == max(
        float(r["val/mean_score"]) for r in rows if r["status"] == "completed"
    )
    assert {"large", "hue"} <= set(best["test"]["tasks"])
    assert "balanced_accuracy" in best["test"]["tasks"]["large"]


@pytest.mark.ray
def test_tensorboard_shows_per_trial_scalars(tiny_study):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = sorted(
        f for f in (tiny_study / "tune").rglob("events.out.tfevents.*") if f.parent.name != "train"
    )
    assert len(event_files) == TRIALS  # one per trial (Tune's); each trial's Train run adds its own
    for event_file in event_files:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        scalars = set(accumulator.Tags()["scalars"])
        assert "ray/tune/val/mean_score" in scalars
        assert "ray/tune/test/hue/balanced_accuracy" in scalars
        assert "ray/tune/train/loss/large" in scalars
        assert len(accumulator.Scalars("ray/tune/val/mean_score")) >= 1


@pytest.mark.ray
def test_trials_that_asha_stops_early_do_not_block_later_trials(tiny_study):
    """Train-inside-Tune: an early-stopped trial's Train run must free its workers (else the
    study would wait forever for resources and never write results.csv)."""
    with open(tiny_study / "results.csv") as handle:
        statuses = [r["status"] for r in csv.DictReader(handle)]
    assert "stopped early" in statuses
    assert set(statuses) <= {"completed", "stopped early"}
    assert len(statuses) == TRIALS
    # ...and hold no CPUs afterwards: with worker retries inside stopped trials, Train started a
    # new worker group as Tune killed the trial and leaked its placement group (seen here)
    assert LEFT_BEHIND == []


def test_asha_stops_at_rungs_but_lets_a_trial_finish_its_last_epoch():
    """Stopping a trial at its final report races its Train run's shutdown (a placement group
    can leak): the scheduler leaves the natural end to the trial, and still cuts at rungs."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from raymtl.tune.runner import FinishingASHA

    scheduler = FinishingASHA(
        metric="score", mode="max", max_t=4, grace_period=1, reduction_factor=2
    )
    good, bad = SimpleNamespace(trial_id="good"), SimpleNamespace(trial_id="bad")
    for trial in (good, bad):
        scheduler.on_trial_add(None, trial)

    def decide(trial, epoch, score):
        result = {"training_iteration": epoch, "score": score}
        return scheduler.on_trial_result(None, trial, result)

    assert decide(good, 1, 0.9) == TrialScheduler.CONTINUE
    assert decide(bad, 1, 0.1) == TrialScheduler.STOP  # below the rung's cutoff: ASHA's call
    for epoch in (2, 3):
        assert decide(good, epoch, 0.9) == TrialScheduler.CONTINUE
    assert decide(good, 4, 0.9) == TrialScheduler.CONTINUE  # plain ASHA says STOP here
    assert scheduler._num_stopped == 1


def test_best_trial_prefers_completed_trials_and_inverts_flat_metrics():
    rows = [
        {"status": "stopped early", "val/mean_score": 0.9},
        {"status": "completed", "val/mean_score": 0.7},
        {"status": "completed", "val/mean_score": float("nan")},
    ]
    assert pick_best(rows, "val/mean_score")["val/mean_score"] == 0.7
    flat = {"test/a/accuracy": 1.0, "test/mean_score": 0.5, "val/a/accuracy": 0.2}
    assert per_task_from_flat(flat, "test") == {"a": {"accuracy": 1.0}}


def test_help_documents_every_option():
    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text"


def _run_tune(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "raymtl.tune", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@functools.cache
def closed_port() -> int:
    """A local TCP port nothing listens on (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--dataset", "celebb"],
            "unknown dataset 'celebb'; available: celeba, chestxray14, nyuv2, synthetic, synthetic_dense, utkface",
        ),
        (["--backbone", "resnet19"], "unknown backbone 'resnet19'; available: densenet121"),
        (["--num-samples", "0"], "argument --num-samples: expected a positive integer, got '0'"),
        (["--scheduler", "pbt"], "argument --scheduler: invalid choice: 'pbt'"),
        (["--val-fraction", "1.5"], "--val-fraction must be in (0, 1), got 1.5"),
        (["--storage", "relative/dir"], "--storage must be an absolute path or a URI"),
        (["mtlue-typo"], "argument study: invalid choice: 'mtlue-typo'"),
        (["--address", "nowhere"], "--address must be 'auto' or HOST:PORT, got 'nowhere'"),
        (
            ["--address", f"127.0.0.1:{closed_port()}"],
            f"--address 127.0.0.1:{closed_port()}: no Ray cluster answers there",
        ),
    ],
)
def test_tune_cli_bad_input_is_one_line_status_2_and_writes_nothing(
    tmp_path, run_command, args, expected
):
    run_dir = tmp_path / "run"
    proc = run_command("raymtl.tune", *args, "--run-dir", run_dir, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]
    assert not run_dir.exists()


def test_tune_cli_rejects_a_bad_search_space_file(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("weighting: {type: categorical, choices: [ls, nash]}\n")
    proc = _run_tune(
        "victim", "--search-space", str(space), "--run-dir", str(tmp_path / "run"), cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert (
        f"search space {space}: weighting choice 'nash' is not a known weighting strategy"
        in proc.stderr
    )
    assert not (tmp_path / "run").exists()


def test_search_efficiency_judges_the_seed_averaged_curves(benchmark_script, capsys):
    """The benchmark's verdict: TPE's seed-averaged best-so-far curve must reach random search's
    averaged final best within half the budget; one lucky seed does not decide it."""
    module = benchmark_script("search_efficiency")
    assert module.best_so_far([3.0, 1.0, 2.0, 0.5]) == [3.0, 1.0, 1.0, 0.5]
    assert module.share_to_reach([3, 2, 1, 1], [3, 3, 2, 2]) == 0.5
    assert module.share_to_reach([3, 3, 3, 3], [3, 3, 2, 2]) is None
    fast = {("tpe", 0): [3, 1, 1, 1], ("random", 0): [3, 2, 2, 1.5]}
    fast |= {("tpe", 1): [3, 2, 1, 1], ("random", 1): [3, 3, 2, 1.5]}
    assert module.mean_curve(fast, "tpe") == [3, 1.5, 1, 1]
    assert module.summarise(fast, 4) is True
    # seed 1's TPE stalls: the averaged TPE curve never reaches random's averaged final best
    slow = fast | {("tpe", 1): [3, 3, 3, 2.5]}
    assert module.summarise(slow, 4) is False
    printed = capsys.readouterr().out
    assert "| mean of 2 seeds | 1.5000 | 1.7500 | not within budget | > 100 % |" in printed
    assert "NOT met" in printed


def test_unlearn_study_repeats_average_runs_with_successive_seeds():
    """--repeats N: a trial's objective is the mean over N unlearning runs with batch-order seeds
    seed … seed+N−1 (Ray-free scoring), with their spread; one run's UIS depends on the seed."""
    import dataclasses
    import statistics

    from raymtl.tune.cli import study_inputs
    from raymtl.tune.study import STUDIES
    from raymtl.tune.unlearn import OBJECTIVE, score_options

    tiny = ["--n-train", "120", "--n-test", "48", "--image-size", "16", "--epochs", "2"]
    args = build_parser().parse_args(
        ["unlearn", *tiny, "--forget-fraction", "0.1", "--repeats", "2"]
    )
    assert args.repeats == 2
    study = STUDIES.create("unlearn")
    shared = study.prepare(study_inputs(args, study, storage="unused"))["shared"]
    assert shared["repeats"] == 2
    options = {"steps": 6, "lr": 2e-3, "rank": 2, "alpha": 0.5}
    first = score_options(options, shared, 1)
    later = dataclasses.replace(shared["data"], seed=shared["data"].seed + 1)
    second = score_options(options, {**shared, "data": later}, 1)
    assert first[OBJECTIVE] != second[OBJECTIVE]
    both = score_options(options, shared, 2)
    pair = [first[OBJECTIVE], second[OBJECTIVE]]
    assert both[OBJECTIVE] == pytest.approx(statistics.fmean(pair))
    assert both["val/uis_sd"] == pytest.approx(statistics.stdev(pair))
    assert both["test/uis_mean"] == pytest.approx(
        (first["test/uis_mean"] + second["test/uis_mean"]) / 2
    )
    assert first["val/uis_sd"] == 0.0 and both["repeats"] == 2
