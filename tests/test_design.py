"""Designed studies and budgets: the cells, the plan printed before training, resumes that keep it."""

import dataclasses
import time

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml

from cnnexp import record
from cnnexp.design import load_design
from cnnexp.errors import ConfigError
from cnnexp.plan import Timing
from cnnexp.study import budget, engine, rounds
from cnnexp.study.optuna_study import open_study
from cnnexp.study.settings import parse_budget
from cnnexp.study.space import load_sweep
from tests.conftest import CIFAR_JPEG


def test_the_default_study_asks_all_five_questions():
    s = load_sweep("seed_questions")
    cells = s.design.cells()
    assert {"kernel", "width", "train.batch_size", "task"} == set(s.space)
    assert [c["kernel"] for c in cells if c["task"] == "cifar10" and c["width"] == 0.25
            and c["train.batch_size"] == 100] == [3, 2, 4, 5]  # baseline first, even kernels too
    assert {"task": "mnist"} in cells and {"task": "epochs_x4"} in cells
    # The baseline gets about sqrt(7) times the seeds of the 7 cells compared with it.
    first = dict((str(c), n) for c, n in s.design.first_round())
    assert first[str(cells[0])] == 11 and first[str(cells[1])] == 4 and s.settings.n_trials == 11 + 4 * 9
    # One long arm answers the epochs question (the learning rate is constant), with seeds of its own.
    assert s.design.arms["epochs_x4"][-2:] == ["train.epochs=12", "train.seed=1000"]
    assert "train.epochs" not in s.space
    assert s.settings.pruner.name == "none" and parse_budget(s.settings.budget) == 2880
    assert s.answers.margin == 0.015
    # The questions are the sweep file's: numbered and named there, the batch size also compared at equal updates.
    titles = {key: q.title for key, q in s.design.questions.items()}
    assert titles == {"kernel": "2.i Kernel size", "width": "2.ii Filters", "train.batch_size": "3.i Batch size",
                      "train.epochs": "3.ii Epochs", "mnist": "4 MNIST CNN"}
    assert s.design.questions["train.batch_size"].compare_at == ("updates", "seconds")


def test_data_given_for_the_study_reaches_the_main_task_and_never_an_arm_with_its_own_dataset(tmp_path):
    from cnnexp.config import compose_config
    from cnnexp.study.space import trial_overrides

    sweep_file = tmp_path / "arms.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "overrides": ["dataset.test_limit=300"],
        "design": {"seeds": 2, "baseline": {"kernel": 3}, "vary": {"kernel": [3, 5]}, "main": "cifar10",
                   "arms": {"mnist": ["dataset=mnist", "model=mnist_cnn"], "wide": ["+width=2"]}}}))
    s = load_sweep(str(sweep_file), ["dataset=folder", f"dataset.path={CIFAR_JPEG}", "dataset.train_limit=900"])
    plan = ["dataset.train_limit=800"]  # the plan's rung reaches each trial as a value, after the study's own data
    main = compose_config(trial_overrides(s, {"task": "cifar10", "kernel": 5}, plan))
    mnist = compose_config(trial_overrides(s, {"task": "mnist"}, plan))
    wide = compose_config(trial_overrides(s, {"task": "wide"}, plan))
    assert (main.dataset.name, main.dataset.train_limit, main.dataset.test_limit) == ("folder", 800, 300)
    assert (mnist.dataset.name, mnist.dataset.train_limit, mnist.dataset.test_limit, mnist.model.name) == \
        ("mnist", None, None, "mnist_cnn")
    assert (wide.dataset.name, wide.dataset.train_limit, wide.width) == ("folder", 800, 2)  # no dataset of its own
    assert "dataset.train_limit=800" not in s.overrides  # never appended to the sweep's own overrides


@pytest.mark.parametrize(("design", "message"), [
    ({"seeds": 1, "baseline": {"kernel": 3}, "vary": {"kernel": [3, 5]}}, "design.seeds=1 must be an integer >= 2"),
    ({"baseline": {}, "vary": {"kernel": [3, 5]}}, "design.vary.kernel: give its baseline value"),
    ({"baseline": {"kernel": 4}, "vary": {"kernel": [3, 5]}}, r"the baseline \(4\) among them"),
    ({"baseline": {"kernel": 3}, "vary": {"kernel": [3, 5]}, "sedes": 2}, r"unknown key\(s\) \['sedes'\]"),
])
def test_a_bad_design_is_one_clear_error(design, message):
    with pytest.raises(ConfigError, match=message):
        load_design(design)


@pytest.mark.parametrize(("text", "seconds"), [("45m", 2700), ("2h", 7200), ("900s", 900), ("90", 90), (None, None)])
def test_budgets_are_durations(text, seconds):
    assert parse_budget(text) == seconds
    with pytest.raises(ConfigError, match="sweep.budget='soon'"):
        parse_budget("soon")


def test_the_plan_picks_a_rung_of_the_ladder_prints_its_pin_first_and_keeps_it_on_resume(tmp_path, monkeypatch, capsys,
                                                                                      cifar_jpeg):
    # A configuration costs 1 s per trial plus 1 ms per image and epoch here, whatever it is:
    # the plan's arithmetic is what is tested.
    calls = []
    monkeypatch.setattr(budget, "time_config", lambda overrides, datasets=None, cap=None: calls.append(1) or Timing(
        fixed=1.0, per_image=1e-3, per_epoch=0.0))
    doc = {"overrides": ["dataset=folder", f"dataset.path={cifar_jpeg}", "train.epochs=2", "tracking=off"],
           "design": {"seeds": 2, "baseline": {"kernel": 3}, "vary": {"kernel": [3, 5]}, "main": "cifar10"},
           "answers": {"looks": 1},
           "sweep": {"budget": "2m", "storage": f"sqlite:///{tmp_path / 's.db'}", "output_dir": str(tmp_path / "out")}}
    path = tmp_path / "planned.yaml"
    path.write_text(yaml.safe_dump(doc))
    s = load_sweep(str(path))
    study = open_study(s.settings, s.space)
    budget.apply_plan(s, study)
    plan = record.read_study(study).plan
    # 2 + 2 trials (the baseline: sqrt(1) x 2) x (1 s + 2 epochs x n x 1 ms) <= 120 s  ->  n <= 14,500: the rung 8,000
    assert plan.train_limit == 8000 and plan.first_round_s <= 120 and len(calls) == 2 and not plan.pinned
    assert plan.full_train == 50000 and plan.next_rung() == 16000
    printed = capsys.readouterr().out
    assert "Plan for sweep.budget=2 min" in printed and "8,000 of the 50,000 training images" in printed
    assert "This regime anywhere: dataset.train_limit=8000." in printed

    resumed = load_sweep(str(path), ["sweep.budget=1h"])  # a resumed study keeps its data size, and says no plan again
    calls.clear()
    assert budget.apply_plan(resumed, study).train_limit == 8000 and not calls
    assert "Plan for" not in capsys.readouterr().out
    assert rounds.enqueue_design(study, s) == 4 and rounds.enqueue_design(study, s) == 0  # idempotent

    pinned = load_sweep(str(path), ["dataset.train_limit=2000", "sweep.study_name=pinned"])
    made = budget.apply_plan(pinned, open_study(pinned.settings, pinned.space))
    assert made.pinned and made.train_limit == 2000 and made.pin == "dataset.train_limit=2000"


@pytest.mark.parametrize("budget_text", ["1s", "20s"])
def test_a_budget_too_small_for_the_study_says_the_smallest_that_fits(tmp_path, monkeypatch, budget_text, cifar_jpeg):
    monkeypatch.setattr(budget, "time_config", lambda overrides, datasets=None, cap=None: Timing(5.0, 1e-3, 0.0))
    doc = {"overrides": ["dataset=folder", f"dataset.path={cifar_jpeg}", "tracking=off"],
           "design": {"seeds": 2, "baseline": {"kernel": 3}, "vary": {"kernel": [3, 5]}},
           "sweep": {"budget": budget_text, "storage": f"sqlite:///{tmp_path / 's.db'}"}}
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(doc))
    s = load_sweep(str(path))
    with pytest.raises(ConfigError, match=r"sweep.budget=.* can't fit this study: .* give sweep.budget=\d+m or more"):
        budget.apply_plan(s, open_study(s.settings, s.space))


def test_a_designed_study_looks_after_each_round_and_adds_seeds_where_an_answer_is_open(tmp_path, cifar_jpeg):
    """Real training, tiny: two looks, the second round's runs go to the undecided question's cells."""
    from cnnexp import record
    from tests.conftest import tracking_overrides

    doc = {"overrides": ["dataset=folder", f"dataset.path={cifar_jpeg}", "dataset.test_limit=300",
                         "dataset.eval_limit=500", "train.epochs=2", "+width=0.125", "train.optimizer=adam",
                         *tracking_overrides(tmp_path)],
           # A question made up here, in the sweep file alone: the study and its report need nothing else.
           "design": {"seeds": 2, "baseline": {"kernel": 3, "train.lr": 0.001}, "main": "cifar10", "epochs": [2],
                      "vary": {"kernel": [3, 5], "train.lr": [0.001, 0.003]},
                      "questions": {"train.lr": {"number": "5", "label": "Learning rate (made up)",
                                                 "note": "A question no code knows."}}},
           "answers": {"margin": 0.001, "looks": 2, "confirm": False},  # no tiny study settles that: a 2nd round
           "sweep": {"budget": "100s", "storage": f"sqlite:///{tmp_path / 's.db'}", "output_dir": str(tmp_path / "out"),
                     "estimate": False, "system_metrics": False, "log_models": "none"}}
    path = tmp_path / "rounds.yaml"
    path.write_text(yaml.safe_dump(doc))
    s = load_sweep(str(path))
    study = engine.optimize(s, show_progress=False)
    facts, records = record.read_study(study), record.read_trials(study)
    assert [entry.round for entry in facts.rounds] == [1, 2] and facts.rounds[-1].final
    assert facts.rounds[0].alpha < facts.rounds[1].alpha and sum(e.alpha for e in facts.rounds) == pytest.approx(0.05)
    assert facts.rounds[-1].look.factors["kernel"].alpha == pytest.approx(facts.rounds[-1].alpha)  # the answers, kept
    second = [r for r in records if r.round == 2]
    assert second and all(r.complete for r in records)
    assert {r.params["task"] for r in second} <= {"cifar10", "epochs_x2"}
    assert all(r.predicted_s for r in records)  # the planner's prediction is kept beside what it took
    from tests.helpers import finish

    assert finish(s, study) == 0
    effects = pd.read_csv(tmp_path / "out" / "rounds" / "effects.csv")
    assert {"kernel", "train.lr", "train.epochs"} <= set(effects["parameter"])
    assert "5 Learning rate (made up)" in set(effects["question"])
    summary = (tmp_path / "out" / "rounds" / "summary.md").read_text()
    assert "**5 Learning rate (made up)** (`train.lr`" in summary and "A question no code knows." in summary
    assert "Looks (each with its share of the error rate)" in summary


@pytest.mark.alone  # it measures CPU seconds beside a competitor of its own: no other test beside it
def test_a_process_competing_for_a_core_during_the_timing_does_not_move_the_rung(tmp_path, cifar_jpeg, capsys):
    """Real timings of the default study's quarter-width model, alone and beside a process that keeps one of the two
    cores busy: the rung is chosen on the work (CPU seconds, a median over single batches), so it stays."""
    import subprocess
    import sys

    from cnnexp.run import DatasetMemo

    doc = {"overrides": ["dataset=folder", f"dataset.path={cifar_jpeg}", "dataset.test_limit=500",
                         "dataset.eval_limit=500", "+width=0.25", "train.optimizer=adam", "tracking=off"],
           "design": {"seeds": 2, "baseline": {"kernel": 3}, "vary": {"kernel": [3, 5]}},
           "answers": {"looks": 1}, "sweep": {"budget": "1h", "storage": f"sqlite:///{tmp_path / 's.db'}"}}
    (tmp_path / "ladder.yaml").write_text(yaml.safe_dump(doc))
    s = load_sweep(str(tmp_path / "ladder.yaml"))
    cells, full, memo = budget.planned_cells(s), budget.full_train(s), DatasetMemo()

    def timed():
        return {c.cell: budget.time_config(c.overrides, memo, cap=full) for c in cells}

    alone = timed()
    # A budget that puts the rung 2,000 in the middle of its window (geometric): between 2,000 fitting and 4,000 not.
    window = np.sqrt(budget._total(cells, alone, 2000, work=True) * budget._total(cells, alone, 4000, work=True))
    first = budget.plan(cells, window, full, 1.0, timings=dict(alone))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        began = time.monotonic()
        loaded = timed()
        elapsed = time.monotonic() - began
        competitor = sum(psutil.Process(busy.pid).cpu_times()[:2])  # user + system seconds it took from us
    finally:
        busy.kill()
    second = budget.plan(cells, window, full, 1.0, timings=dict(loaded))
    wall = np.median([loaded[c].per_image / alone[c].per_image for c in alone])
    work = np.median([loaded[c].cpu_per_image / alone[c].cpu_per_image for c in alone])
    # What a plan on wall seconds (the old planner's) would have chosen from the same loaded timings.
    on_wall = budget.plan(cells, window, full, 1.0, timings={c: dataclasses.replace(t, cpu_per_image=0.0)
                                                             for c, t in loaded.items()})
    with capsys.disabled():
        print(f"\nwith a competing process: wall per image x{wall:.2f}, CPU per image x{work:.2f}; "
              f"rung {first.train_limit} alone, {second.train_limit} beside it ({on_wall.train_limit} on wall seconds)")
    assert competitor > 0.5 * elapsed  # the competitor was real: it held a core for most of the loaded timing
    assert first.train_limit == second.train_limit == 2000  # yet the rung, chosen on CPU seconds, stays
