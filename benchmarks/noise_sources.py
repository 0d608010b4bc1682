"""Where seed noise comes from: a small nested study, one source varied at a time at the default study's scale.

    python benchmarks/noise_sources.py [--runs 6]

(`train.pipeline=numpy`: its batches follow `train.data_seed` alone; tf.data's shuffle also follows
the global seed that `train.seed` sets, so there the two can't be told apart.)

With everything else fixed, it varies (1) the initialisation (`train.seed`, the data order held by
`train.data_seed=0`), (2) the data order (`train.data_seed`), (3) which training images the subset
draws (`dataset.subset_seed`), and reports each one's SD of the validation accuracy on the study's
fixed evaluation set, beside the binomial SD that evaluation set's size alone gives. The default
study's confidence intervals cover (1) and (2); its training images are fixed by subset_seed.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

SCALE = ["dataset.train_limit=4800", "dataset.eval_limit=3000", "dataset.test_limit=500", "train.epochs=3",
         "+width=0.25", "train.optimizer=adam", "train.pipeline=numpy", "tracking=off", "train.verbose=0"]
SOURCES = {"initialisation": "train.seed={i}", "data order": "train.data_seed={i}",
           "training images": "dataset.subset_seed={i}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=6)
    args = parser.parse_args(argv)
    from cnnexp import runtime
    from cnnexp.config import compose_config
    from cnnexp.run import DatasetMemo, run

    runtime.setup_environment()
    memo, out = DatasetMemo(), {}
    for source, pattern in SOURCES.items():
        scores = []
        for i in range(args.runs):
            fixed = ["train.seed=0", "train.data_seed=0", "dataset.subset_seed=0"]
            varied = pattern.format(i=i)
            overrides = [*SCALE, *[f for f in fixed if f.split("=")[0] != varied.split("=")[0]], varied]
            scores.append(run(compose_config(overrides), validated=True, datasets=memo).metrics["val_accuracy"])
        mean = float(np.mean(scores))
        out[source] = {"scores": [round(s, 4) for s in scores],
                       "sd_points": round(100 * float(np.std(scores, ddof=1)), 2)}
        print(f"{source}: sd {out[source]['sd_points']} points over {args.runs} runs "
              f"({out[source]['scores']})", flush=True)
    out["evaluation set (binomial, 3,000 images)"] = {"sd_points": round(100 * math.sqrt(mean * (1 - mean) / 3000), 2)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
