"""One experiment: `python -m cnnexp.run [overrides]`, e.g. `python -m cnnexp.run +kernel=7`.

`run(cfg)` is the function that tests, sweeps and benchmarks call; `main(argv)` is a thin CLI
over Hydra's compose API that prints the score like the notebook did.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cnnexp import console, runtime, stop
from cnnexp.config import SHORTCUTS, compose_config, overrides_to_command, validate_config
from cnnexp.console import setup_logging
from cnnexp.data.load import Dataset, load_dataset, summary_line
from cnnexp.errors import CnnexpError, ConfigError
from cnnexp.model.build import build_model
from cnnexp.model.layers import LayerSpec, layers_config, layers_from_config, layers_text
from cnnexp.model.shapes import Cost, cost, validate_architecture
from cnnexp.tracking import runs
from cnnexp.train.compiled import ModelCache, cell_key
from cnnexp.train.fit import TrainResult, compile_model, train_model
from cnnexp.train.options import optimizer_settings, resolve_precision, weight_decay

log = logging.getLogger("cnnexp")

# The epoch logs as Keras names them -> as MLflow shows them.
METRIC_NAMES = {"loss": "train_loss", "accuracy": "train_accuracy", "val_loss": "val_loss",
                "val_accuracy": "val_accuracy", "epoch_seconds": "epoch_seconds"}


@dataclass
class RunResult:
    """The outcome of one experiment: scores, cost, and what it was (for the sweep and the report)."""

    metrics: dict[str, float]           # test_loss, test_accuracy, val_accuracy, val_loss, ... (plain floats)
    history: dict[str, list[float]]     # per epoch, from epoch 1 (epoch_seconds included)
    cost: Cost                          # parameters and FLOPs per image
    run_id: str | None                  # the MLflow run (None when tracking is off or broken)
    train_images: int = 0               # images one epoch trains on
    updates: int = 0                    # optimizer steps over the whole training
    resumed_from_epoch: int = 0
    warnings: list[str] = field(default_factory=list)
    dataset_note: str = ""
    checkpoint_error: str | None = None
    eval_images: int = 0                # images the validation metrics are measured on
    test_images: int = 0
    num_classes: int = 0
    model: object = field(default=None, repr=False)      # the trained Keras model
    example: object = field(default=None, repr=False)    # a few test inputs, for a model signature
    correct: dict = field(default_factory=dict, repr=False)  # epoch -> which evaluation images it got right


class DatasetMemo:
    """The last dataset loaded, kept in memory between the runs of one process (a sweep's trials share a decode).

    Explicit: whoever wants the sharing (a sweep's objective, the planner) makes one and passes it to `run`.
    """

    def __init__(self):
        self.key: tuple | None = None
        self.dataset: Dataset | None = None
        self.decoded: dict = {}  # the whole decoded dataset: each trial's subset is taken from it in memory

    def load(self, dataset_cfg, val_fraction: float, seed: int) -> Dataset:
        key = (OmegaConf.to_yaml(dataset_cfg, resolve=True), val_fraction, seed)
        if key != self.key:
            self.key, self.dataset = None, load_dataset(dataset_cfg, val_fraction, seed, self.decoded)
            self.key = key
        return self.dataset


def prepare(cfg: DictConfig, validated: bool = False, datasets: DatasetMemo | None = None
            ) -> tuple[list[LayerSpec], Dataset]:
    """Validate everything that can be validated, then load the data: nothing trains yet.

    `validated`: the caller checked the config and its architecture already (a sweep checks every
    configuration once, before the study), so only the class count the data brings is checked here.
    """
    layers = layers_from_config(cfg)
    if not validated:
        validate_config(cfg)
        # Shapes are known from the config for every dataset, so a bad architecture fails here,
        # before any data is decoded.
        validate_architecture(layers, cfg.dataset.input_shape, cfg.dataset.num_classes, cfg.model.padding)
    val_fraction, seed = float(cfg.train.val_fraction), int(cfg.train.seed)
    dataset = (datasets or DatasetMemo()).load(cfg.dataset, val_fraction, seed)
    validate_architecture(layers, dataset.input_shape, dataset.num_classes, cfg.model.padding)
    return layers, dataset


def resolved_config(cfg: DictConfig, layers: list[LayerSpec]) -> DictConfig:
    """The config as trained: shortcuts applied to the layers, the optimizer's defaults filled in."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    out.model.layers = layers_config(layers)
    _, lr, momentum = optimizer_settings(cfg.train)
    out.train.lr, out.train.momentum, out.train.weight_decay = lr, momentum, weight_decay(cfg.train)
    for shortcut in SHORTCUTS:
        out.pop(shortcut, None)
    return out


def _tags(overrides: Sequence[str], dataset: Dataset, extra: dict | None) -> dict:
    return {f"{runs.TAG_PREFIX}command": overrides_to_command(overrides),
            "mlflow.source.git.commit": runtime.git_commit(),
            f"{runs.TAG_PREFIX}device": runtime.device_description(),
            f"{runs.TAG_PREFIX}dataset_fingerprint": dataset.fingerprint,
            f"{runs.TAG_PREFIX}keras_backend": runtime.keras().backend.backend(),
            f"{runs.TAG_PREFIX}dataset_note": dataset.note or None, **(extra or {})}


def _log_what_trains(mlrun: runs.Run, cfg, layers, network_cost: Cost, overrides, dataset: Dataset, net) -> None:
    """Params (the config as trained), the config file, the dataset and the model summary, once per run."""
    trained = resolved_config(cfg, layers)
    params = runs.flatten(trained)
    params.update({"model.layers_resolved": layers_text(layers), "model.flops_per_image": network_cost.flops,
                   "model.num_params": network_cost.params, "overrides": " ".join(overrides) or "(defaults)"})
    # What the user typed (`+kernel=7`), so that single runs filter like a sweep's `swept.kernel`.
    params.update({key: cfg[key] for key in SHORTCUTS if cfg.get(key) is not None})
    mlrun.log_params(params)
    mlrun.log_text(OmegaConf.to_yaml(trained), "config.yaml")
    source = Path(dataset.source).resolve().as_uri() if dataset.source != "keras.datasets" else dataset.source
    mlrun.log_dataset(str(cfg.dataset.name), source, dataset.fingerprint)
    summary: list[str] = []
    net.summary(print_fn=lambda line, *args, **kwargs: summary.append(line))
    mlrun.log_text("\n".join(summary), "model_summary.txt")


def _log_outcome(mlrun: runs.Run, result: TrainResult, logged: set[int], name: str, curve: bool) -> dict[str, float]:
    """Epochs restored from a checkpoint but not yet in MLflow, the final figures, the flags; returns the metrics."""
    for epoch in range(1, result.resumed_from_epoch + 1):
        if epoch not in logged:
            mlrun.log_metrics({METRIC_NAMES[k]: v[epoch - 1] for k, v in result.history.items()
                               if k in METRIC_NAMES and len(v) >= epoch}, step=epoch)
    metrics = {"test_loss": result.test_loss, "test_accuracy": result.test_accuracy,
               "val_accuracy": result.history.get("val_accuracy", [float("nan")])[-1],
               "val_loss": result.history.get("val_loss", [float("nan")])[-1], "epochs_run": result.epochs_run,
               "train_seconds": result.train_seconds, "images_per_second": result.images_per_second,
               "train_images": result.train_images, "updates": result.updates}
    metrics = {key: runs.clean(value) for key, value in metrics.items()}
    # val_* were logged per epoch already (validated once at the end: now, at the last epoch); the rest are the
    # run's final figures.
    if not curve:
        mlrun.log_metrics({k: v for k, v in metrics.items() if k.startswith("val_")}, step=result.epochs_run)
    mlrun.log_metrics({f"final/{k}": v for k, v in metrics.items() if not k.startswith("val_")}, step=result.epochs_run)
    for message in result.warnings:
        warnings.warn(f"{name}: {message}; the run is flagged (tag cnnexp.flag).", stacklevel=3)
    if result.warnings:
        mlrun.set_tags({f"{runs.TAG_PREFIX}flag": "; ".join(result.warnings)})
    if result.checkpoint_error:
        mlrun.set_tags({f"{runs.TAG_PREFIX}checkpoint_error": result.checkpoint_error})
    return metrics


def run(cfg: DictConfig, overrides: Sequence[str] = (), callbacks: Iterable = (), parent_run_id: str | None = None,
        run_name: str | None = None, tags: dict | None = None, run_id: str | None = None, checkpoint_dir=None,
        validated: bool = False, datasets: DatasetMemo | None = None, curve: bool = True,
        keep_correct: set[int] = frozenset(), models: ModelCache | None = None) -> RunResult:
    """Train and evaluate one model, logging it to MLflow.

    Args:
        cfg: a composed experiment config (see `cnnexp.config.compose_config`).
        overrides: the Hydra overrides that produced `cfg`; they form the reproduce command.
        callbacks: extra Keras callbacks (a sweep's pruning callback).
        parent_run_id: makes the MLflow run a child of this run (a sweep's study run).
        run_name, tags: for the MLflow run.
        run_id: log into this existing MLflow run (created, and ended, by a sweep's objective).
        checkpoint_dir: checkpoint every epoch here and resume from it (see `train.fit.train_model`).
        validated: the caller validated `cfg` already (a sweep validates each trial once).
        datasets: keep the decoded dataset between runs of this process.
        curve: validate after every epoch; False: once, at the end (nothing reads the curve).
        keep_correct: epochs after which to keep which evaluation images are right (see `train_model`).
        models: keep the compiled model of this cell, and re-initialise it for the next run of the same cell
            (`cnnexp.train.compiled`): no new graph is traced.
    """
    layers, dataset = prepare(cfg, validated=validated, datasets=datasets)
    k = runtime.keras()
    network_cost = cost(layers, dataset.input_shape, cfg.model.padding)
    name = run_name or f"{cfg.model.name}-{cfg.dataset.name}"
    with runs.start_run(cfg.tracking, name, _tags(overrides, dataset, tags), parent_run_id, run_id) as mlrun:
        # Epochs already in the run: a trial resumed from its checkpoint has them (and its params).
        logged = mlrun.metric_steps("val_accuracy") if run_id is not None else set()
        # Every run starts from a clean, seeded state: nothing leaks from a previous trial. A held model of the same
        # cell is put back to exactly the state this fresh build has (its weights are copied from it).
        key = cell_key(layers, dataset, cfg) if models is not None else None
        if models is None or not models.holds(key):
            k.backend.clear_session()
        k.utils.set_random_seed(int(cfg.train.seed))
        k.mixed_precision.set_global_policy(resolve_precision(cfg.train))  # set on every run: never inherited
        net = build_model(layers, dataset.input_shape, dataset.num_classes, cfg.model.padding, name=str(cfg.model.name))
        if models is not None:
            net = models.take(key, net, lambda fresh: compile_model(fresh, dataset, cfg.train))
        if not logged:  # a resumed trial's run has all of this already
            _log_what_trains(mlrun, cfg, layers, network_cost, overrides, dataset, net)
        log.info("%s | %d parameters, %.1f MFLOPs per image | %s", summary_line(dataset), network_cost.params,
                 network_cost.flops / 1e6, runtime.device_description())
        try:
            result = train_model(net, dataset, cfg.train, checkpoint_dir=checkpoint_dir, curve=curve,
                                 keep_correct=keep_correct, compiled=models is not None,
                                 callbacks=[runs.epoch_logger(mlrun, logged, METRIC_NAMES), *callbacks])
        except BaseException:
            if models is not None:  # a model stopped mid-step (a NaN, an OOM, a signal) is never trained again
                models.clear()
            raise
        metrics = _log_outcome(mlrun, result, logged, name, curve)
        if cfg.tracking.log_model:
            mlrun.log_model(net, dataset.x_test[:4])
    return RunResult(metrics=metrics, history=result.history, cost=network_cost, run_id=mlrun.run_id,
                     train_images=result.train_images, updates=result.updates,
                     resumed_from_epoch=result.resumed_from_epoch, warnings=result.warnings,
                     dataset_note=dataset.note, checkpoint_error=result.checkpoint_error,
                     eval_images=len(dataset.y_val), test_images=len(dataset.y_test),
                     num_classes=dataset.num_classes, model=net,
                     example=dataset.x_test[:4], correct=result.correct)


def run_side_by_side(cfgs: Sequence[DictConfig], overrides: Sequence[Sequence[str]], run_ids: Sequence[str | None],
                     run_names: Sequence[str], parent_run_id: str | None = None, datasets: DatasetMemo | None = None,
                     models: ModelCache | None = None) -> list[RunResult]:
    """k runs of one cell (other seeds, other subsets) trained as one model of k towers (`cnnexp.train.towers`).

    Each run is its own MLflow run (`run_ids`, created and ended by the caller), logged with what it trained:
    its config, its seed, its layers, its own curve and scores. Validated once, at the end; no checkpoint.

    Raises:
        NonFiniteLossError: the summed loss blew up; the caller trains the runs one by one to find which.
    """
    from cnnexp.train.towers import build_towers, compile_towers, train_towers

    prepared = [prepare(cfg, validated=True, datasets=datasets) for cfg in cfgs]
    layers, datas = prepared[0][0], [data for _, data in prepared]
    cfg, first, seeds = cfgs[0], datas[0], [int(c.train.seed) for c in cfgs]
    k = runtime.keras()
    network_cost = cost(layers, first.input_shape, cfg.model.padding)
    key = (*cell_key(layers, first, cfg), "towers", len(cfgs)) if models is not None else None
    if models is None or not models.holds(key):
        k.backend.clear_session()
    k.mixed_precision.set_global_policy(resolve_precision(cfg.train))
    net = build_towers(layers, first.input_shape, first.num_classes, cfg.model.padding, seeds, name=str(cfg.model.name))
    if models is not None:
        net = models.take(key, net, lambda fresh: compile_towers(fresh, cfg.train, len(first.y_train)))
    else:
        compile_towers(net, cfg.train, len(first.y_train))
    log.info("%s | %d runs side by side, %d parameters each, %.1f MFLOPs per image | %s", summary_line(first),
             len(cfgs), network_cost.params, network_cost.flops / 1e6, runtime.device_description())
    with contextlib.ExitStack() as stack:
        mlruns = [stack.enter_context(runs.start_run(c.tracking, name, _tags(o, d, None), parent_run_id, run_id))
                  for c, o, d, name, run_id in zip(cfgs, overrides, datas, run_names, run_ids)]
        for i, (mlrun, c, o, d) in enumerate(zip(mlruns, cfgs, overrides, datas)):
            _log_what_trains(mlrun, c, layers, network_cost, o, d, net.get_layer(f"tower{i}"))
            mlrun.set_tags({f"{runs.TAG_PREFIX}towers": len(cfgs), f"{runs.TAG_PREFIX}tower": i})
        try:
            results = train_towers(net, datas, cfg.train, seeds)
        except BaseException:
            if models is not None:
                models.clear()
            raise
        out = []
        for i, (mlrun, result, d, name) in enumerate(zip(mlruns, results, datas, run_names)):
            for epoch in range(1, result.epochs_run + 1):  # the curve, one batch per epoch (logged after training)
                mlrun.log_metrics({METRIC_NAMES[key]: v[epoch - 1] for key, v in result.history.items()
                                   if key in METRIC_NAMES and not key.startswith("val_") and len(v) >= epoch},
                                  step=epoch)
            metrics = _log_outcome(mlrun, result, set(), name, curve=False)
            out.append(RunResult(metrics=metrics, history=result.history, cost=network_cost, run_id=mlrun.run_id,
                                 train_images=result.train_images, updates=result.updates, warnings=result.warnings,
                                 dataset_note=d.note, eval_images=len(d.y_val), test_images=len(d.y_test),
                                 num_classes=d.num_classes, model=net.get_layer(f"tower{i}"), example=d.x_test[:4],
                                 correct=result.correct))
    return out


USAGE = """usage: python -m cnnexp.run [-v] [override ...]

One experiment: train, evaluate, log to MLflow, print the score. Overrides are Hydra's
(key=value; +kernel=7, +filters=32, +width=0.5, +batchnorm=false for the shortcuts), e.g.
    python -m cnnexp.run +kernel=7 train.epochs=1
hydra.* keys and Hydra's own flags (--config-dir, --cfg, --multirun, --experimental-rerun) are
not taken. -v shows the libraries' own logging. Exit codes: 0 done, 2 bad input (one line),
130 stopped (SIGTERM, SIGHUP, Ctrl-C: the MLflow run ends KILLED)."""


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: one line and exit 2 for bad input, exit 130 with the run ended KILLED on a stop signal."""
    args = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(args):
        print(USAGE)
        return 0
    verbose = bool({"-v", "--verbose"} & set(args))
    args = [a for a in args if a not in ("-v", "--verbose")]
    runtime.setup_environment()
    setup_logging(verbose)
    try:
        with stop.on_signals():
            result = _main(args)
    except CnnexpError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"error: stopped ({err or 'SIGINT'}); the MLflow run is ended KILLED, nothing else was written.",
              file=sys.stderr)
        return 130
    console.say(f"test loss: {result.metrics['test_loss']:.4f}")
    console.say(f"test accuracy: {result.metrics['test_accuracy']:.4f}")
    console.say(f"({result.metrics['images_per_second']:.0f} images/s in training; {result.cost.params:,} parameters, "
                f"{result.cost.flops / 1e6:.1f} MFLOPs per image; MLflow run {result.run_id or 'not logged'})")
    return 0


def _main(args: list[str]) -> RunResult:
    flags = [a for a in args if a.startswith("-")]
    if flags:
        raise ConfigError(f"{flags[0]!r} is not an option of python -m cnnexp.run (only -v and --help; Hydra's own "
                          "flags are not taken): give key=value overrides.")
    repeated = sorted({k for k in (a.partition("=")[0].lstrip("+~") for a in args)
                       if [b.partition("=")[0].lstrip("+~") for b in args].count(k) > 1})
    if repeated:
        raise ConfigError(f"{repeated[0]} is given twice on the command line: keep one.")
    cfg = compose_config(args)
    datasets = DatasetMemo()
    prepare(cfg, datasets=datasets)  # every refusal happens before anything is written
    folder = run_folder(cfg, args)
    log.info("Run folder: %s", folder)
    return run(cfg, overrides=args, validated=True, datasets=datasets)


def run_folder(cfg: DictConfig, overrides: Sequence[str]) -> Path:
    """`<output_dir>/runs/<time>/` as Hydra made it: the composed config, the overrides, and `run.log`.

    Made only once the run is about to train, so that a refused run writes nothing.
    """
    base = Path(os.path.expanduser(str(cfg.output_dir))) / "runs"
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    folder = base / stamp
    suffix = 1
    while folder.exists():  # two runs started in the same second
        folder, suffix = base / f"{stamp}_{suffix}", suffix + 1
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (folder / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    handler = logging.FileHandler(folder / "run.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    return folder


if __name__ == "__main__":
    sys.exit(main())
