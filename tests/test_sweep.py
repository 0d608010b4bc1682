"""Sweeps: real Optuna studies of real (tiny) trainings, logged to a real MLflow store."""

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from cnnexp import SWEEPS_DIR, sweep
from cnnexp.config import compose_config
from cnnexp.model import layers_from_config, validate_architecture
from tests.conftest import CIFAR_JPEG, tracking_overrides


def write_sweep(tmp_path, params, settings=None, overrides=(), name="tiny"):
    """A sweep YAML on a tiny real subset, with every store and output under tmp_path."""
    doc = {
        "overrides": [
            "dataset=folder", f"dataset.path={CIFAR_JPEG}", "dataset.train_limit=1000",
            "dataset.test_limit=300", "+width=0.25", "train.epochs=1", *tracking_overrides(tmp_path), *overrides,
        ],
        "sweep": {"n_trials": 3, "storage": f"sqlite:///{tmp_path / 'studies.db'}",
                  "output_dir": str(tmp_path / "out"), "estimate": False,
                  "sampler": {"name": "tpe", "seed": 0}, **(settings or {})},
        "params": params,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def mlflow_runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cnnexp")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    parents = [r for r in runs if r.data.tags.get("cnnexp.role") == "study"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def states(study):
    return [t.state.name for t in sorted(study.trials, key=lambda t: t.number)]


@pytest.fixture(autouse=True)
def _needs_cifar(cifar_jpeg):
    pass


def test_sweep_records_trials_in_optuna_mlflow_and_the_report(tmp_path):
    path = write_sweep(tmp_path, {"kernel": "choice(2,3)", "train.batch_size": "choice(50,100)"},
                       settings={"n_trials": 4, "sampler": {"name": "grid", "seed": 0}})
    s = sweep.load_sweep(str(path))
    study = sweep.optimize(s, show_progress=False)
    assert sweep.finish(s, study) == 0
    assert states(study) == ["COMPLETE"] * 4
    assert {(t.params["kernel"], t.params["train.batch_size"]) for t in study.trials} == {
        (2, 50), (2, 100), (3, 50), (3, 100)}
    assert all(t.user_attrs["command"].startswith("python -m cnnexp.run dataset=folder") for t in study.trials)

    client, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    by_number = {int(c.data.tags["optuna.trial_number"]): c for c in children}
    for trial in study.trials:
        child = by_number[trial.number]
        assert child.data.tags["optuna.trial_state"] == "COMPLETE" and child.info.status == "FINISHED"
        assert child.data.metrics["test_accuracy"] == pytest.approx(trial.user_attrs["test_accuracy"])
        assert [m.value for m in client.get_metric_history(child.info.run_id, "val_accuracy")] == [
            pytest.approx(trial.value)]
        assert f"+kernel={trial.params['kernel']}" in child.data.tags["cnnexp.command"]
    # The best trial's model is logged with its signature.
    best_child = by_number[study.best_trial.number]
    assert "model_summary.txt" in {a.path for a in client.list_artifacts(best_child.info.run_id)}
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = mlflow.search_logged_models(experiment_ids=[best_child.info.experiment_id], output_format="list")
    assert best_child.info.run_id in {m.source_run_id for m in logged}

    out = tmp_path / "out" / "tiny"
    table = (out / "trials.csv").read_text().splitlines()
    assert len(table) == 5 and table[0].startswith("trial,kernel,train.batch_size")
    summary = (out / "summary.md").read_text()
    assert "Does it have an effect on the score?" in summary and "| kernel" in summary
    for plot in ("history.png", "importances.png", "parallel_coordinates.png", "score_vs_kernel.png",
                 "score_vs_train.batch_size.png"):
        assert (out / "plots" / plot).stat().st_size > 5000, plot
    parent_artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"trials.csv", "summary.md", "plots"} <= parent_artifacts
    assert parents[0].data.metrics["trials_complete"] == 4


def test_rerun_resumes_to_the_configured_total_without_duplicates(tmp_path):
    path = write_sweep(tmp_path, {"kernel": "choice(2,3,4)"}, settings={"n_trials": 2})
    first = sweep.optimize(sweep.load_sweep(str(path)), show_progress=False)
    finished_before = {t.number: t.datetime_complete for t in first.trials}
    study = sweep.optimize(sweep.load_sweep(str(path), ["sweep.n_trials=3"]), show_progress=False)
    again = sweep.optimize(sweep.load_sweep(str(path), ["sweep.n_trials=3"]), show_progress=False)
    assert len(again.trials) == len(study.trials) == 3
    assert {t.number: t.datetime_complete for t in again.trials if t.number < 2} == finished_before
    _, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 3


def test_interrupted_sweep_marks_the_trial_and_resumes(tmp_path, monkeypatch):
    path = write_sweep(tmp_path, {"kernel": "choice(2,3,4)"}, settings={"n_trials": 3})
    real_run, calls = sweep.run, []

    def interrupt_second_trial(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(sweep, "run", interrupt_second_trial)
    with pytest.raises(KeyboardInterrupt):
        sweep.optimize(sweep.load_sweep(str(path)), show_progress=False)
    s = sweep.load_sweep(str(path))
    study = sweep.open_study(s)
    assert states(study) == ["COMPLETE", "FAIL"]
    assert study.trials[1].user_attrs["error"].startswith("interrupted")
    _, parents, children = mlflow_runs(tmp_path)
    assert parents[0].info.status == "KILLED"
    assert {c.data.tags["optuna.trial_state"]: c.info.status for c in children} == {
        "COMPLETE": "FINISHED", "FAIL": "KILLED"}

    study = sweep.optimize(s, show_progress=False)  # resume
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE"]
    _, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 3


def test_failing_trials_fail_alone_with_their_reason(tmp_path):
    # Pool size 64 shrinks the 32x32 map to nothing: rejected before training. lr=1e30: NaN loss.
    path = write_sweep(tmp_path, {"model.layers.2.size": "choice(2,64)", "train.lr": "choice(0.05,1e30)"},
                       settings={"n_trials": 4, "sampler": {"name": "grid", "seed": 0}})
    s = sweep.load_sweep(str(path))
    study = sweep.optimize(s, show_progress=False)
    assert sweep.finish(s, study, report=False) == 0
    by_params = {(t.params["model.layers.2.size"], t.params["train.lr"]): t for t in study.trials}
    assert by_params[(2, 0.05)].state.name == "COMPLETE"
    assert by_params[(2, 1e30)].state.name == "FAIL"
    assert "NonFiniteLossError: Training stopped: loss " in by_params[(2, 1e30)].user_attrs["error"]
    for lr in (0.05, 1e30):
        failed = by_params[(64, lr)]
        assert failed.state.name == "FAIL"
        assert "model.layers.2.size=64: pooling the 32x32 feature map shrinks it below 1x1" in failed.user_attrs["error"]
        assert failed.duration.total_seconds() < 5  # no training time spent
    _, _, children = mlflow_runs(tmp_path)
    failed_runs = [c for c in children if c.data.tags["optuna.trial_state"] == "FAIL"]
    assert len(failed_runs) == 3 and all(c.info.status == "FAILED" and c.data.tags["error"] for c in failed_runs)


def test_a_sweep_where_no_trial_completes_exits_non_zero(tmp_path):
    path = write_sweep(tmp_path, {"model.layers.2.size": "choice(64,128)"}, settings={"n_trials": 2})
    s = sweep.load_sweep(str(path))
    assert sweep.finish(s, sweep.optimize(s, show_progress=False), report=False) == 1


def test_median_pruner_prunes_a_trial_behind_the_median(tmp_path):
    path = write_sweep(tmp_path, {"kernel": "choice(3)"}, overrides=["train.epochs=3"], settings={
        "n_trials": 2, "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0}})
    s = sweep.load_sweep(str(path))
    study = sweep.open_study(s)
    # A finished trial that reached 0.9 at every epoch: the real one falls behind it at once.
    study.add_trial(optuna.trial.create_trial(
        params={"kernel": 3}, distributions={"kernel": optuna.distributions.CategoricalDistribution([3])},
        value=0.9, intermediate_values={0: 0.9, 1: 0.9, 2: 0.9}))
    study = sweep.optimize(s, show_progress=False)
    pruned = study.trials[1]
    assert pruned.state.name == "PRUNED" and list(pruned.intermediate_values) == [0]
    client, _, children = mlflow_runs(tmp_path)
    (child,) = children
    assert child.data.tags["optuna.trial_state"] == "PRUNED" and child.info.status == "KILLED"
    assert len(client.get_metric_history(child.info.run_id, "val_accuracy")) == 1  # of 3 epochs


@pytest.mark.parametrize("name", sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
def test_every_sweep_file_parses_and_its_trials_compose(name, tmp_path):
    s = sweep.load_sweep(name, [f"sweep.storage=sqlite:///{tmp_path / 's.db'}"])
    assert s.space and s.settings.n_trials >= 1
    sweep.make_pruner(s.settings)
    study = optuna.create_study(sampler=sweep.make_sampler(s.settings, s.space), direction="maximize")
    for _ in range(3):
        trial = study.ask()
        cfg = compose_config([*s.overrides, *sweep.trial_overrides(s, sweep.suggest(trial, s.space))])
        validate_architecture(layers_from_config(cfg), cfg.dataset.input_shape, cfg.dataset.num_classes,
                              cfg.model.padding)
        study.tell(trial, 0.5)


def test_search_space_from_the_command_line_in_hydras_grammar():
    s = sweep.load_sweep("quick", ["kernel=choice(2,4,6)", "train.lr=tag(log,interval(1e-4,1e-1))",
                                   "sweep.n_trials=5", "train.epochs=1"])
    assert s.settings.n_trials == 5 and "train.epochs=1" in s.overrides
    assert s.add_keys == {"kernel"}
    trial = optuna.create_study().ask()
    values = sweep.suggest(trial, s.space)
    assert values["kernel"] in (2, 4, 6) and 1e-4 <= values["train.lr"] <= 1e-1
    assert isinstance(trial.distributions["train.lr"], optuna.distributions.FloatDistribution)
    assert trial.distributions["train.lr"].log
    assert f"+kernel={values['kernel']}" in sweep.trial_overrides(s, values)
    with pytest.raises(Exception, match="n_trialz"):
        sweep.load_sweep("quick", ["sweep.n_trialz=5"])


@pytest.mark.parametrize("name", ["tpe", "random", "grid", "cmaes"])
def test_every_sampler_and_pruner_is_built_from_yaml(name):
    s = sweep.load_sweep("batch_epochs", [f"sweep.sampler.name={name}", "sweep.sampler.seed=3"])
    sampler = sweep.make_sampler(s.settings, s.space)
    assert type(sampler).__name__ == sweep.SAMPLERS[name]
    for pruner in sweep.PRUNERS:
        settings = sweep.load_sweep("batch_epochs", [f"sweep.pruner={{name: {pruner}}}"]).settings
        assert type(sweep.make_pruner(settings)).__name__ == sweep.PRUNERS[pruner]
    with pytest.raises(Exception, match="sweep.sampler.name='annealing' is unknown"):
        sweep.make_sampler(sweep.load_sweep("batch_epochs", ["sweep.sampler.name=annealing"]).settings, s.space)
