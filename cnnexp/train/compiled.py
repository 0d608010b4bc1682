"""One compiled model per cell and worker: built and compiled once, re-initialised for every seed.

A trial used to build, compile and trace its model afresh: the first epoch paid for tracing the
training step (about 1.8x a steady epoch here), and the validation and test passes traced theirs.
The seeds of one cell share every shape and every setting, so a worker keeps the last cell's
compiled model and, for the next seed, puts it back to where a fresh build with that seed starts:

- the weights (and every other variable: batch-norm statistics, dropout's seed state) take the
  values of a model freshly built under `keras.utils.set_random_seed(seed)`, so that each layer's
  own initializer, seeded as it would be in a fresh run, decides them (building a functional model
  traces nothing: it costs milliseconds);
- the optimizer's variables (its step count, which drives the schedule, and its moments) take the
  values they had right after it was built, before the first step;
- Keras' own per-fit state (`stop_training`, the epoch a restored checkpoint resumes from) is reset.

The traced training, evaluation and prediction functions stay. `tests/test_compiled.py` checks that
the weights equal a fresh build's and that the accuracies over seeds have the same distribution.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from cnnexp.model.layers import layers_text

# Settings that never shape the graph: the seed (re-initialised), the data order, the logging.
UNTRACED = ("seed", "data_seed", "verbose")


def cell_key(layers, dataset, cfg) -> tuple:
    """What a compiled model depends on: the layers, the data's shapes, the training recipe, the steps it schedules."""
    train = OmegaConf.to_container(cfg.train, resolve=True)
    for name in UNTRACED:
        train.pop(name, None)
    return (layers_text(layers), tuple(int(v) for v in dataset.input_shape), int(dataset.num_classes),
            str(cfg.model.padding), str(cfg.model.name), len(dataset.y_train),
            OmegaConf.to_yaml(OmegaConf.create(train)))


class ModelCache:
    """The last cell's compiled model, for the trials of one worker (a sweep's objective holds one).

    One cell only: the trials of a designed study come cell by cell, and a held model keeps its graphs
    in memory. Another cell clears the Keras session and compiles anew.
    """

    def __init__(self):
        self.key: tuple | None = None
        self.model = None
        self._optimizer_start: list | None = None
        self.compiles = 0  # how many models this worker compiled (tests and the bench read it)
        self.reuses = 0

    def holds(self, key: tuple) -> bool:
        return self.model is not None and key == self.key

    def take(self, key: tuple, fresh, compile_model):
        """The model to train: `fresh` compiled and kept (a new cell), or the held one re-initialised from `fresh`.

        Args:
            key: `cell_key` of the run.
            fresh: the model just built under the run's seed (uncompiled).
            compile_model: compiles a model and builds its optimizer (`cnnexp.train.fit.compile_model`).
        """
        if not self.holds(key):
            self.clear()
            compile_model(fresh)
            self.key, self.model = key, fresh
            self._optimizer_start = [v.numpy() for v in fresh.optimizer.variables]
            self.compiles += 1
            return fresh
        held = self.model
        if len(held.variables) != len(fresh.variables):  # same key, other graph: never train a mixed model
            raise RuntimeError("the held model and the fresh build differ in their variables; the cell key misses "
                               "a setting (cnnexp.train.compiled.cell_key)")
        for target, value in zip(held.variables, fresh.variables):
            target.assign(value.value)
        for target, start in zip(held.optimizer.variables, self._optimizer_start):
            target.assign(start)
        held.stop_training = False
        held._initial_epoch = None  # set by a restored checkpoint (BackupAndRestore); read by the next fit
        self.reuses += 1
        return held

    def clear(self) -> None:
        """Forget the held model (a failed trial may have left it half-trained: the next one compiles afresh)."""
        self.key, self.model, self._optimizer_start = None, None, None
