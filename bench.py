"""
The benchmark table: amortized LDVI against MAML, BMAML, the Neural Process and two
meta-learned Gaussian models (ALPaCA, a deep-kernel GP), measured against the Bayes-optimal
predictive and, optionally, an HMC gold standard.

    python bench.py --task sinusoid            # the default run (about 20 min on 2 CPU cores)
    python bench.py --task linesine --plot results/linesine.png
    python bench.py --methods LDVI-overdamped,NP --gold 16
    python bench.py --task sinusoid --quick    # smoke run, under a minute; never writes into results/
    python bench.py --speed --baseline OLD     # training and evaluation speed, against an older checkout
    python bench.py --headline results/headline.png   # the headline figure from the committed results

Protocol (after Volpp et al., ICLR 2023 [1]): x ~ U[-5, 5], Gaussian noise std 0.25; 64
meta-training tasks x 16 points; 256 test tasks x 64 points; the context is the first n
points of a test task and the targets are all 64 points (the context included). Per test
task and context size n:
  LMLHD = logsumexp_s sum_m log N(y_m; f_s(x_m), sigma_s^2) - log S, the log marginal
          predictive likelihood of the 64 targets under the method's equal-weight mixture
          of S = 1024 predictive components (posterior samples);
  MSE   = mean over the targets of (mixture mean - y)^2.
Tables report the median over test tasks (LMLHD per task, and per point in brackets).
Every default is a flag, so other protocols can be run.

Reference rows (not learned):
  Bayes-optimal     log E_{p(w|C)} p(y_all | w) under the TRUE task distribution (exact;
                    tasks.py): the Bayes-optimal predictive, scored like every method;
  Bayes, S draws    the same LMLHD estimator fed S exact posterior draws: what a perfect
                    sampler scores at finite S;
  oracle            the true function with the true noise (knows the task itself).
The Gaussian models also get a row "<name>, exact": the same scores for their exact Gaussian
predictive (the S = infinity value of their LMLHD).
--gold N adds, for each trained LDVI model, a Metropolis-corrected HMC on the same model's
posterior for the first N test tasks: ours - gold is the inference gap, gold - Bayes the
model gap.

A task family of your own is a function family(T, gen) -> f that draws T tasks and returns
f: x [T, M, 1] -> noise-free y [T, M, 1]. Pass --task module:function.

[1] M. Volpp, P. Dahlinger, P. Becker, C. Daniel, G. Neumann. Accurate Bayesian
    meta-learning by accurate task posterior inference. ICLR 2023.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import asdict, replace

import torch

import baselines as bl
import ldvi_meta as lm
from gold import Gold
from tasks import TASKS, bayes_optimal, linesine, make_tasks, sinusoid  # noqa: F401 (re-exported)

RESULTS = "results"


# -----------------------------------------------------------------------------
# the methods, with the benchmark's settings

def method_configs(args) -> dict:
    """name -> (class, config). Ours: the library defaults of LDVIConfig (one source of truth:
    overdamped, a hidden latent of r_h = 4, 1800 iterations with the learning rate decaying from
    3e-3 to 3e-4, sigma_y fixed) with the flags' K, r, iterations and sigma_y = the true noise;
    run_seed then sets their input scale and length by select_design unless --no-select. MAML
    and NP learn their noise."""
    it = args.iters
    ldvi = dict(K=args.K, latent=args.latent, iters=it["ldvi"], sigma_y=args.noise)
    return {
        "LDVI-underdamped": (lm.LDVIMeta, lm.LDVIConfig(kernel="underdamped", **ldvi)),
        "LDVI-overdamped": (lm.LDVIMeta, lm.LDVIConfig(kernel="overdamped", **ldvi)),
        "LDVI-K0": (lm.LDVIMeta, lm.LDVIConfig(**{**ldvi, "K": 0})),
        "LDVI-fixed-hidden": (lm.LDVIMeta, lm.LDVIConfig(kernel="underdamped", **ldvi, **FIXED_HIDDEN)),
        "LDVI-all-weights": (lm.LDVIMeta, lm.LDVIConfig(kernel="overdamped", **ldvi, **EARLIER_PRIOR)),
        "LDVI-diagonal": (lm.LDVIMeta, lm.LDVIConfig(kernel="overdamped", **{**ldvi, "latent": 0}, **EARLIER_PRIOR)),
        "NP": (bl.NeuralProcess, bl.NPConfig(iters=it["np"], lr=1e-3)),
        "MAML": (bl.MAML, bl.MAMLConfig(iters=it["maml"], lr=1e-3, adapt_steps=5, inner_lr=0.01)),
        "BMAML": (bl.BMAML, bl.BMAMLConfig(iters=it["bmaml"], lr=1e-3, particles=10, chaser_steps=5,
                                           leader_steps=1, sigma_y=args.noise)),
        "ALPaCA": (bl.GaussianModel, bl.GaussianConfig(kernel="linear", iters=it["gauss"], sigma_y=args.noise)),
        "DeepKernelGP": (bl.GaussianModel, bl.GaussianConfig(kernel="rbf", iters=it["gauss"], sigma_y=args.noise)),
    }


METHODS = ("LDVI-underdamped", "LDVI-overdamped", "LDVI-K0", "LDVI-fixed-hidden", "LDVI-all-weights", "LDVI-diagonal", "NP", "MAML",
           "BMAML", "ALPaCA", "DeepKernelGP")
ABLATIONS = ("LDVI-fixed-hidden", "LDVI-all-weights", "LDVI-diagonal")  # not in a default run: --methods ...
DEFAULT_METHODS = tuple(m for m in METHODS if m not in ABLATIONS)
# the design before the hidden latent: the hidden layers' 1720 weights are the state (prior std 1e-3), trained
# with the gradient through the chain (without it this state trains much worse)
FIXED_HIDDEN = dict(hidden_latent=0, drift_grad=True)
EARLIER_PRIOR = dict(structure="all", components=1, prior_std_init=0.1, **FIXED_HIDDEN)  # the latent moves all weights
DESCRIPTION = {
    "LDVI-underdamped": "ours: last-layer prior (a 2-component mixture with an r-dim task latent, integrated out "
                        "exactly given the hidden layers), hidden layers moved by an r_h-dim latent, input scale and "
                        "length chosen on held-out tasks, underdamped kernel",
    "LDVI-overdamped": "ours, overdamped kernel",
    "LDVI-K0": "ours with K = 0: amortized mean-field VI on the hidden latent, last-layer prior",
    "LDVI-fixed-hidden": "ours with the hidden layers' weights as the state (no hidden latent; the default until "
                         "2026-12-07), underdamped kernel, full gradient through the chain: ablation",
    "LDVI-all-weights": "ours with the earlier prior (the latent moves every weight), overdamped kernel: ablation",
    "LDVI-diagonal": "ours with the earlier prior and r = 0 (a diagonal prior), overdamped kernel: ablation",
    "ALPaCA": "Bayesian linear regression on meta-learned features, exact inference",
    "DeepKernelGP": "GP with an RBF kernel on meta-learned features, exact inference",
}
EXACT = ", exact"  # suffix of the row of a Gaussian model's exact predictive (S = infinity)
REFERENCE_ROWS = ("oracle", "Bayes-optimal", "Bayes, S draws")


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def oracle_scores(test: lm.Batch, clean: torch.Tensor, noise: float):
    """Per-task LMLHD and MSE of the true function with the true noise (the physical limit)."""
    lp = lm.gaussian_loglik(clean.unsqueeze(1), test.y, test.mask, torch.tensor(noise, dtype=clean.dtype))[:, 0]
    return lp, lm.mse(clean.unsqueeze(1), test)


def task_chunks(batch: lm.Batch, chunk: int) -> list:
    """Consecutive slices of `chunk` tasks: bound the memory and keep the [tasks, S, D] tensors in cache."""
    return [lm.Batch(batch.x[a:a + chunk], batch.y[a:a + chunk], batch.mask[a:a + chunk])
            for a in range(0, batch.x.shape[0], chunk)]


BAYES_DRAWS = 1 << 15  # importance draws per task for the exact Bayes rows (4x at n <= 1)
NOISE_RANGE = 1e3      # --noise may be at most this many times the RMS of the task family's functions
LEVELS = tuple(i / 10 for i in range(1, 10))  # nominal coverages of the central predictive intervals
TAIL_NATS = 20.0                               # a task "fails" more than this far below the Bayes-optimal score


def mixture_cdf(mean: torch.Tensor, std, y: torch.Tensor) -> torch.Tensor:
    """F(y) of the equal-weight Gaussian mixture at every target: mean [T, S, M, dy], std broadcasting
    to it, y [T, M, dy] -> [T, M, dy] (the probability integral transform of the targets)."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    return torch.special.ndtr((y.unsqueeze(1) - mean) / std).mean(1)                  # [T, M, dy]


def coverage_counts(mean: torch.Tensor, std, target: lm.Batch, levels=LEVELS) -> torch.Tensor:
    """How many real targets of each task fall inside the mixture's central interval at each level:
    [T, len(levels)]. y is inside the central interval of mass a iff |F(y) - 1/2| <= a / 2."""
    dist = (mixture_cdf(mean, std, target.y) - 0.5).abs()                              # [T, M, dy]
    half = torch.tensor(levels, dtype=dist.dtype, device=dist.device) / 2             # [L]
    inside = (dist.unsqueeze(-1) <= half).sum(-2)                                      # [T, M, L]
    return (inside * target.mask.unsqueeze(-1)).sum(1)                                 # [T, L]


def calibration_error(counts: torch.Tensor, points: torch.Tensor, levels=LEVELS) -> float:
    """Mean over levels a of |empirical coverage - a|, the coverage pooled over all tasks' targets:
    counts [T, L] from coverage_counts, points [T] real targets per task (times dy)."""
    cover = counts.sum(0).double() / points.sum().double()                             # [L]
    return (cover - torch.tensor(levels, dtype=torch.float64)).abs().mean().item()


def evaluate(model, test: lm.Batch, contexts, S: int, gen: torch.Generator, chunk: int, name: str = "",
             progress: bool = True, workers: int | None = None):
    """Per-task scores for every context size: {n: dict(lmlhd [T], mse [T], cover [T, L])} and the
    ms per task. Progress with an ETA on stderr.

    The (context size, chunk of tasks) jobs are independent, and each draws from its own
    generator seeded from gen in a fixed order, so the numbers do not depend on `workers`.
    On the CPU the jobs run on `workers` threads (default: torch's thread count) with one
    intra-op thread each: the batched ops of one job are small, and two such jobs use two
    cores better than one job on two threads (about 1.5x, measured at S = 1024)."""
    parts = task_chunks(test, chunk)
    jobs = [(n, part) for n in contexts for part in parts]
    seeds = torch.randint(0, 2 ** 62, (len(jobs),), generator=gen, device=gen.device).tolist()

    def job(i):
        n, part = jobs[i]
        g = torch.Generator(device=gen.device).manual_seed(seeds[i])
        mean, std = model.predictive(lm.first_n(part, n), part.x, S, g)
        return lm.log_predictive(mean, std, part), lm.mse(mean, part), coverage_counts(mean, std, part)

    out, t0, done = {}, time.perf_counter(), []
    results = lm.parallel_map(job, range(len(jobs)), workers or torch.get_num_threads(), test.x.device)
    try:
        for i, res in enumerate(results):
            done.append(res)
            if (i + 1) % len(parts):
                continue
            n = jobs[i][0]
            lp, err, cover = (torch.cat(t) for t in zip(*done[-len(parts):]))
            if not (torch.isfinite(lp).all() and torch.isfinite(err).all()):
                raise FloatingPointError(f"{name}: non-finite predictive scores at context size {n}")
            out[n] = dict(lmlhd=lp, mse=err, cover=cover)
            el, k = time.perf_counter() - t0, len(out)
            if progress:
                print(f"[bench] {name}: evaluated n = {n} ({k}/{len(contexts)}), {el:.0f}s, "
                      f"eta {el / k * (len(contexts) - k):.0f}s", file=sys.stderr, flush=True)
    finally:  # a failure (or Ctrl-C) drops the jobs not yet started instead of running them all first
        results.close()
    return out, (time.perf_counter() - t0) * 1e3 / (len(contexts) * test.x.shape[0])


def evaluate_exact(model, test: lm.Batch, contexts, chunk: int = 16):
    """Per-task scores of a Gaussian model's exact predictive, as evaluate() gives them for S draws:
    the joint log density of the targets (the S = infinity LMLHD), the MSE of its mean, and the
    coverage of its marginal central intervals N(mean_m, var_m + sigma_y^2). Also the ms per task."""
    out, t0 = {}, time.perf_counter()
    for n in contexts:
        parts = []
        for part in task_chunks(test, chunk):
            ctx = lm.first_n(part, n)
            mean, cov = model.exact_predictive(ctx, part.x)                          # [T, M, dy], [T, M, M]
            std = (cov.diagonal(dim1=-2, dim2=-1) + model.noise_var()).sqrt()        # [T, M]
            mean1 = mean.unsqueeze(1)                                                # [T, 1, M, dy]
            std1 = std.unsqueeze(1).unsqueeze(-1)                                    # [T, 1, M, 1]
            parts.append((model.exact_log_predictive(ctx, part), lm.mse(mean1.to(part.y.dtype), part),
                          coverage_counts(mean1, std1, part)))
        lp, err, cover = (torch.cat(t) for t in zip(*parts))
        out[n] = dict(lmlhd=lp, mse=err, cover=cover)
    return out, (time.perf_counter() - t0) * 1e3 / (len(contexts) * test.x.shape[0])


def summaries(per_task: dict, test: lm.Batch, bayes: dict | None = None) -> dict:
    """The table's numbers per context size: median LMLHD and MSE, the 10% quantile of the
    per-task LMLHD, the calibration error and, where the Bayes-optimal score is known, the
    fraction of tasks more than TAIL_NATS below it."""
    points = test.counts * test.y.shape[-1]                                            # [T]
    out = {}
    for n, d in per_task.items():
        lp = d["lmlhd"]
        out[n] = dict(lmlhd=lp.median().item(), mse=d["mse"].median().item(),
                      lmlhd_q10=torch.quantile(lp.double(), 0.1).item(),
                      calibration=calibration_error(d["cover"], points))
        if bayes is not None:
            out[n]["tail"] = (lp.double() < bayes[n].double() - TAIL_NATS).double().mean().item()
    return out


# -----------------------------------------------------------------------------
# one seed: data, reference rows, then every method (a failure becomes a row)

def run_seed(args, seed: int, device, done: dict, save_partial) -> dict:
    """Rows for one seed. `done` holds rows already finished (--resume); save_partial(rows) is
    called after every method so that finished numbers survive a later failure."""
    g = lambda k: torch.Generator(device=device).manual_seed(1000 * seed + k)  # noqa: E731
    t0 = time.perf_counter()
    if args.task not in TASKS:  # a user family may be slow: say what is happening
        print(f"[bench] seed {seed}: drawing {args.meta_tasks} meta-training and {args.test_tasks} test tasks from "
              f"{args.task}", file=sys.stderr, flush=True)
    train, _, _ = make_tasks(args.family, args.meta_tasks, args.points, args.noise, g(1))
    test, clean, f_true = make_tasks(args.family, args.test_tasks, args.test_points, args.noise, g(2))
    if args.task not in TASKS:
        print(f"[bench] seed {seed}: tasks drawn in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    rows, models, per_task = dict(done), {}, {}
    if "oracle" not in rows:
        ora_lp, ora_mse = oracle_scores(test, clean, args.noise)
        ora = dict(lmlhd=ora_lp, mse=ora_mse, cover=coverage_counts(clean.unsqueeze(1), args.noise, test))
        rows["oracle"] = dict(status="ok", scores=summaries({n: ora for n in args.contexts}, test), train_s=0.0,
                              ms_per_task=0.0, params=0)
    if args.task in TASKS and not bayes_rows_complete(rows):  # (older files lack per_task, the floor's columns)
        t0 = time.perf_counter()
        print(f"[bench] seed {seed}: Bayes-optimal rows", file=sys.stderr, flush=True)
        try:
            bayes = bayes_optimal(test, args.contexts, args.noise, args.task, args.samples,
                                  torch.Generator().manual_seed(1000 * seed + 7), draws=args.bayes_draws,
                                  cover=coverage_counts)
        except ValueError as e:  # e.g. importance sampling degenerate at a tiny noise: the rows fail, nothing else
            bayes = {}
            for row in ("Bayes-optimal", "Bayes, S draws"):
                rows[row] = dict(status="failed", error=f"ValueError: {e}")
        ms = (time.perf_counter() - t0) * 1e3 / (len(args.contexts) * args.test_tasks)
        if bayes:
            rows["Bayes-optimal"] = dict(status="ok", train_s=0.0, ms_per_task=ms, params=0,
                                         scores={n: dict(lmlhd=d["exact"].median().item(),
                                                         mse=d["exact_mse"].median().item(),
                                                         lmlhd_q10=torch.quantile(d["exact"], 0.1).item())
                                                 for n, d in bayes.items()},
                                         per_task={n: d["exact"].tolist() for n, d in bayes.items()})  # for the tails
            # the floor that S draws allow: failures against the exact row, and calibration, like every method
            floor = summaries({n: dict(lmlhd=d["draws"], mse=d["draws_mse"], cover=d["draws_cover"])
                               for n, d in bayes.items()}, test, {n: d["exact"] for n, d in bayes.items()})
            rows["Bayes, S draws"] = dict(status="ok", train_s=0.0, ms_per_task=ms, params=0, scores=floor)
        save_partial(rows)
    if "per_task" in rows.get("Bayes-optimal", {}):
        per_task["Bayes-optimal"] = {int(n): torch.tensor(v) for n, v in rows["Bayes-optimal"]["per_task"].items()}
    selection = next((r["selection"] for r in rows.values() if r.get("selection")), None)  # --resume: the same choice
    for name in args.methods:
        cls, cfg = method_configs(args)[name]
        if name in rows and rows[name]["status"] == "ok" and not args.gold and \
                (not issubclass(cls, bl.GaussianModel) or name + EXACT in rows):
            print(f"[bench] seed {seed}: {name} reused from the partial results (--resume)", file=sys.stderr)
            saved = os.path.join(args.save_dir or "", f"{args.task.replace(':', '_')}_seed{seed}_{name}.pt")
            if args.plot and seed == args.seed and args.save_dir and os.path.exists(saved):
                models[name] = cls.load(saved, device)  # for the figures only
            continue
        cfg.log_every = max(cfg.iters // 10, 1) if not args.quiet else 0
        path = lambda d: os.path.join(d, f"{args.task.replace(':', '_')}_seed{seed}_{name}.pt")  # noqa: E731
        loading = args.load_dir or (args.resume and args.save_dir and os.path.exists(path(args.save_dir)))
        chooses = selects(args, cfg) and not loading  # a saved model keeps the design it was trained with
        try:
            if chooses:
                if selection is None:
                    selection = choose_design(args, seed, cfg, train, device)
                cfg = replace(cfg, **selection["fields"])
            t0, src = time.perf_counter(), None
            if loading:
                src = path(args.load_dir or args.save_dir)
                print(f"[bench] seed {seed}: loading {name} from {src}", file=sys.stderr, flush=True)
                model = cls.load(src, device)
                train_s = model.saved_meta.get("train_s", 0.0)  # the training time of the saved model
            else:
                model = cls(cfg, torch.Generator().manual_seed(1000 * seed + 3)).to(device)
                print(f"[bench] seed {seed}: training {name}", file=sys.stderr, flush=True)
                model.fit(train, g(4))
                train_s = time.perf_counter() - t0
                if args.save_dir:
                    model.save(path(args.save_dir), train_s=train_s)
                    args.written.append(path(args.save_dir))
            print(f"[bench] seed {seed}: evaluating {name} ({train_s:.0f}s training)", file=sys.stderr, flush=True)
            scores, ms = evaluate(model, test, args.contexts, args.samples, g(5), args.chunk, name, not args.quiet)
            rows[name] = dict(status="ok", scores=summaries(scores, test, per_task.get("Bayes-optimal")),
                              train_s=train_s, ms_per_task=ms, params=n_params(model), config=asdict(model.cfg),
                              loaded_from=src, skipped_updates=getattr(model, "skipped_updates", None))
            if chooses:
                rows[name]["selection"] = selection
            models[name], per_task[name] = model, {n: d["lmlhd"] for n, d in scores.items()}
            if hasattr(model, "exact_predictive"):  # a Gaussian model: its S = infinity row too
                scores, ms = evaluate_exact(model, test, args.contexts)
                rows[name + EXACT] = dict(status="ok", scores=summaries(scores, test, per_task.get("Bayes-optimal")),
                                          train_s=train_s, ms_per_task=ms, params=n_params(model))
        except Exception as e:  # noqa: BLE001 -- any failure of one method becomes its row
            msg = f"{type(e).__name__}: {e}"
            print(f"[bench] seed {seed}: {name} FAILED: {msg}", file=sys.stderr, flush=True)
            rows[name] = dict(status="failed", error=msg)
        save_partial(rows)
    golds = {}
    if args.gold:
        golds = gold_rows(args, rows, models, per_task, test, g(8), seed)
        save_partial(rows)
    if args.plot and seed == args.seed and models:
        plot(args.plot, {**models, **golds}, test, f_true, args, g(6))  # HMC rows below ours with --gold
        args.written.append(args.plot)
        if any(isinstance(m, lm.LDVIMeta) for m in models.values()):
            stem, ext = os.path.splitext(args.plot)
            plot_prior(f"{stem}_prior{ext}", models, g(9))
            args.written.append(f"{stem}_prior{ext}")
    return rows


SELECTED_FIELDS = ("input_scale", "learn_input_scale", "iters")  # what select_design sets in ours' configs
SELECT_SCALE = 0.5  # the fixed input-scale prior std tau that the held-out tasks weigh against none
SELECT_CONTEXTS = (1, 2, 4, 8)  # the held-out tasks' context sizes (those up to --points)


def selects(args, cfg) -> bool:
    """Whether this method's config gets its input scale and length from select_design."""
    return args.select and args.meta_tasks >= 2 and isinstance(cfg, lm.LDVIConfig) and cfg.structure == "last" \
        and cfg.hidden_latent > 0  # (one meta-training task leaves none to hold out: ours is trained as configured)


def choose_design(args, seed: int, cfg, train: lm.Batch, device) -> dict:
    """select_design on this seed's meta-training tasks, once for all of ours' rows (the choice is
    made at K = 0 with the overdamped config, so it is the same whichever row asks first)."""
    t0 = time.perf_counter()
    print(f"[bench] seed {seed}: choosing the input scale and training length of ours on held-out meta-training "
          f"tasks (4 trainings at K = 0)", file=sys.stderr, flush=True)
    base = replace(cfg, kernel="overdamped", log_every=0)
    contexts = [n for n in SELECT_CONTEXTS if n <= args.points]                 # (--points >= 1 = the smallest)
    chosen, report = lm.select_design(base, train, torch.Generator(device=device).manual_seed(1000 * seed + 10),
                                      SELECT_SCALE, contexts=contexts)
    select_s = time.perf_counter() - t0
    print(f"[bench] seed {seed}: chose {report['chosen']} ({select_s:.0f}s)", file=sys.stderr, flush=True)
    return dict(chosen=report["chosen"], scores={k: round(v, 4) for k, v in report["scores"].items()},
                fields={f: getattr(chosen, f) for f in SELECTED_FIELDS}, select_s=select_s)


def bayes_rows_complete(rows: dict) -> bool:
    """Both Bayes rows present, the exact one with its per-task scores and the S-draw one with its
    failure and calibration columns (files of older versions lack some; --resume recomputes them)."""
    exact, floor = rows.get("Bayes-optimal", {}), rows.get("Bayes, S draws", {})
    return "per_task" in exact and all("calibration" in s for s in floor.get("scores", {None: {}}).values())


def gold_rows(args, rows, models, per_task, test, gen, seed) -> dict:
    """For each trained LDVI model: a gold row on the first N test tasks and the inference gap.
    Returns the gold predictives, {"HMC gold: <name>": Gold}, for the figures."""
    sub = lm.Batch(test.x[:args.gold], test.y[:args.gold], test.mask[:args.gold])
    contexts = [n for n in args.contexts if n >= 1]
    golds = {}
    for name, model in models.items():
        if not isinstance(model, lm.LDVIMeta):
            continue
        gold = Gold(model, **args.hmc, name="" if args.quiet else f"seed {seed} {name}")
        try:
            t0 = time.perf_counter()
            scores, ms = evaluate(gold, sub, contexts, args.samples, gen, args.gold, f"{name} gold", not args.quiet)
        except Exception as e:  # noqa: BLE001
            rows[f"gold: {name}"] = dict(status="failed", error=f"{type(e).__name__}: {e}")
            continue
        ours = {n: per_task[name][n][:args.gold] for n in contexts}
        bayes = per_task.get("Bayes-optimal")
        rows[f"gold: {name}"] = dict(
            status="ok", scores=summaries(scores, sub), train_s=time.perf_counter() - t0, ms_per_task=ms, params=0,
            tasks=args.gold, hmc=dict(args.hmc), convergence={str(n): s for n, s in gold.stats.items()},
            inference_gap={n: (ours[n] - scores[n]["lmlhd"]).median().item() for n in contexts},
            model_gap=({n: (scores[n]["lmlhd"] - bayes[n][:args.gold]).median().item() for n in contexts}
                       if bayes else None),
            ours_on_gold_tasks={n: ours[n].median().item() for n in contexts},
            rhat_median={n: torch.tensor(gold.stats[n]["rhat_loglik"]).median().item() for n in contexts},
            accept_median={n: torch.tensor(gold.stats[n]["accept"]).median().item() for n in contexts})
        golds[f"HMC gold: {name}"] = gold
    return golds


# -----------------------------------------------------------------------------
# output: Markdown tables, JSON (atomic), plot

def aggregate(per_seed: list) -> dict:
    """mean and std over seeds of every number of every row that succeeded on every seed."""
    def stats(vals):
        t = torch.tensor(vals, dtype=torch.float64)
        return dict(mean=t.mean().item(), std=t.std().item() if len(vals) > 1 else 0.0)
    agg = {}
    for name in dict.fromkeys(k for rows in per_seed for k in rows):
        runs = [rows.get(name, dict(status="missing")) for rows in per_seed]
        bad = [r for r in runs if r["status"] != "ok"]
        if bad:
            agg[name] = dict(status="failed", error=bad[0].get("error", "did not run"))
            continue
        first = runs[0]
        agg[name] = dict(status="ok", params=first["params"],
                         scores={n: {k: stats([r["scores"][n][k] for r in runs]) for k in first["scores"][n]
                                     if all(k in r["scores"][n] for r in runs)} for n in first["scores"]},
                         **{k: stats([r[k] for r in runs]) for k in ("train_s", "ms_per_task")})
        for key in ("inference_gap", "model_gap", "ours_on_gold_tasks", "rhat_median", "accept_median"):
            if first.get(key):
                agg[name][key] = {n: stats([r[key][n] for r in runs]) for n in first[key]}
    return agg


def fmt(s: dict, digits: int, scale: float = 1.0) -> str:
    m = s["mean"] / scale
    return f"{m:.{digits}f}" + (f" ± {s['std'] / scale:.{digits}f}" if s["std"] > 0 else "")


def table(agg: dict, contexts, test_points: int) -> str:
    """The LMLHD table (per task, per point in brackets) and the MSE table, one row per method."""
    def lines(head, cells_of):
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, r in agg.items():
            if name.startswith("gold: "):
                continue
            cells = cells_of(r) if r["status"] == "ok" else [f"FAILED: {r['error'][:80]}"] + [""] * (len(head) - 2)
            out.append("| " + " | ".join([name] + cells) + " |")
        return "\n".join(out)
    lmlhd = lines(["method"] + [f"n={n}" for n in contexts] + ["train s", "ms/task", "params"],
                  lambda r: [f"{fmt(r['scores'][n]['lmlhd'], 2)} ({fmt(r['scores'][n]['lmlhd'], 3, test_points)})"
                             for n in contexts] + [fmt(r["train_s"], 0), fmt(r["ms_per_task"], 2), str(r["params"])])
    mse = lines(["method"] + [f"n={n}" for n in contexts], lambda r: [fmt(r["scores"][n]["mse"], 3) for n in contexts])
    text = f"LMLHD, median over test tasks, per task (per point); higher is better\n\n{lmlhd}\n\n" \
           f"MSE of the predictive mean, median over test tasks; lower is better\n\n{mse}"
    if "Bayes-optimal" in agg and agg["Bayes-optimal"]["status"] == "ok":
        ceil = agg["Bayes-optimal"]["scores"]
        gap = lines(["method"] + [f"n={n}" for n in contexts],
                    lambda r: [f"{r['scores'][n]['lmlhd']['mean'] - ceil[n]['lmlhd']['mean']:.2f}" for n in contexts])
        text += f"\n\nDistance to the Bayes-optimal ceiling: median LMLHD - ceiling, per task (0 is perfect)\n\n{gap}"
    for key, digits, title in (
            ("lmlhd_q10", 2, "Bad tasks: 10% quantile of the per-task LMLHD (higher is better)"),
            ("tail", 2, f"Failures: fraction of test tasks more than {TAIL_NATS:.0f} nats below the Bayes-optimal "
                        "score (lower is better)"),
            ("calibration", 3, "Calibration error of the predictive mixture: mean over levels 0.1 ... 0.9 of "
                               "|empirical - nominal| coverage of its central intervals (0 is perfect)")):
        if any(r["status"] == "ok" and key in r["scores"].get(n, {}) for r in agg.values() for n in contexts):
            text += f"\n\n{title}\n\n" + lines(["method"] + [f"n={n}" for n in contexts],
                                                lambda r: [fmt(r["scores"][n][key], digits)
                                                           if key in r["scores"].get(n, {}) else "–" for n in contexts])
    gold = {k: r for k, r in agg.items() if k.startswith("gold: ")}
    if gold:
        ns = [n for n in contexts if n >= 1]
        head = ["gold standard (HMC)"] + [f"n={n}" for n in ns]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for k, r in gold.items():
            if r["status"] != "ok":
                rows.append(f"| {k} | FAILED: {r['error'][:80]} |")
                continue
            rows.append("| " + " | ".join([f"{k}: LMLHD"] + [fmt(r["scores"][n]["lmlhd"], 2) for n in ns]) + " |")
            rows.append("| " + " | ".join([f"{k[6:]} on the same tasks"] + [fmt(r["ours_on_gold_tasks"][n], 2)
                                                                           for n in ns]) + " |")
            rows.append("| " + " | ".join(["inference gap: ours - gold"] + [fmt(r["inference_gap"][n], 2)
                                                                             for n in ns]) + " |")
            if r.get("model_gap"):
                rows.append("| " + " | ".join(["model gap: gold - Bayes-optimal"] + [fmt(r["model_gap"][n], 2)
                                                                                      for n in ns]) + " |")
            rows.append("| " + " | ".join(["HMC acceptance / split R-hat of log p(C given theta)"] +
                                          [f"{r['accept_median'][n]['mean']:.2f} / {r['rhat_median'][n]['mean']:.2f}"
                                           for n in ns]) + " |")
        text += "\n\nGold standard on the first test tasks (medians over those tasks)\n\n" + "\n".join(rows)
    return text


def write_json_atomic(path: str, obj) -> None:
    lm.write_atomic(path, lambda fh: json.dump(obj, fh, indent=1))


def save_figure(fig, path: str, tight: bool = True) -> None:
    """Write a matplotlib figure atomically, in the format of path's extension."""
    import matplotlib.pyplot as plt
    if tight:
        fig.tight_layout()
    lm.write_atomic(path, lambda fh: fig.savefig(fh, format=os.path.splitext(path)[1][1:].lower(), dpi=80), mode="wb")
    plt.close(fig)


def plot(path: str, models: dict, test: lm.Batch, f_true, args, gen, task: int = 0) -> None:
    """Rows: methods; columns: context sizes 1, 4, 16 of one test task. The predictive mixture's
    mean and 2-sigma band, five of its components, the context points and the true function."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [n for n in (1, 4, 16) if n <= args.test_points]
    line = torch.linspace(-5, 5, 200, device=test.x.device, dtype=test.x.dtype).view(1, 200, 1)
    truth = f_true(line.expand(test.x.shape[0], 200, 1))[task, :, 0].cpu()   # f_true covers all test tasks
    sub = lm.Batch(test.x[task:task + 1], test.y[task:task + 1], test.mask[task:task + 1])
    fig, axes = plt.subplots(len(models), len(sizes), figsize=(3.4 * len(sizes), 2.2 * len(models) + 0.8),
                             sharex=True, sharey=True, squeeze=False)
    xs = line[0, :, 0].cpu()
    for i, (name, model) in enumerate(models.items()):
        for j, n in enumerate(sizes):
            ctx = lm.first_n(sub, n)
            mean, std = model.predictive(ctx, line, 64, gen)                     # [1, S, 200, 1]
            std = torch.as_tensor(std, device=mean.device).expand_as(mean)
            mu = mean.mean(1)[0, :, 0].cpu()
            sd = (mean.var(1, unbiased=False) + std.square().mean(1)).sqrt()[0, :, 0].cpu()
            ax = axes[i, j]
            ax.fill_between(xs, mu - 2 * sd, mu + 2 * sd, color="C0", alpha=0.2, label="predictive ± 2 std")
            for s in range(min(5, mean.shape[1])):
                ax.plot(xs, mean[0, s, :, 0].cpu(), color="C0", lw=0.5, alpha=0.6,
                        label="five components (samples)" if s == 0 else None)
            ax.plot(xs, mu, color="C0", lw=1.5, label="predictive mean")
            ax.plot(xs, truth, "k--", lw=1, label="true function")
            ax.scatter(ctx.x[0, :n, 0].cpu(), ctx.y[0, :n, 0].cpu(), color="C3", s=14, zorder=3,
                       label="context points")
            ax.set_ylim(-7, 7)
            if i == 0:
                ax.set_title(f"n = {n} context point{'s' if n > 1 else ''}", fontsize=10)
            if j == 0:
                ax.set_ylabel(f"{name}\ny", fontsize=9)
            if i == len(models) - 1:
                ax.set_xlabel("x")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(f"Predictive distributions on test task {task} ({args.task}): one row per method", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    save_figure(fig, path, tight=False)


def plot_prior(path: str, models: dict, gen) -> None:
    """Functions drawn from the meta-learned prior of every LDVI model (no context at all):
    what the model believes a task looks like before it sees any data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = {k: m for k, m in models.items() if isinstance(m, lm.LDVIMeta)}
    fig, axes = plt.subplots(1, len(ours), figsize=(3.4 * len(ours), 3.0), squeeze=False, sharey=True)
    for ax, (name, model) in zip(axes[0], ours.items()):
        mean = model.prior_mean
        grid = torch.linspace(-5, 5, 200, device=mean.device, dtype=mean.dtype).view(1, 200, 1)
        with torch.no_grad():
            f = model.bnn(model.prior_weights(1, 12, gen), grid)[0, :, :, 0].cpu()  # [12, 200]
        for s in range(f.shape[0]):
            ax.plot(grid[0, :, 0].cpu(), f[s], lw=1)
        ax.set_title(f"{name} (r = {model.cfg.latent})", fontsize=9)
        ax.set_ylim(-7, 7)
        ax.set_xlabel("x")
    axes[0, 0].set_ylabel("f(x)")
    fig.suptitle("Twelve functions drawn from each meta-learned prior (no context)", fontsize=10)
    save_figure(fig, path)


def plot_headline(path: str, results: dict) -> None:
    """LMLHD (median over test tasks, per task) against the context size n for every method, with
    the Bayes-optimal ceiling and the oracle; one panel per family. results: {family: results JSON}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.4), squeeze=False)
    for ax, (family, res) in zip(axes[0], results.items()):
        seeds = len(res["config"]["seeds"])
        for k, (name, row) in enumerate(res["results"].items()):
            if row["status"] != "ok" or name.startswith("gold: ") or name == "Bayes, S draws" or name.endswith(EXACT):
                continue
            ns = sorted(int(n) for n in row["scores"])
            mean = [row["scores"][str(n)]["lmlhd"]["mean"] for n in ns]
            std = [row["scores"][str(n)]["lmlhd"]["std"] for n in ns]
            ref = name in ("oracle", "Bayes-optimal")
            style = dict(color="k", ls=":" if name == "oracle" else "--", lw=1.5) if ref else \
                dict(marker="o", ms=4, lw=2 if name == "LDVI-overdamped" else 1.2,
                     ls="--" if name in ABLATIONS else "-")  # an ablation of ours: dashed
            ax.errorbar(ns, mean, yerr=std if seeds > 1 and not ref else None, label=name, capsize=2, **style)
        ax.set_yscale("symlog", linthresh=20)
        ax.set_xlabel("context size n (points seen)")
        ax.set_ylabel("LMLHD per task (median over 256 test tasks)")
        ax.set_title(f"{family}: " + (f"mean ± std over {seeds} seeds" if seeds > 1 else "1 seed") +
                     "; higher is better", fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    rows = math.ceil(len(labels) / 7)  # at most 7 entries a row
    fig.legend(handles, labels, loc="lower center", ncol=math.ceil(len(labels) / rows), fontsize=8, frameon=False)
    fig.suptitle("Log marginal predictive likelihood of 64 target points against the context size", fontsize=11)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * rows, 1, 1))
    save_figure(fig, path, tight=False)


# -----------------------------------------------------------------------------
# --speed: throughput of every method, how ours scales, and the BNN against a large GEMM

def _timer(device):
    """timed(fn, reps): seconds per call after one warm-up call (CUDA synchronized)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, reps=3):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t0) / reps
    return timed


def matmul_flops(fn) -> int:
    """FLOPs of the matrix products in fn() (forward and backward), counted by torch's FlopCounterMode
    with every product a plain matmul: the same arithmetic whichever way _matmul computes it."""
    from torch.utils.flop_counter import FlopCounterMode
    fast, lm._matmul = lm._matmul, torch.matmul
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        lm._matmul = fast
    return counter.get_total_flops()


def speed(args, device) -> dict:
    """Training ms/iteration and evaluation ms/task (context n = 8, S = --samples) of every method
    on the flags' task family; GFLOP/s of ours' training step and of the BNN gradient against a
    2048^3 GEMM measured in this process; with --baseline DIR, ours against the ldvi_meta.py of an
    older checkout, timed alternately in this process."""
    timed = _timer(device)
    g = torch.Generator(device=device).manual_seed(0)
    train, _, _ = make_tasks(args.family, args.meta_tasks, args.points, args.noise, g)
    test, _, _ = make_tasks(args.family, min(args.test_tasks, 16), args.test_points, args.noise, g)
    n = min(8, args.test_points)
    out = dict(device=str(device), machine=f"{platform.machine()}, {os.cpu_count()} CPUs, "
               f"{torch.get_num_threads()} threads", torch=torch.__version__,
               setting=dict(task=args.task, meta_tasks=args.meta_tasks, points=args.points, noise=args.noise,
                            test_tasks=test.x.shape[0], test_points=args.test_points, context=n,
                            samples=args.samples, chunk=args.chunk, K=args.K, latent=args.latent), methods={})
    a = torch.randn(2048, 2048, device=device, generator=g)
    gemm = 2 * 2048 ** 3 / timed(lambda: a @ a, reps=5) / 1e9
    ctx = lm.first_n(task_chunks(test, args.chunk)[0], n)
    bnn = lm.BNN()
    theta = 0.1 * torch.randn(ctx.x.shape[0], args.samples, bnn.n_params, device=device, generator=g)
    sigma = torch.tensor(args.noise, device=device)
    sec = timed(lambda: bnn.loglik_and_grad(theta, ctx, sigma), reps=20)
    flops = matmul_flops(lambda: bnn.loglik_and_grad(theta, ctx, sigma))
    out["hardware"] = dict(gemm_2048_gflops=gemm, bnn_grad_ms=sec * 1e3, bnn_grad_gflops=flops / sec / 1e9,
                           bnn_fraction_of_gemm=flops / sec / 1e9 / gemm)
    print(f"[speed] GEMM 2048^3: {gemm:.0f} GFLOP/s; BNN gradient ({n} points, {theta.shape[0]} x {args.samples} "
          f"particles): {sec * 1e3:.2f} ms = {flops / sec / 1e9:.1f} GFLOP/s ({flops / sec / 1e9 / gemm:.1%} of GEMM)",
          file=sys.stderr, flush=True)
    for name in args.methods:
        cls, cfg = method_configs(args)[name]
        cfg.log_every = 0
        model = cls(cfg, torch.Generator().manual_seed(0)).to(device)
        it = timed(lambda: train_step(model, train, g), reps=5)
        ev = timed(lambda: evaluate(model, test, [n], args.samples, g, args.chunk, progress=False), reps=1)
        row = out["methods"][name] = dict(train_ms_per_iter=it * 1e3, eval_ms_per_task=ev * 1e3 / test.x.shape[0])
        if isinstance(model, lm.LDVIMeta):
            f = matmul_flops(lambda: train_step(model, train, g))
            row.update(train_matmul_gflop_per_iter=f / 1e9, train_gflops=f / it / 1e9,
                       train_fraction_of_gemm=f / it / 1e9 / gemm)
        print(f"[speed] {name}: training {it * 1e3:.1f} ms/iteration, evaluation {row['eval_ms_per_task']:.1f} "
              f"ms/task (S = {args.samples})" + (f", {row['train_gflops']:.1f} GFLOP/s in training "
                                                 f"({row['train_fraction_of_gemm']:.1%} of GEMM)" if
                                                 "train_gflops" in row else ""), file=sys.stderr, flush=True)
    if args.baseline:
        out["baseline"] = against_baseline(args, device, train, test, n, timed)
    return out


def load_checkout(folder: str):
    """The ldvi_meta.py of another checkout in folder, as a module of its own. If it imports common,
    it gets that checkout's common.py (code from before ldvi_meta.py stood alone again); this process's
    own modules are left as they were."""
    spec = importlib.util.spec_from_file_location("ldvi_meta_baseline", os.path.join(folder, "ldvi_meta.py"))
    old = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    ours, folder = sys.modules.pop("common", None), os.path.abspath(folder)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(old)
    finally:
        sys.path.remove(folder)
        sys.modules.pop("common", None)
        if ours is not None:
            sys.modules["common"] = ours
    return old


def against_baseline(args, device, train, test, n: int, timed, rounds: int = 5) -> dict:
    """Ours (both kernels, the flags' K and r) against the ldvi_meta.py of the checkout args.baseline:
    the old and the new model take turns, `rounds` times, each timing 5 training iterations and one
    evaluation of every test task (the old one as its benchmark ran it: chunks in turn on torch's
    threads; the new one with this evaluate). Medians and their ratio old / new."""
    old = load_checkout(args.baseline)
    S, chunk = args.samples, args.chunk

    def old_eval(model):
        for part in task_chunks(test, chunk):
            part = old.Batch(*part)
            mean, std = model.predictive(old.first_n(part, n), part.x, S, g)
            old.log_predictive(mean, std, part), old.mse(mean, part)

    def new_eval(model):
        evaluate(model, test, [n], S, g, chunk, progress=False)

    g = torch.Generator(device=device).manual_seed(0)
    out = {}
    for kernel in lm.KERNELS:
        fields = dict(kernel=kernel, K=args.K, latent=args.latent, sigma_y=args.noise, learn_sigma_y=False, lr=3e-3,
                      lr_final=0.1, iters=1800, log_every=0)
        runs = {}
        for tag, mod, ev in (("old", old, old_eval), ("new", lm, new_eval)):
            cfg = mod.LDVIConfig(**{k: v for k, v in fields.items() if k in mod.LDVIConfig.__dataclass_fields__})
            model = mod.LDVIMeta(cfg, torch.Generator().manual_seed(0)).to(device)
            data = mod.Batch(*train)
            step = lambda mod=mod, model=model, data=data: model.loss(  # noqa: E731
                mod.task_minibatch(data, model.cfg.tasks_per_batch, g), g).backward()
            runs[tag] = (step, lambda ev=ev, model=model: ev(model), dict(train=[], eval=[]))
        for _ in range(rounds):
            for tag, (step, ev, t) in runs.items():
                t["train"].append(timed(step, reps=5) * 1e3)
                t["eval"].append(timed(ev, reps=1) * 1e3 / test.x.shape[0])
        med = {tag: {k: sorted(v)[len(v) // 2] for k, v in t.items()} for tag, (_, _, t) in runs.items()}
        out[kernel] = dict(old=runs["old"][2], new=runs["new"][2],
                           train_ms_per_iter=dict(old=med["old"]["train"], new=med["new"]["train"],
                                                  ratio=med["old"]["train"] / med["new"]["train"]),
                           eval_ms_per_task=dict(old=med["old"]["eval"], new=med["new"]["eval"],
                                                 ratio=med["old"]["eval"] / med["new"]["eval"]))
        print(f"[speed] {kernel} vs {args.baseline}: training {med['old']['train']:.1f} -> {med['new']['train']:.1f} "
              f"ms/iteration ({out[kernel]['train_ms_per_iter']['ratio']:.2f}x), evaluation {med['old']['eval']:.1f} "
              f"-> {med['new']['eval']:.1f} ms/task ({out[kernel]['eval_ms_per_task']['ratio']:.2f}x)",
              file=sys.stderr, flush=True)
    return out


def vmap_maml_loss(model: bl.MAML, ctx: lm.Batch, batch: lm.Batch) -> torch.Tensor:
    """Reference: MAML's meta-loss written per task with torch.func.grad and vmapped over
    tasks (the batched MAML.loss must agree with it and be at least as fast)."""
    bnn, lr, sigma = model.bnn, model.cfg.inner_lr, model.log_sigma_y.exp()

    def mse_one(theta, x, y, m):  # one task: theta [D], x [N, dx], y [N, dy], m [N]
        f = bnn(theta.view(1, 1, -1), x.unsqueeze(0))[0, 0]
        return ((f - y).square().mean(-1) * m).sum() / m.sum().clamp(min=1)

    def task_loss(xc, yc, mc, xt, yt, mt):
        theta = model.theta0
        for _ in range(model.cfg.adapt_steps):
            theta = theta - lr * torch.func.grad(mse_one)(theta, xc, yc, mc)
        f = bnn(theta.view(1, 1, -1), xt.unsqueeze(0))[0, 0]
        ll = ((-0.5 * ((yt - f) / sigma).square() - sigma.log() - 0.5 * lm.LOG_2PI).sum(-1) * mt).sum()
        return -ll / mt.sum()

    m_ctx, m_tgt = ctx.mask.to(ctx.x.dtype), batch.mask.to(batch.x.dtype)
    return torch.func.vmap(task_loss)(ctx.x, ctx.y, m_ctx, batch.x, batch.y, m_tgt).mean()


def train_step(model, train, g, loss_fn=None):
    """One meta-training iteration (loss, backward) of any method, without the optimizer."""
    batch = lm.task_minibatch(train, model.cfg.tasks_per_batch, g)
    if isinstance(model, (lm.LDVIMeta, bl.GaussianModel)):
        loss = model.loss(batch, g)
    else:
        loss = (loss_fn or model.loss)(lm.random_subset(batch, g, model.cfg.min_context), batch, g)
    loss.backward()


# -----------------------------------------------------------------------------
# command line: every flag is checked, and every output path is usable, before any training

def resolve_task(name: str):
    """A registered family, or 'module:function' importable from the working directory."""
    if name in TASKS:
        return TASKS[name]
    module, _, func = name.partition(":")
    if not (module and func):
        raise ValueError(f"--task: expected one of {sorted(TASKS)} or module:function, got {name!r}")
    mine = {"bench", "ldvi_meta", "baselines", "tasks", "gold"}
    if module.split(".")[0] in mine:
        if module == "tasks" and func in TASKS:  # the benchmark's own family, by its full name
            return TASKS[func]
        raise ValueError(f"--task {name}: a module named {module.split('.')[0]!r} is shadowed by the benchmark's "
                         f"own; rename your module (the benchmark's are {', '.join(sorted(mine))}; its families "
                         f"are {', '.join(sorted(TASKS))})")
    sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--task {name}: cannot import it ({e})") from None


def check_writable_folder(flag: str, folder: str, create: bool = False) -> None:
    """Raise ValueError unless folder exists (or, with create, can be made) and takes a file."""
    folder = os.path.abspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{flag}: expected a folder, {folder} is a file")
    if create and not os.path.isdir(folder) and os.path.isdir(os.path.dirname(folder)):
        try:
            os.mkdir(folder)
        except OSError as e:
            raise ValueError(f"{flag}: cannot create the folder {folder} ({e.strerror})") from None
    if not os.path.isdir(folder):
        raise ValueError(f"{flag}: the folder {folder} does not exist")
    try:  # a real write: os.access says yes to root even on a read-only mount
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ValueError(f"{flag}: cannot write into {folder} ({e.strerror})") from None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's line breaks and shows every default (the help text of a
    flag whose default is computed says it in words)."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=_HelpFormatter)
    p.add_argument("--task", default="sinusoid", help="sinusoid, linesine, or module:function (a task family)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}; the default leaves out the ablations "
                        f"{' and '.join(ABLATIONS)}")
    p.add_argument("--meta-tasks", type=int, default=64, help="meta-training tasks")
    p.add_argument("--points", type=int, default=16, help="points per meta-training task")
    p.add_argument("--test-tasks", type=int, default=256, help="test tasks")
    p.add_argument("--test-points", type=int, default=64, help="points per test task (all are targets)")
    p.add_argument("--noise", type=float, default=0.25, help="observation noise std of every split")
    p.add_argument("--contexts", default="0,1,2,4,6,8,12,16", help="comma-separated context sizes n")
    p.add_argument("--samples", type=int, default=1024, help="posterior samples S per test task")
    p.add_argument("--K", type=int, default=5, help="diffusion steps of ours")
    p.add_argument("--latent", type=int, default=8, help="r, task-latent dimension of ours' prior (0: diagonal)")
    p.add_argument("--iters", type=int, default=None,
                   help="meta-training iterations of every method (default: LDVI 1800, NP 3000, MAML 1500, BMAML 1000, "
                        "ALPaCA and DeepKernelGP 10000)")
    p.add_argument("--no-select", dest="select", action="store_false",
                   help="train ours as configured: no choice of input scale and training length on held-out "
                        "meta-training tasks (by default 4 short K = 0 trainings per seed make it)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=1, help="repeat with this many seeds; report mean ± std")
    p.add_argument("--chunk", type=int, default=None,
                   help="test tasks per evaluation call (default: max(1, 1024 // samples); on the CPU, "
                        "small [tasks, samples, D] tensors that stay in cache are 2-4x faster)")
    p.add_argument("--gold", type=int, default=0, help="HMC gold standard on the first N test tasks (0: none)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--out", default=None, help="JSON results (a .json name), and the printed tables in <name>.md "
                                              "beside it (default: results/<task>.json; --quick: a new temp folder)")
    p.add_argument("--plot", default=None, help="figure of every method's predictive (format from the extension); "
                                               "also <name>_prior.<ext> with function samples from ours' priors")
    p.add_argument("--save-dir", default=None, help="save every trained model here (one .pt file each)")
    p.add_argument("--load-dir", default=None, help="evaluate the models saved here by --save-dir, no training")
    p.add_argument("--resume", action="store_true",
                   help="reuse the methods finished by an interrupted run with the same configuration")
    p.add_argument("--quick", action="store_true", help="shrink everything: a smoke run of under a minute")
    p.add_argument("--speed", action="store_true", help="measure training and evaluation speed instead of the table")
    p.add_argument("--baseline", default=None,
                   help="with --speed: a checkout of an older version of this project; its ldvi_meta.py is timed "
                        "against today's in the same process")
    p.add_argument("--quiet", action="store_true", help="no training progress on stderr")
    p.add_argument("--headline", default=None,
                   help="only draw the headline figure (LMLHD against n) into this file from the results JSON "
                        "of the built-in families in results/, then exit")
    args = p.parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        p.error(str(e))
    return args


def check_args(args) -> None:
    """Raise ValueError naming the flag for anything that would fail later."""
    for name in ("meta_tasks", "points", "test_tasks", "test_points", "samples", "seeds", "chunk", "iters"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {v}")
    for name in ("K", "latent", "gold", "seed"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name}: expected an integer >= 0, got {getattr(args, name)}")
    if 1000 * (args.seed + args.seeds) + 10 >= 2 ** 63:
        raise ValueError(f"--seed: expected seeds below {(2 ** 63 - 10) // 1000 - args.seeds}, got {args.seed}")
    if not (math.isfinite(args.noise) and args.noise > 0):
        raise ValueError(f"--noise: expected a finite number > 0, got {args.noise}")
    try:
        args.contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        raise ValueError(f"--contexts: expected comma-separated integers, got {args.contexts!r}") from None
    if len(set(args.contexts)) != len(args.contexts):
        raise ValueError(f"--contexts: expected distinct sizes, got {args.contexts}")
    if any(n < 0 or n > args.test_points for n in args.contexts):
        raise ValueError(f"--contexts: expected sizes in [0, --test-points = {args.test_points}], got {args.contexts}")
    names = [m.strip() for m in args.methods.split(",")]
    lookup = {m.lower(): m for m in METHODS}
    unknown = [m for m in names if m.lower() not in lookup]
    if unknown or not names or len({m.lower() for m in names}) != len(names):
        raise ValueError(f"--methods: expected distinct names from {', '.join(METHODS)}, got {args.methods!r}")
    args.methods = [lookup[m.lower()] for m in names]
    args.quick_changes, args.written = [], []
    if args.quick:  # shrink, and say what was shrunk
        caps = dict(meta_tasks=16, test_tasks=16, samples=8, K=2, iters=15)
        for name, cap in caps.items():
            v = getattr(args, name)
            if v is None or v > cap:
                args.quick_changes.append(f"--{name.replace('_', '-')} {'default' if v is None else v} -> {cap}")
                setattr(args, name, cap)
    if args.gold:
        if args.gold > args.test_tasks:
            raise ValueError(f"--gold: expected at most --test-tasks = {args.test_tasks} tasks, got {args.gold}")
        if not any(m.startswith("LDVI") for m in args.methods):
            raise ValueError("--gold: needs at least one LDVI method in --methods")
    if args.select and args.meta_tasks < 2 and any(m.startswith("LDVI") for m in args.methods):
        print("[bench] --meta-tasks 1: no task to hold out, so ours is trained as configured, without the held-out "
              "choice of input scale and length (as with --no-select)", file=sys.stderr)
    args.hmc = dict(chains=64, warmup=300, draws=160, n_leapfrog=10) if not args.quick else \
        dict(chains=8, warmup=10, draws=10, n_leapfrog=3)
    args.bayes_draws = BAYES_DRAWS  # also in a --quick run: one rule for which noise levels the exact rows allow
    base = dict(ldvi=lm.LDVIConfig.iters, np=3000, maml=1500, bmaml=1000, gauss=bl.GaussianConfig.iters)
    args.iters = {k: args.iters for k in base} if args.iters is not None else base
    args.family = resolve_task(args.task)
    if args.task.startswith("tasks:"):  # the benchmark's own family by its full name: the same run as its short one
        args.task = args.task.partition(":")[2]
    check_family(args)
    if args.device is not None:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
            raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
        if args.device.startswith("cuda"):
            index = int(args.device.partition(":")[2] or 0)
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                raise ValueError(f"--device {args.device}: no such CUDA device "
                                 f"({torch.cuda.device_count() if torch.cuda.is_available() else 0} available)")
    if args.speed and (args.gold or args.save_dir or args.load_dir or args.resume or args.plot):
        raise ValueError("--speed: cannot be combined with --gold, --save-dir, --load-dir, --resume or --plot")
    if args.baseline is not None:
        if not args.speed:
            raise ValueError("--baseline: only with --speed")
        if not os.path.isfile(os.path.join(args.baseline, "ldvi_meta.py")):
            raise ValueError(f"--baseline: expected a checkout of this project, {args.baseline} has no ldvi_meta.py")
    if args.task in TASKS:  # a small probe: noise too low for the exact rows fails here, not after the training
        probe, _, _ = make_tasks(args.family, 2, max(args.contexts), args.noise, torch.Generator().manual_seed(0))
        bayes_optimal(probe, args.contexts, args.noise, args.task, 4, torch.Generator().manual_seed(0),
                      draws=args.bayes_draws)
    stem = args.task.replace(":", "_")
    fresh = args.out is None and args.quick  # a new temporary folder, made once everything else has passed
    if args.out is None and not args.quick:
        args.out = os.path.join(RESULTS, f"{stem}{'_speed' if args.speed else ''}.json")
    if args.out is not None:
        if os.path.isdir(args.out):
            raise ValueError(f"--out: expected a file path, {args.out} is a folder")
        if not args.out.lower().endswith(".json") or not os.path.basename(args.out)[:-5]:
            hint = f"; did you mean {args.out + '.json'!r}?" if args.out and not os.path.splitext(args.out)[1] \
                and not args.out.endswith(os.sep) else ""
            raise ValueError(f"--out: expected a file name ending in .json (the tables go beside it as .md), "
                             f"got {args.out!r}{hint}")
        check_writable_folder("--out", os.path.dirname(os.path.abspath(args.out)))
    if args.quick:
        check_smoke_outputs(args)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig = plt.figure()
        formats = fig.canvas.get_supported_filetypes()
        plt.close(fig)
        ext = os.path.splitext(args.plot)[1][1:].lower()
        if ext not in formats:
            raise ValueError(f"--plot: expected a file name ending in one of {', '.join(sorted(formats))}, "
                             f"got {args.plot!r}")
        check_writable_folder("--plot", os.path.dirname(os.path.abspath(args.plot)))
    if args.save_dir:
        check_writable_folder("--save-dir", args.save_dir, create=True)
    if args.load_dir:
        missing = [f"{m} (seed {s})" for m in args.methods for s in range(args.seed, args.seed + args.seeds)
                   if not os.path.exists(os.path.join(args.load_dir, f"{stem}_seed{s}_{m}.pt"))]
        if missing:
            raise ValueError(f"--load-dir: no saved model for {', '.join(missing)} in {args.load_dir} "
                             f"(expected files named {stem}_seed<S>_<method>.pt)")
        for s in range(args.seed, args.seed + args.seeds):
            for m in args.methods:
                check_saved_config(os.path.join(args.load_dir, f"{stem}_seed{s}_{m}.pt"), m, args)
    args.chunk = args.chunk or max(1, 1024 // args.samples)  # after --quick has set the samples
    if fresh:  # last: a refused run leaves no empty folder behind
        args.out = os.path.join(tempfile.mkdtemp(prefix="ldvi_meta_quick_"),
                                f"{stem}{'_speed' if args.speed else ''}.json")


def check_family(args) -> None:
    """Draw from the family before any training: a broken family, one that ignores the generator it
    is passed (two draws from equal seeds differ: the results could not be reproduced), and a
    --noise far outside the scale of its functions are refused here, not after an hour."""
    draws = []
    for _ in range(2):
        try:
            draws.append(make_tasks(args.family, 2, 3, args.noise, torch.Generator().manual_seed(0)))
        except ValueError as e:
            raise ValueError(f"--task {args.task}: {e}") from None
        except Exception as e:  # noqa: BLE001 -- the user's code raised
            raise ValueError(f"--task {args.task}: drawing 2 tasks failed ({type(e).__name__}: {e})") from None
    (a, clean_a, _), (b, clean_b, _) = draws
    if not (torch.equal(clean_a, clean_b) and torch.equal(a.y, b.y)):
        raise ValueError(f"--task {args.task}: two draws from equal generator seeds gave different tasks, so the "
                         "family draws from a random source other than the generator it is passed (torch's global "
                         "generator, e.g. a torch.rand without generator=gen, or numpy's or Python's) and no run "
                         "could be repeated; draw every random number from gen, e.g. "
                         "torch.rand(T, 1, 1, generator=gen, device=gen.device)")
    _, clean, _ = make_tasks(args.family, 64, 16, 1.0, torch.Generator().manual_seed(1))
    scale = clean.double().square().mean().sqrt().item()  # RMS of the noise-free functions
    if not math.isfinite(scale) or args.noise > NOISE_RANGE * max(scale, 1e-3):
        raise ValueError(f"--noise: expected a noise std at most {NOISE_RANGE:g} times the scale of the tasks' "
                         f"functions (their RMS is {scale:.3g} on 64 probe tasks of {args.task}), got {args.noise:g}: "
                         "such noise drowns every task (and overflows float32 training)")


def check_smoke_outputs(args) -> None:
    """A --quick run (numbers that mean nothing) never writes into the project's results folder and
    never overwrites a complete results file."""
    results = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), RESULTS))
    for flag in ("out", "plot", "save_dir"):
        path = getattr(args, flag)
        if path is None:
            continue
        target = os.path.realpath(path if flag == "save_dir" else os.path.dirname(os.path.abspath(path)))
        if target == results or target.startswith(results + os.sep):
            raise ValueError(f"--{flag.replace('_', '-')}: a --quick smoke run never writes into the project's "
                             f"results folder ({results}), which holds the committed results; leave --out out "
                             "(a fresh temporary folder is used) or choose another folder")
    if args.out and os.path.exists(args.out):
        try:
            with open(args.out) as fh:
                old = json.load(fh)
            full = old.get("complete") and not old.get("config", {}).get("quick", True)
        except (ValueError, OSError, AttributeError):
            full = False
        if full:
            raise ValueError(f"--out: {args.out} holds the complete results of a full run; a --quick smoke run "
                             "will not overwrite them; choose another file")


# the flags that decide a saved model, per config field: a model trained otherwise is refused
FLAG_OF_FIELD = dict(K="--K", latent="--latent", iters="--iters", sigma_y="--noise")


def check_saved_config(path: str, name: str, args) -> None:
    """Raise ValueError naming the flag and both values if the model saved in path was trained with
    another configuration than these flags give (its rows would be mislabelled otherwise)."""
    obj = lm.read_model_file(path)
    saved, configs = obj["config"], method_configs(args)
    for m, (cls, cfg) in configs.items():  # ours: any of the designs select_design chooses between is expected
        if selects(args, cfg):
            designs = [{f: getattr(c, f) for f in SELECTED_FIELDS}
                       for c in lm.design_candidates(cfg, SELECT_SCALE).values()]
            picked = {f: saved.get(f) for f in SELECTED_FIELDS}
            if picked in designs:
                configs[m] = (cls, replace(cfg, **picked))
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    differs = lambda cfg: [f for f, want in asdict(cfg).items()  # noqa: E731
                           if f != "log_every" and plain(saved.get(f, "missing")) != plain(want)]
    if obj["method"] != configs[name][0].__name__ or differs(configs[name][1]) and \
            any(not differs(cfg) for m, (cls, cfg) in configs.items() if cls.__name__ == obj["method"]):
        holds = [m for m, (cls, cfg) in configs.items() if cls.__name__ == obj["method"] and not differs(cfg)]
        raise ValueError(f"--load-dir: {path} should hold the {name} model but holds "
                         f"{'the ' + holds[0] + ' model' if holds else 'a saved ' + obj['method']}; the benchmark "
                         f"reads <task>_seed<S>_<method>.pt, so put each model under its own method's name")
    wrong = [(f, saved.get(f, "missing"), want) for f, want in asdict(configs[name][1]).items()
             if f != "log_every" and plain(saved.get(f, "missing")) != plain(want)]
    unflagged = [w for w in wrong if w[0] not in FLAG_OF_FIELD]
    if unflagged:  # no flag sets these: another method's model, or one trained by other code
        field, have, want = unflagged[0]
        raise ValueError(f"--load-dir: {path} should hold the {name} model, but its {field} = {have!r} where "
                         f"{name} has {field} = {want!r}, and no flag sets {field}: it is another method's model "
                         "(the benchmark reads <task>_seed<S>_<method>.pt) or was trained by other code; retrain")
    for field, have, want in wrong:
        raise ValueError(f"--load-dir: {name} in {path} was trained with {field} = {have!r}, but "
                         f"{FLAG_OF_FIELD[field]} gives {field} = {want!r}; pass the flags it was trained with, "
                         "or retrain")


def run_config(args, device) -> dict:
    """Everything that decides the numbers (what --resume compares)."""
    return dict(task=args.task, meta_tasks=args.meta_tasks, points=args.points, test_tasks=args.test_tasks,
                test_points=args.test_points, noise=args.noise, contexts=args.contexts, samples=args.samples,
                K=args.K, latent=args.latent, iters=args.iters, select=args.select, quick=args.quick, gold=args.gold,
                device=str(device),
                methods={name: asdict(cfg) for name, (_, cfg) in method_configs(args).items() if name in args.methods})


def reusable(old_methods: dict, new_methods: dict):
    """keep(row name) for --resume: the reference rows, and the rows (with their exact and gold rows)
    of every method that this run asks for with the configuration it had: a method added to a
    finished run is trained, one whose settings changed is retrained, the others are reused."""
    def keep(name: str) -> bool:
        base = name.removeprefix("gold: ").removesuffix(EXACT)
        return base in REFERENCE_ROWS or (base in new_methods and old_methods.get(base) == new_methods[base])
    return keep


def _int_keys(row: dict) -> dict:
    """A row read back from JSON: context sizes are keys, JSON made them strings."""
    return {k: ({int(n): v for n, v in val.items()} if isinstance(val, dict) and k != "config" and
                all(re.fullmatch(r"\d+", str(n)) for n in val) else val) for k, val in row.items()}


def fast_allocator() -> None:
    """Keep freed memory in glibc's heap instead of returning it to the system, so that fresh
    [tasks, particles, D] tensors do not page-fault again (measured once on the evaluation
    loop: 204k -> 83k minor page faults, about 8% less time). A process-wide setting, so it
    is made here, at the entry point, and never by the library."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD: allocations up to 32 MiB come from the heap
            libc.mallopt(-1, 1 << 30)    # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
        except (OSError, AttributeError):
            pass


def headline(path: str, folder: str = RESULTS) -> int:
    """--headline: the figure from results/<family>.json of every built-in family present."""
    found = {f: os.path.join(folder, f"{f}.json") for f in TASKS}
    results = {}
    for family, file in found.items():
        if os.path.exists(file):
            with open(file) as fh:
                results[family] = json.load(fh)
    if not results:
        print(f"bench.py: error: --headline: no results in {folder} ({', '.join(found.values())})", file=sys.stderr)
        return 2
    plot_headline(path, results)
    print(f"[bench] wrote {path} (from {', '.join(found[f] for f in results)})", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--headline" in argv:  # a figure from finished runs: nothing else runs
        i = argv.index("--headline")
        if i + 1 >= len(argv) or len(argv) != 2:
            print("bench.py: error: --headline: expected exactly --headline FILE (no other flags)", file=sys.stderr)
            return 2
        return headline(argv[i + 1])
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else lm.default_device()  # chosen once, here
    fast_allocator()
    torch.manual_seed(args.seed)  # nothing should use the global RNG; this makes sure anyway
    t0 = time.perf_counter()
    if args.quick:
        print(f"[bench] --quick: a smoke run of the code path; its numbers mean nothing. Shrunk: "
              f"{', '.join(args.quick_changes) or 'nothing'}, and every method trains 15 iterations at most. "
              f"Output goes to {os.path.dirname(os.path.abspath(args.out))}", file=sys.stderr, flush=True)
    if args.speed:
        result = speed(args, device)
        write_json_atomic(args.out, result)
        print(json.dumps(result, indent=1))
        print(f"[bench] wrote {args.out}", file=sys.stderr)
        return 0
    config = run_config(args, device)
    partial = os.path.splitext(args.out)[0] + ".partial.json"
    seeds = list(range(args.seed, args.seed + args.seeds))
    done, wall_before, seed_wall = {}, 0.0, {}  # rows, wall time (total, per seed) of the run --resume continues
    if args.resume:
        for path in (partial, args.out):
            if os.path.exists(path):
                try:
                    with open(path) as fh:
                        old = json.load(fh)
                    old["config"], old["per_seed"]  # noqa: B018 -- both must be there
                except (ValueError, KeyError, TypeError) as e:
                    print(f"bench.py: error: --resume: {path} is not a readable results file ({type(e).__name__}: "
                          f"{e}); delete or move it, or run without --resume", file=sys.stderr)
                    return 2
                setting = {k: v for k, v in config.items() if k not in ("methods", "iters")}  # compared per method
                if {k: v for k, v in old["config"].items() if k in setting} == json.loads(json.dumps(setting)):
                    keep = reusable(old["config"].get("methods", {}), json.loads(json.dumps(config["methods"])))
                    done = {int(s): {name: _int_keys(row) for name, row in rows.items() if keep(name)}
                            for s, rows in zip(old["config"]["seeds"], old["per_seed"])}
                    wall_before = old.get("wall_s_so_far", old["config"].get("wall_s", 0.0))
                    seed_wall.update({int(k): v for k, v in old["config"].get("seed_wall_s", {}).items()})
                    print(f"[bench] --resume: reusing finished rows from {path}", file=sys.stderr)
                    break
                print(f"[bench] --resume: {path} has another configuration; starting afresh", file=sys.stderr)
    per_seed = []

    def save_partial(rows):
        write_json_atomic(partial, dict(config={**config, "seeds": seeds[:len(per_seed) + 1], "seed_wall_s": seed_wall},
                                        complete=False,
                                        wall_s_so_far=wall_before + time.perf_counter() - t0,
                                        per_seed=per_seed + [rows]))
    try:
        for s in seeds:
            t_seed = time.perf_counter()
            per_seed.append(run_seed(args, s, device, done.get(s, {}), save_partial))
            seed_wall[s] = seed_wall.get(s, 0.0) + time.perf_counter() - t_seed  # resumed: added up
            print(f"[bench] seed {s} done in {seed_wall[s]:.0f} s", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print(f"\n[bench] interrupted: {args.out} is unchanged; finished methods are in {partial} "
              f"(rerun with --resume to continue)", file=sys.stderr)
        return 130
    agg = aggregate(per_seed)
    config.update(seeds=seeds, chunk=args.chunk, torch=torch.__version__,
                  wall_s=wall_before + time.perf_counter() - t0,  # over all runs of a resumed benchmark
                  seed_wall_s=seed_wall,                          # per seed, added up over resumed runs
                  machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    lines = ["## Configuration", ""] + [f"- {k}: {v}" for k, v in config.items() if k != "methods"]
    lines += [f"- {name} ({DESCRIPTION.get(name, 'baseline')}): " + ", ".join(f"{k}={v}" for k, v in cfg.items())
              for name, cfg in config["methods"].items()]
    chosen = [(s, next((r["selection"] for r in rows.values() if r.get("selection")), None))
              for s, rows in zip(seeds, per_seed)]
    lines += [f"- ours' design chosen on held-out meta-training tasks, seed {s}: {c['chosen']} (held-out scores: "
              + ", ".join(f"{k} {v:.3f}" for k, v in c["scores"].items()) + f"; {c['select_s']:.0f} s)"
              for s, c in chosen if c]
    if args.task not in TASKS:
        lines += ["", f"(no Bayes-optimal rows: the true task distribution of {args.task} is not known to the benchmark)"]
    report = "\n".join(lines + ["", f"## Results ({args.task})", "", table(agg, args.contexts, args.test_points)])
    print(report)
    write_json_atomic(args.out, dict(config=config, complete=True, results=agg, per_seed=per_seed))
    md = os.path.splitext(args.out)[0] + ".md"
    lm.write_atomic(md, lambda fh: fh.write(report + "\n"))
    if os.path.exists(partial):
        os.unlink(partial)
    written = [args.out, md] + args.written
    print("\n[bench] wrote " + ", ".join(written) + (" (a --quick smoke run: these numbers mean nothing)"
                                                    if args.quick else ""), file=sys.stderr)
    failed = [name for name, r in agg.items() if r["status"] != "ok"]
    if failed:
        print(f"\n[bench] FAILED: {', '.join(failed)} (see the table and {args.out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
