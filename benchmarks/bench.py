"""Benchmarks, side by side in one process: `make bench` (or `python benchmarks/bench.py [--data PATH] [--tiny]`).

0. time to answer: our sequential designed study, the notebook's full-fidelity grid and TPE, each
   scored against a stored high-fidelity reference (benchmarks/time_to_answer.py);
0a. runs per hour of the default study's baseline cell: today's path, compile once, k towers, a bare
    Keras loop (benchmarks/runs_per_hour.py);
0b. the fast preset's time to 85% and to 90% on full CIFAR-10, with its accuracy-against-time curve
   (benchmarks/fast_preset.py);

1. training throughput: a bare `model.fit` on NumPy arrays (the notebook) vs `cnnexp.run`
   with MLflow on, and each training option on its own;
2. per-trial overhead: a sweep of K trials vs K bare fits of the same configurations;
3. pruning efficiency: the same sweep with and without the pruner;
4. memory: resident memory over 20 consecutive trials;
5. workers: the same sweep with 1, 2 and 4 local worker processes;
6. data: loading CIFAR-10 from the image folder cold and from the cache.

Every figure is a median of repeats. Writes outputs/bench/report.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from cnnexp import runtime
from cnnexp.data.locate import SHARED, shared_data_dir

sys.path.insert(0, str(Path(__file__).parent))  # run as a script: its sibling module
import fast_preset  # noqa: E402
import runs_per_hour  # noqa: E402
import time_to_answer  # noqa: E402

# The CIFAR-10 image-folder archive (or folder) to measure on: --data, else the shared copy that every
# entry point finds (cnnexp.data.locate: $CNNEXP_SHARED_DATA, default ../shared/data).
SHARED_CIFAR = shared_data_dir() / SHARED["cifar10"]

SIZES = {  # (train images, test images, epochs, repeats, width, trials for the sweep parts)
    "full": {"train": 2000, "test": 1000, "epochs": 3, "repeats": 3, "width": 1.0, "sweep_trials": 4,
             "sweep_width": 0.25, "sweep_train": 3000, "memory_trials": 20},
    "tiny": {"train": 400, "test": 200, "epochs": 2, "repeats": 1, "width": 0.125, "sweep_trials": 1,
             "sweep_width": 0.125, "sweep_train": 400, "memory_trials": 2},
}


LONG = ("memory", "workers")  # behind --full (make bench FULL=1): tens of minutes on 2 cores
# Minutes each part takes on the 2-core CPU these were measured on, printed before it starts.
EXPECTED = {"tiny": {"runs_per_hour": 1,
                     "time_to_answer": 3, "fast_preset": 1, "throughput": 1, "trial_overhead": 1, "pruning": 1,
                     "memory": 1, "workers": 2, "data": 1},
            "full": {"runs_per_hour": 4,
                     "time_to_answer": 25, "fast_preset": 45, "throughput": 5, "trial_overhead": 1, "pruning": 2,
                     "memory": 8, "workers": 6, "data": 1}}


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> dict:
    k = runtime.keras()
    info = {"cpu": runtime.cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "keras": k.__version__, "backend": k.backend.backend(), "device": runtime.device_description()}
    if k.backend.backend() == "tensorflow":
        import tensorflow as tf

        build = tf.sysconfig.get_build_info()
        info["tensorflow"] = f"{tf.__version__} (cuda: {build.get('is_cuda_build', False)})"
    return info


def base_overrides(size: dict, tmp: Path, width: float | None = None, train: int | None = None) -> list[str]:
    return [
        "dataset=folder", f"dataset.path={SHARED_CIFAR}", f"dataset.train_limit={train or size['train']}",
        f"dataset.test_limit={size['test']}", f"+width={width or size['width']}", f"train.epochs={size['epochs']}",
        "train.verbose=0", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        f"tracking.artifact_root={tmp / 'mlartifacts'}", "tracking.log_model=false",
    ]


def bare_fit(cfg, callbacks=()) -> dict:
    """What the notebook does: build, compile with defaults, model.fit on NumPy arrays, evaluate."""
    from cnnexp.model.build import build_model
    from cnnexp.run import prepare
    from cnnexp.train.callbacks import epoch_timer
    from cnnexp.train.recipe import make_optimizer

    layers, data = prepare(cfg, validated=True)
    k = runtime.keras()
    k.backend.clear_session()
    k.utils.set_random_seed(int(cfg.train.seed))
    model = build_model(layers, data.input_shape, data.num_classes, cfg.model.padding)
    model.compile(optimizer=make_optimizer(cfg.train, 1000), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    timer = epoch_timer()
    began = time.perf_counter()
    history = model.fit(data.x_train, data.y_train, batch_size=int(cfg.train.batch_size),
                        epochs=int(cfg.train.epochs), validation_data=(data.x_val, data.y_val),
                        callbacks=[timer, *callbacks], verbose=0)
    model.evaluate(data.x_test, data.y_test, verbose=0)
    return {"images_per_second": timer.images_per_second(len(data.y_train)),
            "seconds": time.perf_counter() - began, "val_accuracy": history.history["val_accuracy"][-1],
            "epochs": len(history.history["loss"])}


def median_of(fn, repeats: int) -> tuple[float, list[float]]:
    values = [fn() for _ in range(repeats)]
    return statistics.median(values), values


# --------------------------------------------------------------------------------------------


def bench_throughput(size: dict, tmp: Path) -> dict:
    from cnnexp.config import compose_config
    from cnnexp.run import run

    overrides = base_overrides(size, tmp)
    variants = {
        "cnnexp.run (defaults)": [],
        "cnnexp.run pipeline=numpy": ["train.pipeline=numpy"],
        "cnnexp.run jit_compile=false": ["train.jit_compile=false"],
        "cnnexp.run jit_compile=true": ["train.jit_compile=true"],
        "cnnexp.run steps_per_execution=1": ["train.steps_per_execution=1"],
    }
    rows = {}
    bare = lambda: bare_fit(compose_config(overrides))["images_per_second"]  # noqa: E731
    for name, extra in [("bare model.fit (NumPy)", None), *variants.items()]:
        if extra is None:
            fn = bare
        else:
            cfg = compose_config([*overrides, *extra])
            fn = lambda cfg=cfg, extra=extra: run(cfg, overrides=[*overrides, *extra]).metrics["images_per_second"]  # noqa: E731
        rows[name] = median_of(fn, size["repeats"])
    baseline = rows["bare model.fit (NumPy)"][0]
    return {name: {"images_per_second": round(value, 1), "runs": [round(v, 1) for v in values],
                   "ratio_vs_bare": round(value / baseline, 3)} for name, (value, values) in rows.items()}


def _sweep_file(tmp: Path, size: dict, name: str, pruner: dict, trials: int, params: dict,
                extra: tuple[str, ...] = ()) -> Path:
    doc = {
        "overrides": [*base_overrides(size, tmp, width=size["sweep_width"], train=size["sweep_train"]), *extra],
        "sweep": {"n_trials": trials, "storage": f"sqlite:///{tmp / 'studies.db'}", "study_name": name,
                  "sampler": {"name": "tpe", "seed": 0}, "pruner": pruner, "estimate": False,
                  "output_dir": str(tmp / "out"), "log_models": "none"},
        "params": params,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def bench_trial_overhead(size: dict, tmp: Path) -> dict:
    """K sweep trials vs K bare fits of exactly the trials' configurations."""
    from cnnexp.config import compose_config
    from cnnexp.study import engine
    from cnnexp.study.space import load_sweep

    k = size["sweep_trials"]
    path = _sweep_file(tmp, size, "overhead", {"name": "none"}, k, {"kernel": "choice(3,5)"})
    loaded = load_sweep(str(path))
    compose_config(loaded.overrides)  # warm Hydra
    began = time.perf_counter()
    study = engine.optimize(loaded, show_progress=False)
    sweep_seconds = time.perf_counter() - began
    trial_seconds = [t.duration.total_seconds() for t in study.trials]
    began = time.perf_counter()
    for trial in study.trials:
        bare_fit(compose_config(trial.user_attrs["overrides"]))
    bare_seconds = time.perf_counter() - began
    per_trial = (sweep_seconds - bare_seconds) / k
    return {"trials": k, "sweep_seconds": round(sweep_seconds, 2), "bare_seconds": round(bare_seconds, 2),
            "overhead_per_trial_s": round(per_trial, 3),
            "overhead_percent": round(100 * per_trial / (bare_seconds / k), 2),
            "median_trial_seconds": round(statistics.median(trial_seconds), 2)}


def bench_pruning(size: dict, tmp: Path) -> dict:
    from cnnexp.study import engine
    from cnnexp.study.space import load_sweep

    params = {"kernel": "choice(2,3,5,7)", "train.lr": "tag(log, interval(0.001, 0.3))"}
    out = {}
    for label, pruner in (("without pruner", {"name": "none"}),
                          ("median pruner", {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0})):
        # Pruning pays off when trials are several epochs long: 4 here, as in the real sweeps.
        path = _sweep_file(tmp, size, f"pruning-{pruner['name']}", pruner, 2 * size["sweep_trials"], params,
                           extra=(f"train.epochs={max(2, size['epochs'] + 1)}",))
        study = engine.optimize(load_sweep(str(path)), show_progress=False)
        epochs = sum(len(t.intermediate_values) for t in study.trials)
        best = max((t.value for t in study.trials if t.value is not None), default=float("nan"))
        out[label] = {"epochs": epochs, "best_val_accuracy": round(best, 4),
                      "pruned": sum(t.state.name == "PRUNED" for t in study.trials)}
    without, with_ = out["without pruner"], out["median pruner"]
    out["epochs_saved_percent"] = round(100 * (1 - with_["epochs"] / without["epochs"]), 1)
    out["best_accuracy_change_points"] = round(100 * (with_["best_val_accuracy"] - without["best_val_accuracy"]), 2)
    return out


def bench_memory(size: dict, tmp: Path) -> dict:
    from cnnexp.study import engine
    from cnnexp.study.space import load_sweep

    n = size["memory_trials"]
    path = _sweep_file(tmp, size, "memory", {"name": "none"}, n, {"kernel": "choice(2,3,4,5,6,7)"})
    loaded = load_sweep(str(path))
    samples = []
    from cnnexp.study import objective

    real_run = objective.run

    def measured(*args, **kwargs):
        result = real_run(*args, **kwargs)
        samples.append(rss_mb())
        return result

    objective.run = measured
    try:
        engine.optimize(loaded, show_progress=False)
    finally:
        objective.run = real_run
    settle = min(2, len(samples) - 1)  # the first trials fill allocator pools and caches
    inline = {"trials": n, "rss_mb_after_each": [round(v) for v in samples],
              "growth_mb_after_warmup": round(samples[-1] - samples[settle], 1), "peak_mb": round(max(samples))}
    return {**inline, "recycled": _memory_with_recycling(size, tmp, n)}


def _memory_with_recycling(size: dict, tmp: Path, n: int) -> dict:
    """The CLI's default: the worker restarts itself every `sweep.recycle_after` trials (same pid)."""
    import subprocess
    import sys
    import threading

    recycle = max(1, n // 4)
    folder = tmp / "recycled"
    folder.mkdir()
    path = _sweep_file(folder, size, "memory", {"name": "none"}, n, {"kernel": "choice(2,3,4,5,6,7)"})
    proc = subprocess.Popen([sys.executable, "-m", "cnnexp.sweep", "--sweep", str(path), "--no-report",
                             f"sweep.recycle_after={recycle}"], cwd=folder,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: list[tuple[float, float]] = []

    def sample():
        while proc.poll() is None:
            try:
                text = Path(f"/proc/{proc.pid}/status").read_text()
                samples.append((time.monotonic(), int(text.split("VmRSS:")[1].split()[0]) / 1024))
            except (OSError, IndexError):
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=sample)
    watcher.start()
    proc.wait()
    watcher.join()
    quarter = len(samples) // 4
    first = max(v for _, v in samples[:quarter]) if quarter else float("nan")
    last = max(v for _, v in samples[-quarter:]) if quarter else float("nan")
    return {"recycle_after": recycle, "peak_mb": round(max(v for _, v in samples)),
            "peak_first_quarter_mb": round(first), "peak_last_quarter_mb": round(last),
            "growth_mb": round(last - first, 1)}


def bench_workers(size: dict, tmp: Path) -> dict:
    """The same sweep with 1, 2 and 4 local worker processes (process start and TF import included)."""
    import subprocess
    import sys

    import optuna

    counts = (1, 2) if size["sweep_trials"] < 4 else (1, 2, 4)
    trials = 2 * size["sweep_trials"]
    out = {}
    for workers in counts:
        folder = tmp / f"w{workers}"
        folder.mkdir()
        path = _sweep_file(folder, size, "workers", {"name": "none"}, trials, {"kernel": "choice(2,3,4,5)"})
        began = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cnnexp.sweep", "--sweep", str(path), "--no-report",
                        f"sweep.workers={workers}"], check=True, cwd=folder, capture_output=True)
        wall = time.perf_counter() - began
        study = optuna.load_study(study_name="workers", storage=f"sqlite:///{folder / 'studies.db'}")
        complete = sum(t.state.name == "COMPLETE" for t in study.trials)
        out[str(workers)] = {"trials": len(study.trials), "complete": complete, "wall_seconds": round(wall, 1),
                             "trials_per_hour": round(3600 * complete / wall, 1)}
    return out


def bench_data(size: dict, tmp: Path) -> dict:
    from cnnexp.config import compose_config
    from cnnexp.data import load as data

    cfg = compose_config(["dataset=folder", f"dataset.path={SHARED_CIFAR}", f"dataset.cache_dir={tmp / 'cache'}"])
    began = time.perf_counter()
    raw = data.load_raw(cfg.dataset)
    cold = time.perf_counter() - began

    def cached():
        began = time.perf_counter()
        data.load_raw(cfg.dataset)
        return time.perf_counter() - began

    warm, values = median_of(cached, 3)
    return {"images": len(raw.y_train) + len(raw.y_test), "cold_seconds": round(cold, 2),
            "cached_seconds": round(warm, 3), "speedup": round(cold / warm, 1)}


def to_markdown(report: dict) -> str:
    lines = ["# cnnexp benchmarks", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()),
             f"Size: {report['size']}", ""]
    if "runs_per_hour" in report:
        lines += [*runs_per_hour.to_markdown(report["runs_per_hour"]), ""]
    if "time_to_answer" in report:
        lines += [*time_to_answer.to_markdown(report["time_to_answer"]), ""]
    if "fast_preset" in report:
        lines += [*fast_preset.to_markdown(report["fast_preset"]), ""]
    t = report["throughput"]
    lines += ["## 1. Training throughput (images/s, median of repeats; target: cnnexp.run >= 1.0x bare)", "",
              "| variant | images/s | ratio vs bare | runs |", "|---|---:|---:|---|"]
    lines += [f"| {k} | {v['images_per_second']} | {v['ratio_vs_bare']} | {v['runs']} |" for k, v in t.items()]
    o = report["trial_overhead"]
    lines += ["", "## 2. Per-trial overhead (target: <= 2% and < 1 s per trial)", "",
              f"{o['trials']} sweep trials in {o['sweep_seconds']} s vs the same {o['trials']} bare fits in "
              f"{o['bare_seconds']} s: **{o['overhead_per_trial_s']} s per trial, {o['overhead_percent']}%**."]
    p = report["pruning"]
    lines += ["", "## 3. Pruning (target: >= 40% fewer epochs for <= 0.5 points of best accuracy)", "",
              "| sweep | epochs | pruned | best val_accuracy |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['epochs']} | {v['pruned']} | {v['best_val_accuracy']} |"
              for k, v in p.items() if isinstance(v, dict)]
    lines += ["", f"Epochs saved: **{p['epochs_saved_percent']}%**, best accuracy change: "
              f"**{p['best_accuracy_change_points']} points**."]
    m = report.get("memory")
    r = m["recycled"] if m else None
    lines += [] if m is None else ["", "## 4. Memory over consecutive trials (target: growth <= 100 MB)", "",
              f"In one process (the API, `sweep.recycle_after=0`): RSS after each of {m['trials']} trials (MB): "
              f"{m['rss_mb_after_each']}; growth after warm-up **{m['growth_mb_after_warmup']} MB**, "
              f"peak {m['peak_mb']} MB.",
              "", f"The CLI (restarts its process every {r['recycle_after']} trials): peak RSS in the first quarter "
              f"{r['peak_first_quarter_mb']} MB, in the last {r['peak_last_quarter_mb']} MB: "
              f"growth **{r['growth_mb']} MB**, peak {r['peak_mb']} MB."]
    w = report.get("workers", {})
    lines += [] if not w else ["",
                               f"## 5. Local workers on one study ({runtime.device_description()}; SQLite storage)", "",
                               "| workers | trials | wall (s) | trials/hour |", "|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['complete']}/{v['trials']} | {v['wall_seconds']} | {v['trials_per_hour']} |"
              for k, v in w.items()]
    if not (m and w):
        lines += ["", "(memory soak and local workers: `make bench FULL=1`)"]
    d = report["data"]
    lines += ["", "## 6. Data: CIFAR-10 image folder, cold vs cached", "",
              f"{d['images']} images: cold (read the archive + decode) **{d['cold_seconds']} s**, from the cache "
              f"**{d['cached_seconds']} s** ({d['speedup']}x)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    global SHARED_CIFAR
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_CIFAR,
                        help="the CIFAR-10 image-folder archive or folder (default: the shared copy)")
    parser.add_argument("--full", action="store_true",
                        help="also the long parts: memory soak and local workers")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long configuration (for tests)")
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--only", nargs="*",
                        choices=["runs_per_hour", "time_to_answer", "fast_preset",
                                  "throughput", "trial_overhead", "pruning", "memory",
                                 "workers", "data"])
    args = parser.parse_args(argv)
    SHARED_CIFAR = args.data.resolve()
    if not SHARED_CIFAR.exists():
        print(f"error: the benchmarks read the CIFAR-10 image folder {SHARED_CIFAR}; it is not there "
              "(pass --data, or set CNNEXP_SHARED_DATA to the folder holding it).")
        return 2
    size = SIZES["tiny" if args.tiny else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "size": "tiny" if args.tiny else "full"}
    scale = "tiny" if args.tiny else "full"
    parts = {"runs_per_hour": lambda size, folder: runs_per_hour.bench_runs_per_hour(SHARED_CIFAR, folder, args.tiny),
             "time_to_answer": lambda size, folder: time_to_answer.bench_time_to_answer(folder, tiny=args.tiny),
             "fast_preset": lambda size, folder: fast_preset.bench_fast_preset(folder, tiny=args.tiny),
             "throughput": bench_throughput, "trial_overhead": bench_trial_overhead, "pruning": bench_pruning,
             "memory": bench_memory, "workers": bench_workers, "data": bench_data}
    with tempfile.TemporaryDirectory(prefix="cnnexp-bench-") as tmp:
        for name, fn in parts.items():
            if (args.only and name not in args.only) or (name in LONG and not (args.full or args.only)):
                continue
            print(f"{name}: running (about {EXPECTED[scale].get(name, '?')} min here) ...", flush=True)
            began = time.perf_counter()
            folder = Path(tmp) / name
            folder.mkdir()
            report[name] = fn(size, folder)
            if name == "fast_preset":
                fast_preset.plot(report[name], out / "fast_preset.png")
            print(f"{name}: {json.dumps(report[name])} ({time.perf_counter() - began:.0f} s)", flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.only:
        (out / "report.md").write_text(to_markdown(report))
        print(to_markdown(report))
    print(f"Written: {out / 'report.json'}" + ("" if args.only else f", {out / 'report.md'}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
