"""Seeds side by side: a model of k towers trains each seed as a run of its own would."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from cnnexp.config import compose_config
from cnnexp.model.build import build_model
from cnnexp.run import DatasetMemo, prepare, run
from cnnexp.runtime import keras
from cnnexp.train.compiled import ModelCache
from cnnexp.train.towers import build_towers, compile_towers, train_towers
from tests.conftest import CIFAR_JPEG

needs_cifar = pytest.mark.skipif(not CIFAR_JPEG.exists(), reason=f"{CIFAR_JPEG} is not there")

SMALL = ["dataset.train_limit=1000", "dataset.eval_limit=500", "dataset.test_limit=500", "train.epochs=2",
         "train.optimizer=adam", "+width=0.125", "tracking=off", "train.verbose=0"]


def _seeded(seed: int) -> list[str]:
    """A design's replicate: its own seed and its own training subset."""
    return [*SMALL, f"train.seed={seed}", f"dataset.subset_seed={seed}"]


@needs_cifar
def test_each_tower_starts_from_its_own_seeds_fresh_weights_and_shares_nothing():
    memo = DatasetMemo()
    cfg = compose_config(_seeded(0))
    layers, data = prepare(cfg, datasets=memo)
    keras().backend.clear_session()
    model = build_towers(layers, data.input_shape, data.num_classes, cfg.model.padding, seeds=[3, 4])
    towers = [model.get_layer("tower0"), model.get_layer("tower1")]
    for seed, tower in zip([3, 4], towers):
        keras().backend.clear_session()
        keras().utils.set_random_seed(seed)
        alone = build_model(layers, data.input_shape, data.num_classes, cfg.model.padding)
        for a, b in zip(tower.get_weights(), alone.get_weights()):
            np.testing.assert_array_equal(a, b)
    assert not set(map(id, towers[0].weights)) & set(map(id, towers[1].weights))
    # A step on tower 0's data moves no weight of tower 1: the summed loss keeps the gradients apart.
    compile_towers(model, cfg.train, len(data.y_train))
    before = [w.copy() for w in towers[1].get_weights()]
    moved = towers[0].get_weights()[0].copy()
    ones = np.ones(len(data.y_train), dtype="float32")
    model.fit([data.x_train, data.x_train], [data.y_train, data.y_train], sample_weight=[ones, 0 * ones],
              batch_size=100, epochs=1, verbose=0)
    for a, b in zip(towers[1].get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(towers[0].get_weights()[0], moved)  # while tower 0 trained


SEEDS = list(range(8))


@pytest.fixture(scope="module")
def separate():
    """Eight runs of one cell, each built, compiled and traced afresh (the path before compile-once)."""
    memo = DatasetMemo()
    return memo, [run(compose_config(_seeded(s)), datasets=memo).metrics["test_accuracy"] for s in SEEDS]


def _same_distribution(separate: list[float], other: list[float]) -> None:
    assert min(separate + other) > 0.16  # chance is 0.10: 3 binomial SDs above it on 500 images
    # The means within their CI (Welch), the spreads within theirs (Levene), over 8 seeds each.
    assert stats.ttest_ind(separate, other, equal_var=False).pvalue > 0.01, (separate, other)
    assert stats.levene(separate, other).pvalue > 0.01, (separate, other)
    # Same start, same subset, same order: each seed ends near its separate run (up to the threads' order of sums).
    assert np.max(np.abs(np.subtract(separate, other))) < 0.05, (separate, other)


@needs_cifar
def test_reinitialised_runs_have_the_accuracy_distribution_of_fresh_runs(separate):
    memo, fresh = separate
    models = ModelCache()
    cached = [run(compose_config(_seeded(s)), datasets=memo, models=models).metrics["test_accuracy"] for s in SEEDS]
    assert models.compiles == 1 and models.reuses == 7  # one graph for the eight seeds
    _same_distribution(fresh, cached)


@needs_cifar
def test_towers_have_the_accuracy_distribution_of_separate_runs(separate):
    memo, alone = separate
    seeds, together = SEEDS, []
    for group in (seeds[:4], seeds[4:]):
        prepared = [prepare(compose_config(_seeded(s)), datasets=memo) for s in group]
        layers, cfg = prepared[0][0], compose_config(_seeded(group[0]))
        datas = [d for _, d in prepared]
        assert not np.array_equal(datas[0].y_train, datas[1].y_train)  # each tower its own subset
        keras().backend.clear_session()
        model = build_towers(layers, datas[0].input_shape, datas[0].num_classes, cfg.model.padding, group)
        compile_towers(model, cfg.train, len(datas[0].y_train))
        results = train_towers(model, datas, cfg.train, group)
        assert all(r.epochs_run == 2 and len(r.history["loss"]) == 2 for r in results)
        together += [r.test_accuracy for r in results]
    _same_distribution(alone, together)


@needs_cifar
def test_a_designed_study_trains_its_seeds_side_by_side_each_its_own_trial_and_run(tmp_path):
    """Real training, tiny: 4 seeds of each of 2 cells, 4 towers per model; every tower is a trial and a run."""
    import yaml

    from cnnexp import record
    from cnnexp.study import engine
    from cnnexp.study.space import load_sweep
    from tests.conftest import tracking_overrides
    from tests.helpers import empty_mlflow_store, finish, mlflow_runs

    empty_mlflow_store(tmp_path)
    doc = {"overrides": [*SMALL[:-2], *tracking_overrides(tmp_path)],  # tracking on: every tower is a run
           "design": {"seeds": 4, "baseline": {"kernel": 3}, "vary": {"kernel": [3, 5]}, "main": "cifar10",
                      "replicates_per_model": 4},
           "answers": {"looks": 1},
           "sweep": {"storage": f"sqlite:///{tmp_path / 's.db'}", "output_dir": str(tmp_path / "out"),
                     "estimate": False, "system_metrics": False, "log_models": "none"}}
    path = tmp_path / "towers.yaml"
    path.write_text(yaml.safe_dump(doc))
    s = load_sweep(str(path))
    study = engine.optimize(s, show_progress=False)
    records = record.read_trials(study)
    assert len(records) == 8 and all(r.complete and r.towers == 4 for r in records)
    # Chance is 0.10: the mean of 8 runs on 500 test images is 4 binomial SDs above it at 0.14.
    assert np.mean([r.test_accuracy for r in records]) > 0.14
    for kernel in (3, 5):
        cell = [r for r in records if r.params["kernel"] == kernel]
        assert len({r.seed for r in cell}) == 4 and len({r.subset_seed for r in cell}) == 4
    # A tower's duration is its share of the wall the four trained in (summed, the wall counts once).
    wall = sum(t.duration.total_seconds() for t in study.trials)
    assert sum(r.duration_s for r in records) == pytest.approx(wall / 4, rel=0.05)
    _, _, children = mlflow_runs(tmp_path)
    assert len(children) == 8 and len({c.info.run_id for c in children}) == 8
    by_run = {c.info.run_id: c for c in children}
    for r in records:  # what is logged is what was trained: its seed, its subset, its layers, its own scores
        logged = by_run[r.mlflow_run_id]
        assert logged.info.status == "FINISHED" and logged.data.tags["cnnexp.towers"] == "4"
        assert int(logged.data.params["train.seed"]) == r.seed
        assert int(logged.data.params["dataset.subset_seed"]) == r.subset_seed
        assert logged.data.metrics["final/test_accuracy"] == pytest.approx(r.test_accuracy)
        assert logged.data.params["model.layers_resolved"].startswith(f"c8k{r.params['kernel']} ")
    assert finish(s, study) == 0
