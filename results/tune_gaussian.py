"""The tuning sweep behind the defaults of baselines.GaussianConfig (results/README.md).

Each setting is meta-trained on the benchmark's seed-0 meta-training tasks and scored on 64
VALIDATION tasks drawn from another seed (not the benchmark's test tasks), with the
benchmark's own estimator (S = 1024 joint draws), at n = 0, 1, 2, 4, 8, 16. One JSON line per
setting is appended to the output file.

    python results/tune_gaussian.py OUT.jsonl kernel family features width lr [iters]
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import baselines as bl  # noqa: E402
import bench  # noqa: E402
import ldvi_meta as lm  # noqa: E402
import tasks  # noqa: E402

VALIDATION_SEED = 424242
CONTEXTS = [0, 1, 2, 4, 8, 16]


def main(out, kernel, family, features, width, lr, iters="10000"):
    seed = lambda k: torch.Generator().manual_seed(k)  # noqa: E731
    fam = tasks.TASKS[family]
    train, _, _ = tasks.make_tasks(fam, 64, 16, 0.25, seed(1))          # the benchmark's seed-0 meta-training tasks
    val, _, _ = tasks.make_tasks(fam, 64, 64, 0.25, seed(VALIDATION_SEED))
    cfg = bl.GaussianConfig(kernel=kernel, features=int(features), width=int(width), lr=float(lr), iters=int(iters),
                            log_every=0)
    model = bl.GaussianModel(cfg, seed(3))
    t0 = time.perf_counter()
    model.fit(train, seed(4))
    train_s = time.perf_counter() - t0
    bayes = tasks.bayes_optimal(val, CONTEXTS, 0.25, family, 1024, seed(7), draws=1 << 15)
    scores, _ = bench.evaluate(model, val, CONTEXTS, 1024, seed(5), 1, progress=False)
    row = dict(kernel=kernel, family=family, features=int(features), width=int(width), lr=float(lr),
               iters=int(iters), train_s=train_s)
    for n in CONTEXTS:
        lp = scores[n]["lmlhd"]
        exact = model.exact_log_predictive(lm.first_n(val, n), val)
        row[n] = dict(median=lp.median().item(), fail=(lp < bayes[n]["exact"] - 20).double().mean().item(),
                      exact=exact.median().item())
    row["mean_median"] = sum(row[n]["median"] for n in CONTEXTS) / len(CONTEXTS)
    with open(out, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main(*sys.argv[1:])
