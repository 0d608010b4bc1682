"""The study's MLflow parent run and its champion: found or created once for all workers, ended by the last one.

Every exit ends every run: a finished study's parent is FINISHED (FAILED when no trial completed),
an interrupted one's KILLED; the sweep CLI ends it after the report, a `--no-report` worker when it
finds the study finished (whoever comes last), and a worker that joins a study already finished
never reopens its parent.
"""

from __future__ import annotations

import uuid

import optuna
from omegaconf import OmegaConf

from cnnexp import record, stores
from cnnexp.console import say
from cnnexp.design import short_label
from cnnexp.study.optuna_study import Constraints
from cnnexp.study.settings import constraint, objectives
from cnnexp.study.space import Sweep
from cnnexp.tracking import runs, store, views


def attach(sweep: Sweep, study: optuna.Study, reopen: bool = True) -> runs.Run:
    """Find or create the study's MLflow parent run, once for all workers, and record it in the study.

    `reopen`: mark a found parent RUNNING again (False when the study is finished: a late worker has nothing
    to run, and must not leave a finished parent RUNNING).
    """
    settings = sweep.settings
    params = {"study_name": settings.study_name, "direction": settings.direction, "metric": settings.metric,
              "n_trials": settings.n_trials, "storage": stores.parse(settings.storage).name,
              "sampler": OmegaConf.to_container(settings.sampler), "pruner": OmegaConf.to_container(settings.pruner),
              "overrides": " ".join(sweep.overrides), **{f"space.{k}": v for k, v in sweep.expressions.items()}}
    with stores.lock(str(settings.storage)):
        facts = record.read_study(study)
        if facts.uuid is None:
            record.write_study(study, uuid=uuid.uuid4().hex)
        parent = runs.study_run(sweep.base.tracking, str(settings.study_name), params, facts.mlflow_parent_run_id,
                                record.read_study(study).uuid, reopen=reopen)
        if parent.run_id:
            record.write_study(study, mlflow_parent_run_id=parent.run_id,
                               mlflow_tracking_uri=store.use(sweep.base.tracking.uri))
            url = views.share_study_view(parent, str(settings.study_name), list(sweep.space), str(settings.metric),
                                         str(settings.direction))
            if url:  # the page that opens this study's runs, for the report and the terminal
                record.write_study(study, mlflow_ui_url=url)
        if facts.metric is None or facts.answers is None:  # stored once; a rerun that differs was refused
            record.write_study(study, metric=str(settings.metric), answers=OmegaConf.to_container(sweep.answers),
                               objectives=[metric for metric, _ in objectives(settings)],
                               constraints=[list(constraint(c)) for c in settings.get("constraints") or []])
    return parent


def tracking_uri(sweep: Sweep) -> str | None:
    """The MLflow store this sweep's config names: the only one it writes to (never one a studies file names)."""
    return str(sweep.base.tracking.uri) if sweep.base.tracking.enabled and sweep.base.tracking.uri else None


def end(study: optuna.Study, uri: str | None, status: str | None = None) -> bool:
    """End the study's MLflow parent run in `uri` (FINISHED when a trial completed, else FAILED); True: a trial
    completed."""
    complete = any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    facts = record.read_study(study)
    if facts.mlflow_parent_run_id and uri:
        store.use(uri)
        runs.Run(facts.mlflow_parent_run_id).end(status or ("FINISHED" if complete else "FAILED"))
    return complete


def front(study: optuna.Study, settings) -> list[optuna.trial.FrozenTrial]:
    """The Pareto front of a multi-objective study, of the trials that meet `sweep.constraints`."""
    feasible = Constraints([constraint(c) for c in settings.get("constraints") or []])
    return [t for t in study.best_trials if all(v <= 0 for v in feasible(t))]


def register_champion(sweep: Sweep, study: optuna.Study) -> int | None:
    """A multi-objective study's champion: the most accurate model on the front that meets the constraints,
    registered as `cnnexp-<study>@champion` (each trial logged its model). Returns its trial number."""
    candidates = front(study, sweep.settings)
    if not candidates:
        return None
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    champion = (max if maximize else min)(candidates, key=lambda t: t.values[0])
    facts, where = record.read_trial(champion), record.read_study(study)
    uri = tracking_uri(sweep)
    if facts.mlflow_run_id and uri and where.champion is None:
        store.use(uri)
        run = runs.Run(facts.mlflow_run_id)
        uri = run.logged_model_uri()
        version = run.register(uri, f"cnnexp-{sweep.settings.study_name}") if uri else None
        if version:
            record.write_study(study, champion={"trial": champion.number, "registered_version": version})
    say(f"Champion: trial {champion.number} ({short_label(champion.params)}), {sweep.settings.metric}="
        f"{champion.values[0]:.4f}, the most accurate on the front of {len(candidates)} that meet the constraints.")
    return champion.number
