"""Designed studies and budgets: the cells, the plan printed before training, resumes that keep it."""

import pytest
import yaml

from cnnexp.errors import ConfigError
from cnnexp.sweep import budget, engine
from cnnexp.sweep.design import load_design
from cnnexp.sweep.space import load_sweep
from tests.conftest import CIFAR_JPEG


def test_the_default_study_asks_all_five_questions():
    s = load_sweep("seed_questions", ["dataset=folder", f"dataset.path={CIFAR_JPEG}"])
    cells = s.design.cells()
    assert {"kernel", "width", "train.batch_size", "task"} == set(s.space)
    assert [c["kernel"] for c in cells if c["task"] == "cifar10" and c["width"] == 0.5
            and c["train.batch_size"] == 100] == [3, 2, 4, 5, 6, 7]  # baseline first, even kernels too
    assert {"task": "mnist"} in cells and s.settings.n_trials == len(cells) * 3 == 33
    assert "train.epochs" not in s.space  # epochs come from the learning curves
    assert s.settings.pruner.name == "none" and budget.parse_budget(s.settings.budget) == 2400


def test_data_given_for_the_study_reaches_the_main_task_and_never_an_arm_with_its_own_dataset(tmp_path):
    from cnnexp.config import compose_config
    from cnnexp.sweep.space import trial_overrides

    sweep_file = tmp_path / "arms.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "overrides": ["dataset.test_limit=300"],
        "design": {"seeds": 2, "baseline": {"kernel": 3}, "vary": {"kernel": [3, 5]}, "main": "cifar10",
                   "arms": {"mnist": ["dataset=mnist", "model=mnist_cnn"], "wide": ["+width=2"]}}}))
    s = load_sweep(str(sweep_file), ["dataset=folder", f"dataset.path={CIFAR_JPEG}", "dataset.train_limit=900"])
    main = compose_config(trial_overrides(s, {"task": "cifar10", "kernel": 5}))
    mnist = compose_config(trial_overrides(s, {"task": "mnist"}))
    wide = compose_config(trial_overrides(s, {"task": "wide"}))
    assert (main.dataset.name, main.dataset.train_limit, main.dataset.test_limit) == ("folder", 900, 300)
    assert (mnist.dataset.name, mnist.dataset.train_limit, mnist.dataset.test_limit, mnist.model.name) == \
        ("mnist", None, None, "mnist_cnn")
    assert (wide.dataset.name, wide.dataset.train_limit, wide.width) == ("folder", 900, 2)  # no dataset of its own


@pytest.mark.parametrize(("design", "message"), [
    ({"seeds": 1, "baseline": {"kernel": 3}, "vary": {"kernel": [3, 5]}}, "design.seeds=1 must be an integer >= 2"),
    ({"baseline": {}, "vary": {"kernel": [3, 5]}}, "design.vary.kernel: give its baseline value"),
    ({"baseline": {"kernel": 4}, "vary": {"kernel": [3, 5]}}, r"the baseline \(4\) among them"),
    ({"baseline": {"kernel": 3}, "vary": {"kernel": [3, 5]}, "sedes": 2}, r"unknown key\(s\) \['sedes'\]"),
])
def test_a_bad_design_is_one_clear_error(design, message):
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError, match=message):
        load_design(OmegaConf.create(design))


@pytest.mark.parametrize(("text", "seconds"), [("45m", 2700), ("2h", 7200), ("900s", 900), ("90", 90), (None, None)])
def test_budgets_are_durations(text, seconds):
    assert budget.parse_budget(text) == seconds
    with pytest.raises(ConfigError, match="sweep.budget='soon'"):
        budget.parse_budget("soon")


def test_the_plan_fits_the_budget_is_printed_first_and_kept_on_resume(tmp_path, monkeypatch, capsys, cifar_jpeg):
    # A configuration costs 1 ms per image here, whatever it is: the plan's arithmetic is what is tested.
    calls = []
    monkeypatch.setattr(budget, "seconds_per_image", lambda overrides: calls.append(1) or 1e-3)
    doc = {"overrides": ["dataset=folder", f"dataset.path={cifar_jpeg}", "dataset.train_limit=20000",
                         "train.epochs=2", "tracking=off"],
           "design": {"seeds": 2, "baseline": {"kernel": 3}, "vary": {"kernel": [3, 5]}, "main": "cifar10"},
           "sweep": {"budget": "2m", "storage": f"sqlite:///{tmp_path / 's.db'}", "output_dir": str(tmp_path / "out")}}
    path = tmp_path / "planned.yaml"
    path.write_text(yaml.safe_dump(doc))
    s = load_sweep(str(path))
    study = engine.open_study(s.settings, s.space)
    engine.apply_plan(s, study)
    plan = budget.Plan(**study.user_attrs["plan"])
    # 4 trials x 2 epochs x 0.9 n images x 1 ms x 1.25 + 4 x 3 s <= 120 s  ->  n <= 12,000; steps of 10%
    assert 0.9 * 12000 <= plan.train_limit <= 12000 and plan.predicted_s <= 120
    assert plan.train_limit < plan.full_train == 20000
    assert s.overrides[-1] == f"dataset.train_limit={plan.train_limit}"
    printed = capsys.readouterr().out
    assert "Plan for sweep.budget=2 min" in printed and f"{plan.train_limit:,} of the 20,000 training images" in printed

    resumed = load_sweep(str(path), ["sweep.budget=1h"])  # a resumed study keeps its data size
    calls.clear()
    engine.apply_plan(resumed, study)
    assert not calls and resumed.overrides[-1] == f"dataset.train_limit={plan.train_limit}"
    assert engine.enqueue_design(study, s) == 4 and engine.enqueue_design(study, s) == 0  # idempotent
