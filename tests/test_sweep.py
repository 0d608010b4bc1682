"""Sweeps: real Optuna studies of real (tiny) trainings, logged to a real MLflow store."""


import mlflow
import optuna
import pandas as pd
import pytest

from cnnexp import SWEEPS_DIR
from cnnexp.config import compose_config
from cnnexp.errors import ConfigError, StorageError
from cnnexp.model.layers import layers_from_config
from cnnexp.model.shapes import validate_architecture
from cnnexp.study import engine, objective, parent, rounds, space
from cnnexp.study import optuna_study as study
from cnnexp.study.space import load_sweep
from tests.conftest import CIFAR_JPEG
from tests.helpers import config_seeds, finish, mlflow_runs, states, write_sweep

needs_cifar = pytest.mark.skipif(not CIFAR_JPEG.exists(), reason=f"{CIFAR_JPEG} is not there")


@needs_cifar
def test_sweep_records_trials_in_optuna_mlflow_and_the_report(tmp_path):
    path = write_sweep(tmp_path, {"kernel": "choice(2,3)", "train.batch_size": "choice(50,100)"},
                       settings={"n_trials": 4, "sampler": {"name": "grid", "seed": 0}})
    s = load_sweep(str(path))
    result = engine.optimize(s, show_progress=False)
    assert finish(s, result) == 0
    assert states(result) == ["COMPLETE"] * 4
    assert {(t.params["kernel"], t.params["train.batch_size"]) for t in result.trials} == {
        (2, 50), (2, 100), (3, 50), (3, 100)}
    assert all(t.user_attrs["command"].startswith("python -m cnnexp.run dataset=folder") for t in result.trials)
    assert result.metric_names == ["val_accuracy"]

    client, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    by_number = {int(c.data.tags["optuna.trial_number"]): c for c in children}
    for trial in result.trials:
        child = by_number[trial.number]
        assert child.info.run_name == f"t{trial.number} k{trial.params['kernel']} bs{trial.params['train.batch_size']}"
        assert child.data.tags["optuna.trial_state"] == "COMPLETE" and child.info.status == "FINISHED"
        assert child.data.metrics["final/test_accuracy"] == pytest.approx(trial.user_attrs["test_accuracy"])
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [1, 2] and history[-1].value == pytest.approx(trial.value)
        assert f"+kernel={trial.params['kernel']}" in child.data.tags["cnnexp.command"]
        # What is logged is what was trained: the resolved layers, quarter width, the trial's kernel.
        k = trial.params["kernel"]
        assert child.data.params["model.layers_resolved"] == f"c16k{k} c16k{k} m2 c32k{k} m2 c32k{k} f d1024 d10"
        assert child.data.params["train.lr"] == "0.0003"  # Adam's default here, not SGD's 0.01
        assert int(child.data.params["model.num_params"]) == trial.user_attrs["num_params"]
    best = result.best_trial
    best_child = by_number[best.number]
    assert "model_summary.txt" in {a.path for a in client.list_artifacts(best_child.info.run_id)}
    # The best model is registered, and loadable by its alias.
    version = client.get_model_version_by_alias("cnnexp-tiny", "champion")
    assert version.run_id == best_child.info.run_id
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    loaded = mlflow.pyfunc.load_model("models:/cnnexp-tiny@champion")
    assert loaded.metadata.signature is not None
    assert parents[0].data.tags["cnnexp.best_trial"] == str(best.number)
    assert parents[0].data.tags["cnnexp.best_run_id"] == best_child.info.run_id
    assert parents[0].data.params["space.kernel"] == "choice(2,3)"

    out = tmp_path / "out" / "tiny"
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 4 and {"kernel", "train.batch_size", "seed", "test_accuracy", "flops"} <= set(trials.columns)
    effects = pd.read_csv(out / "effects.csv")
    assert list(effects.columns[:9]) == ["question", "parameter", "verdict", "decided_by", "higher", "lower",
                                         "estimate", "ci_low", "ci_high"]
    assert {"kernel", "train.batch_size"} <= set(effects["parameter"])
    summary = (out / "summary.md").read_text()
    # a search names its keys
    assert summary.index("## Answers") < summary.index("## Questions") and "**kernel** (`kernel`" in summary
    for plot in ("history.png", "answers.png", "learning_curves.png", "score_vs_kernel.png",
                 "score_vs_train.batch_size.png"):
        assert (out / "plots" / plot).stat().st_size > 5000, plot
    parent_artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"trials.csv", "effects.csv", "summary.md", "plots"} <= parent_artifacts
    assert parents[0].data.metrics["trials_complete"] == 4


@needs_cifar
def test_a_redrawn_configuration_gets_the_next_seed_and_counts_as_a_replicate(tmp_path):
    """One configuration, three trials: seeds 0, 1, 2, never the same seed twice, so seed noise is real."""
    path = write_sweep(tmp_path, {"kernel": "choice(3)"}, settings={"n_trials": 3})
    s = load_sweep(str(path))
    result = engine.optimize(s, show_progress=False)
    assert [t.user_attrs["seed"] for t in result.trials] == [0, 1, 2]
    assert all(f"train.seed={t.user_attrs['seed']}" in t.user_attrs["command"] for t in result.trials[1:])
    values = [t.value for t in result.trials]
    assert len(set(values)) > 1  # genuinely different trainings, not identical reruns
    finish(s, result)
    summary = (tmp_path / "out" / "tiny" / "summary.md").read_text()
    assert "Noise: SD" in summary and "between runs of one configuration (2 df" in summary


@needs_cifar
def test_rerun_resumes_to_the_configured_total_without_duplicates(tmp_path):
    path = write_sweep(tmp_path, {"kernel": "choice(2,3)"}, settings={"n_trials": 2})
    first = engine.optimize(load_sweep(str(path)), show_progress=False)
    finished_before = {t.number: t.datetime_complete for t in first.trials}
    again = engine.optimize(load_sweep(str(path), ["sweep.n_trials=4"]), show_progress=False)
    assert len(again.trials) == 4
    assert {t.number: t.datetime_complete for t in again.trials if t.number < 2} == finished_before
    pairs = config_seeds(again)
    assert len(pairs) == len(set(pairs)) == 4  # the resumed study drew k2/k3 again: with new seeds
    _, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 4


@needs_cifar
def test_interrupted_sweep_marks_the_trial_and_resumes(tmp_path, monkeypatch):
    path = write_sweep(tmp_path, {"kernel": "choice(2,3,4)"}, settings={"n_trials": 3})
    real_run, calls = objective.run, []

    def interrupt_second_trial(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(objective, "run", interrupt_second_trial)
    with pytest.raises(KeyboardInterrupt):
        engine.optimize(load_sweep(str(path)), show_progress=False)
    s = load_sweep(str(path))
    reopened = study.load_study("tiny", str(s.settings.storage))
    # The interrupted trial is FAIL, and queued again (sweep.retry_failed=1) for the next run.
    assert states(reopened) == ["COMPLETE", "FAIL", "WAITING"]
    assert reopened.trials[1].user_attrs["error"].startswith("interrupted")
    assert reopened.trials[2].params == reopened.trials[1].params
    _, parents, children = mlflow_runs(tmp_path)
    assert parents[0].info.status == "KILLED"
    assert {c.data.tags["optuna.trial_state"]: c.info.status for c in children} == {
        "COMPLETE": "FINISHED", "FAIL": "KILLED"}

    resumed = engine.optimize(s, show_progress=False)
    # The retry runs first; the failed attempt doesn't count, so one more trial makes the total of 3.
    assert states(resumed) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.count_trials(resumed.trials) == 3 and "error" not in {
        k for k, v in resumed.trials[2].user_attrs.items() if v is not None}
    pairs = config_seeds(resumed)
    assert len(pairs) == len(set(pairs))  # a resumed study never trains a configuration twice with a seed
    _, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 4


@needs_cifar
def test_failing_trials_fail_alone_with_their_reason_and_a_bad_value_is_refused_before_any(tmp_path):
    # lr=1e30: a NaN loss, found only by training; it fails alone and the sweep goes on.
    path = write_sweep(tmp_path, {"train.lr": "choice(0.001,1e30)"},
                       settings={"n_trials": 2, "sampler": {"name": "grid", "seed": 0}})
    s = load_sweep(str(path))
    result = engine.optimize(s, show_progress=False)
    assert parent.end(result, parent.tracking_uri(s))  # a trial completed
    by_lr = {t.params["train.lr"]: t for t in result.trials}
    assert by_lr[0.001].state.name == "COMPLETE" and by_lr[1e30].state.name == "FAIL"
    assert "NonFiniteLossError: Training stopped: loss " in by_lr[1e30].user_attrs["error"]
    _, _, children = mlflow_runs(tmp_path)
    (failed,) = [c for c in children if c.data.tags["optuna.trial_state"] == "FAIL"]
    assert failed.info.status == "FAILED" and failed.data.tags["error"]
    # Pool size 64 shrinks the 32x32 map to nothing: known from the config, refused before the study exists.
    bad = write_sweep(tmp_path, {"model.layers.2.size": "choice(2,64)"}, name="bad")
    with pytest.raises(ConfigError, match=r"the trial model.layers.2.size=64 can't run: .*shrinks it below 1x1"):
        load_sweep(str(bad))


@needs_cifar
def test_a_sweep_where_no_trial_completes_exits_non_zero(tmp_path):
    path = write_sweep(tmp_path, {"train.lr": "choice(1e30,1e31)"}, settings={"n_trials": 2})
    s = load_sweep(str(path))
    assert finish(s, engine.optimize(s, show_progress=False)) == 1
    _, parents, _ = mlflow_runs(tmp_path)
    assert parents[0].info.status == "FAILED"


@needs_cifar
def test_median_pruner_prunes_a_trial_behind_the_median(tmp_path):
    path = write_sweep(tmp_path, {"kernel": "choice(3)"}, overrides=["train.epochs=3"], settings={
        "n_trials": 2, "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0}})
    s = load_sweep(str(path))
    opened = study.open_study(s.settings, s.space)
    # A finished trial that reached 0.9 at every epoch: the real one falls behind it at once.
    opened.add_trial(optuna.trial.create_trial(
        params={"kernel": 3}, distributions={"kernel": optuna.distributions.CategoricalDistribution([3])},
        value=0.9, intermediate_values={1: 0.9, 2: 0.9, 3: 0.9}))
    result = engine.optimize(s, show_progress=False)
    pruned = result.trials[1]
    assert pruned.state.name == "PRUNED" and list(pruned.intermediate_values) == [1]
    client, _, children = mlflow_runs(tmp_path)
    (child,) = children
    # Pruned is "stopped early by design": FINISHED, with the Optuna state as a tag and in the name.
    assert child.data.tags["optuna.trial_state"] == "PRUNED" and child.info.status == "FINISHED"
    assert child.info.run_name.endswith("(pruned)")
    assert len(client.get_metric_history(child.info.run_id, "val_accuracy")) == 1  # of 3 epochs
    assert not any((tmp_path / "checkpoints").rglob("*.h5"))  # no checkpoint left behind


def test_unwritable_output_folder_is_found_before_the_first_trial(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    path = write_sweep(tmp_path, {"kernel": "choice(3)"}, settings={"output_dir": str(blocker / "out")})
    with pytest.raises(StorageError, match=r"sweep.output_dir: can't write to .*not-a-folder/out"):
        engine.optimize(load_sweep(str(path)), show_progress=False)
    assert (not (tmp_path / "studies.db").exists()
            or not study.load_study("tiny", f"sqlite:///{tmp_path / 'studies.db'}").trials)


@needs_cifar
def test_a_failing_report_never_leaves_the_parent_run_running(tmp_path):
    path = write_sweep(tmp_path, {"kernel": "choice(3)"}, settings={"n_trials": 1})
    s = load_sweep(str(path))
    result = engine.optimize(s, show_progress=False)
    blocker = tmp_path / "blocked"
    blocker.write_text("")
    s.settings.output_dir = str(blocker)  # the report can't write: out/ is a file
    assert finish(s, result) == 2
    _, parents, _ = mlflow_runs(tmp_path)
    assert parents[0].info.status == "FINISHED"


@pytest.mark.parametrize("name", sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
def test_every_sweep_file_parses_and_its_trials_compose(name, tmp_path):
    s = load_sweep(name, [f"sweep.storage=sqlite:///{tmp_path / 's.db'}"])
    assert s.space and s.settings.n_trials >= 1
    assert type(study.make_pruner(s.settings)).__name__ == study.PRUNERS[s.settings.pruner.name]
    fresh = optuna.create_study(sampler=study.make_sampler(s.settings, s.space), direction="maximize")
    for _ in range(3):
        trial = fresh.ask()
        cfg = compose_config(space.trial_overrides(s, space.suggest(trial, s.space)))
        validate_architecture(layers_from_config(cfg), cfg.dataset.input_shape, cfg.dataset.num_classes,
                              cfg.model.padding)
        fresh.tell(trial, 0.5)


def test_search_space_from_the_command_line_in_hydras_grammar():
    s = load_sweep("quick", ["kernel=choice(2,4,6)", "train.lr=tag(log,interval(1e-4,1e-1))",
                                   "sweep.n_trials=5", "train.epochs=1"])
    assert s.settings.n_trials == 5 and "train.epochs=1" in s.overrides
    assert s.add_keys == {"kernel"}
    trial = optuna.create_study().ask()
    values = space.suggest(trial, s.space)
    assert values["kernel"] in (2, 4, 6) and 1e-4 <= values["train.lr"] <= 1e-1
    assert isinstance(trial.distributions["train.lr"], optuna.distributions.FloatDistribution)
    assert trial.distributions["train.lr"].log
    assert f"+kernel={values['kernel']}" in space.trial_overrides(s, values)
    assert space.distribution("e", "range(1,6)") == optuna.distributions.IntDistribution(1, 5)
    assert space.values_of(space.distribution("b", "range(0.1,0.4,0.1)")) == [0.1, 0.2, 0.3]
    with pytest.raises(ConfigError, match="n_trialz"):
        load_sweep("quick", ["sweep.n_trialz=5"])


@pytest.mark.parametrize("name", ["tpe", "random", "grid", "cmaes"])
def test_every_sampler_and_pruner_is_built_from_yaml(name):
    s = load_sweep("batch_epochs", [f"sweep.sampler.name={name}", "sweep.sampler.seed=3"])
    sampler = study.make_sampler(s.settings, s.space)
    assert type(sampler).__name__ == study.SAMPLERS[name]
    for pruner in study.PRUNERS:
        settings = load_sweep("batch_epochs", [f"sweep.pruner={{name: {pruner}}}"]).settings
        assert type(study.make_pruner(settings)).__name__ == study.PRUNERS[pruner]
    with pytest.raises(ConfigError, match="sweep.sampler.name='annealing' must be one of"):
        study.make_sampler(load_sweep("batch_epochs", ["sweep.sampler.name=annealing"]).settings, s.space)
    with pytest.raises(ConfigError, match="sweep.pruner"):
        study.make_pruner(load_sweep("batch_epochs", ["sweep.pruner={name: median, bogus: 1}"]).settings)


def test_the_study_refuses_trials_beyond_n_trials_but_runs_queued_ones(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = study.make_storage(url)
    optuna.create_study(storage=storage, study_name="cap")
    s = study.CappedStudy(study_name="cap", storage=storage, cap=2, lock_url=url)
    with pytest.raises(study.StudyFull):
        s.optimize(lambda t: t.suggest_int("a", 0, 9), n_trials=5)
    assert len(s.trials) == 2
    s.enqueue_trial({"a": 1}, user_attrs={"repeat_of": 0})
    s.optimize(lambda t: t.suggest_int("a", 0, 9), n_trials=1)  # the queue is not capped
    assert len(s.trials) == 3 and study.count_trials(s.trials) == 2


def test_unwritable_storage_folder_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StorageError, match=r"sweep.storage: can't write to .*file/sub"):
        study.make_storage(f"sqlite:///{blocker / 'sub' / 's.db'}")


@needs_cifar
def test_sweep_cli_prints_one_line_per_trial_start_and_end(tmp_path):
    from tests.conftest import run_cli

    path = write_sweep(tmp_path, {"kernel": "choice(3,5)"}, settings={"n_trials": 2, "sampler": {"name": "grid"}})
    proc = run_cli("cnnexp.sweep", "--sweep", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "trial 0: kernel=" in out and "trial 1: kernel=" in out
    assert "val_accuracy=" in out and "## Answers" in out
    assert "Creating initial MLflow database tables" not in proc.stderr + out  # library noise is off
    assert "Traceback" not in proc.stderr
    assert all(len(line) <= 100 for line in out[out.index("\nparameter "):].splitlines()[:6])


@needs_cifar
@pytest.mark.parametrize("log_models", ["all", "none"])
def test_log_models_all_or_none(tmp_path, log_models):
    path = write_sweep(tmp_path, {"kernel": "choice(3,5)"},
                       settings={"n_trials": 2, "sampler": {"name": "grid"}, "log_models": log_models})
    result = engine.optimize(load_sweep(str(path)), show_progress=False)
    assert states(result) == ["COMPLETE"] * 2
    client, _, children = mlflow_runs(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = mlflow.search_logged_models(experiment_ids=[children[0].info.experiment_id], output_format="list")
    assert {m.source_run_id for m in logged} == ({c.info.run_id for c in children} if log_models == "all" else set())
    assert not client.search_registered_models()  # only `best` registers a champion


@needs_cifar
def test_the_estimate_says_what_it_counts(tmp_path, monkeypatch):
    from cnnexp.plan import Timing
    from cnnexp.study import budget

    path = write_sweep(tmp_path, {"kernel": "choice(3,5)"}, settings={"n_trials": 4})
    s = load_sweep(str(path))
    message = budget.estimate(s.overrides, 4, 2, 900)  # one real timing of the base configuration
    assert message.startswith("No GPU found") and "up to 4 trials x 2 epochs x 900 training images" in message
    rate = float(message.split("at ~")[1].split(" images/s")[0])
    minutes = float(message.split("roughly ")[1].split(" min")[0])
    assert minutes >= 4 * 2 * 900 / rate / 60 - 0.05  # at least the training images at the rate it states
    # The arithmetic on a known cost model: trials x (fixed + epochs x images x per image + a validation per epoch).
    monkeypatch.setattr(budget, "time_config", lambda overrides, datasets=None: Timing(30.0, 0.01, 5.0))
    message = budget.estimate(s.overrides, 6, 3, 1000)
    assert "at ~100 images/s" in message and "roughly 7.5 min" in message  # 6 x (30 + 30 + 15) s


@needs_cifar
def test_repeats_are_genuine_replicates_outside_the_trial_count(tmp_path):
    path = write_sweep(tmp_path, {"kernel": "choice(3,5)"},
                       settings={"n_trials": 2, "sampler": {"name": "grid"}, "repeats": 2, "repeat_top": 1})
    s = load_sweep(str(path))
    result = engine.optimize(s, show_progress=False)
    main = [t for t in result.trials if t.user_attrs.get("repeat_of") is None]
    repeats = [t for t in result.trials if t.user_attrs.get("repeat_of") is not None]
    assert len(main) == 2 and len(repeats) == 2 and study.count_trials(result.trials) == 2
    best = max(main, key=lambda t: t.value)
    assert {t.user_attrs["repeat_of"] for t in repeats} == {best.number}
    assert sorted(t.user_attrs["seed"] for t in [best, *repeats]) == [0, 1, 2]  # three different seeds
    assert all(t.params == best.params and t.state.name == "COMPLETE" for t in repeats)
    assert rounds.enqueue_repeats(result, s.settings) == 0  # a rerun queues nothing more
    _, _, children = mlflow_runs(tmp_path)
    assert {c.info.run_name for c in children if "cnnexp.repeat_of" in c.data.tags} == {
        f"t{best.number} repeat seed 1", f"t{best.number} repeat seed 2"}


@needs_cifar
def test_a_broken_mlflow_store_never_decides_a_sweep(tmp_path):
    blocker = tmp_path / "store-is-a-file"
    blocker.write_text("")
    path = write_sweep(tmp_path, {"kernel": "choice(3,5)"}, settings={"n_trials": 2, "sampler": {"name": "grid"}},
                       overrides=[f"tracking.uri=sqlite:///{blocker / 'mlflow.db'}"])
    s = load_sweep(str(path))
    with pytest.warns(UserWarning, match="store-is-a-file.*Not logged to MLflow"):
        result = engine.optimize(s, show_progress=False)
    assert states(result) == ["COMPLETE"] * 2 and all(t.value > 0 for t in result.trials)
    assert finish(s, result) == 0 and (tmp_path / "out" / "tiny" / "effects.csv").exists()


@needs_cifar
def test_recycled_workers_finish_queued_cells_and_repeats(tmp_path):
    """A worker that restarts every trial (sweep.recycle_after=1) still runs everything queued, then stops."""
    path = write_sweep(tmp_path, {"kernel": "choice(3,5)"},
                       settings={"n_trials": 2, "sampler": {"name": "grid"}, "repeats": 1, "repeat_top": 1})
    restarts = 0
    while True:
        try:
            result = engine.optimize(load_sweep(str(path)), show_progress=False, recycle_after=1)
            break
        except engine.RecycleProcess:
            restarts += 1
            assert restarts < 5, "a recycled worker never finishes"
    assert restarts == 2 and states(result) == ["COMPLETE"] * 3
    assert sum(t.user_attrs.get("repeat_of") is not None for t in result.trials) == 1


@needs_cifar
def test_a_multi_objective_study_draws_its_front_and_registers_the_most_accurate_feasible_model(tmp_path):
    path = write_sweep(tmp_path, {"kernel": "choice(2,3,5)"}, settings={
        "n_trials": 3, "sampler": {"name": "grid"}, "log_models": "all",
        "constraints": ["model.flops_per_image <= 20000000"],
        "objectives": [{"metric": "model.flops_per_image", "direction": "minimize"}]})
    with pytest.raises(ConfigError, match="sweep.constraints need a sampler that takes them"):
        engine.optimize(load_sweep(str(path)), show_progress=False)  # grid can't take constraints
    path = write_sweep(tmp_path, {"kernel": "choice(2,3,5)"}, name="front", settings={
        "n_trials": 3, "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 3}, "log_models": "all",
        "constraints": ["model.flops_per_image <= 20000000"],  # kernel 5 (30 MFLOPs here) is beyond it
        "objectives": [{"metric": "model.flops_per_image", "direction": "minimize"}], "study_name": "front"})
    s = load_sweep(str(path))
    result = engine.optimize(s, show_progress=False)
    assert all(len(t.values) == 2 for t in result.trials)
    champion = parent.register_champion(s, result)
    by_number = {t.number: t for t in result.trials}
    assert champion is not None and by_number[champion].user_attrs["flops"] <= 20_000_000
    feasible = [t for t in result.trials if t.user_attrs["flops"] <= 20_000_000]
    assert by_number[champion].values[0] == max(t.values[0] for t in feasible)
    client, _, _ = mlflow_runs(tmp_path)
    version = client.get_model_version_by_alias("cnnexp-front", "champion")
    assert version.run_id == by_number[champion].user_attrs["mlflow_run_id"]
    assert finish(s, result) == 0
    summary = (tmp_path / "out" / "front" / "summary.md").read_text()
    assert "## Accuracy against cost" in summary and "(champion, registered)" in summary
    assert (tmp_path / "out" / "front" / "plots" / "pareto.png").stat().st_size > 5000
