"""One compiled model per cell: a re-initialised model starts where a fresh build starts (that it trains like one,
over 8 seeds: tests/test_towers.py, beside the towers, from the same separate runs)."""

from __future__ import annotations

import numpy as np
import pytest

from cnnexp.config import compose_config
from cnnexp.model.build import build_model
from cnnexp.run import DatasetMemo, prepare
from cnnexp.runtime import keras
from cnnexp.train.compiled import ModelCache, cell_key
from cnnexp.train.fit import compile_model
from tests.conftest import CIFAR_JPEG

needs_cifar = pytest.mark.skipif(not CIFAR_JPEG.exists(), reason=f"{CIFAR_JPEG} is not there")

SMALL = ["dataset.train_limit=1000", "dataset.eval_limit=500", "dataset.test_limit=500", "train.epochs=2",
         "train.optimizer=adam", "+width=0.125", "tracking=off", "train.verbose=0"]


def _fresh(layers, data, cfg, seed: int):
    """What a run without a cache trains from: a clean session, the seed, a new build."""
    keras().backend.clear_session()
    keras().utils.set_random_seed(seed)
    return build_model(layers, data.input_shape, data.num_classes, cfg.model.padding, name=str(cfg.model.name))


@needs_cifar
def test_a_reinitialised_model_starts_from_a_fresh_builds_weights_and_optimizer_state():
    cfg = compose_config(SMALL)
    memo = DatasetMemo()
    layers, data = prepare(cfg, datasets=memo)
    models, key = ModelCache(), cell_key(layers, data, cfg)
    net = models.take(key, _fresh(layers, data, cfg, 0), lambda m: compile_model(m, data, cfg.train))
    start = [v.numpy() for v in net.optimizer.variables]
    net.fit(data.x_train, data.y_train, batch_size=100, epochs=1, verbose=0)  # moves every weight and moment
    assert int(net.optimizer.iterations.numpy()) > 0
    expected = [w.copy() for w in _fresh(layers, data, cfg, 7).get_weights()]

    keras().utils.set_random_seed(7)  # as `run` does for a held cell: no clear_session
    again = build_model(layers, data.input_shape, data.num_classes, cfg.model.padding, name=str(cfg.model.name))
    reused = models.take(key, again, lambda m: pytest.fail("a held cell is never compiled again"))
    assert reused is net and models.compiles == 1 and models.reuses == 1
    got = reused.get_weights()
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(got[0], _fresh(layers, data, cfg, 8).get_weights()[0])  # the seed decides them
    for a, b in zip(reused.optimizer.variables, start):
        np.testing.assert_array_equal(a.numpy(), b)  # step 0 (the schedule's start) and zero moments
    assert cell_key(layers, data, compose_config([*SMALL, "train.seed=5"])) == key  # the seed never shapes a graph
    assert cell_key(layers, data, compose_config([*SMALL, "train.batch_size=50"])) != key
