"""
The benchmark table: amortized LDVI against MAML, BMAML and the Neural Process.

    python bench.py --task sinusoid            # the default run (about 15 min on 2 CPU cores)
    python bench.py --task linesine --plot results/linesine.png
    python bench.py --task sinusoid --quick    # smoke run, under 30 s
    python bench.py --speed                    # throughput and scaling of every method

Protocol (DESIGN.md section 5, after Volpp et al., ICLR 2023 [1]): x ~ U[-5, 5], Gaussian
noise std 0.25; 64 meta-training tasks x 16 points; 256 test tasks x 64 points; the
context is the first n points of a test task and the target all 64 points; LMLHD per task =
logsumexp_s sum_n log N(y_n; f_s(x_n), sigma_s^2) - log S, and MSE of the mixture mean, both
reported as medians over test tasks. Every default is a flag, so other protocols can be run.

A task family of your own is a function family(T, gen) -> f that draws T tasks and returns
f: x [T, M, 1] -> noise-free y [T, M, 1]. Register it in TASKS, or pass --task module:function.

[1] M. Volpp, P. Dahlinger, P. Becker, C. Daniel, G. Neumann. Accurate Bayesian
    meta-learning by accurate task posterior inference. ICLR 2023.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict

import torch

import baselines as bl
import ldvi_meta as lm


# -----------------------------------------------------------------------------
# task families: family(T, gen) -> f, f maps x [T, M, 1] to the noise-free y [T, M, 1]

def sinusoid(T: int, gen: torch.Generator):
    """y = A sin(x + phi), A ~ U[0.1, 5], phi ~ U[0, pi]."""
    amp = 0.1 + 4.9 * torch.rand(T, 1, 1, generator=gen, device=gen.device)
    phase = math.pi * torch.rand(T, 1, 1, generator=gen, device=gen.device)
    return lambda x: amp * torch.sin(x + phase)


def linesine(T: int, gen: torch.Generator):
    """With probability 1/2 the sinusoid, else y = a x + b with a, b ~ U[-3, 3]."""
    sine = sinusoid(T, gen)
    is_line = torch.rand(T, 1, 1, generator=gen, device=gen.device) < 0.5
    a, b = (6 * torch.rand(2, T, 1, 1, generator=gen, device=gen.device) - 3).unbind(0)
    return lambda x: torch.where(is_line, a * x + b, sine(x))


TASKS = {"sinusoid": sinusoid, "linesine": linesine}


def resolve_task(name: str):
    """A registered family, or 'module:function' importable from the working directory."""
    if name in TASKS:
        return TASKS[name]
    if ":" in name:
        module, func = name.split(":", 1)
        sys.path.insert(0, os.getcwd())
        try:
            return getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--task {name}: cannot import it ({e})") from None
    raise ValueError(f"--task: expected one of {sorted(TASKS)} or module:function, got {name!r}")


def make_tasks(family, T: int, N: int, noise: float, gen: torch.Generator):
    """T tasks of N points, x ~ U[-5, 5]: (Batch with noisy y, noise-free f(x))."""
    f = family(T, gen)
    x = 10 * torch.rand(T, N, 1, generator=gen, device=gen.device) - 5           # [T, N, 1]
    clean = f(x)                                                                  # [T, N, 1]
    if clean.shape != (T, N, 1):
        raise ValueError(f"task family: f(x) must have shape {(T, N, 1)}, got {tuple(clean.shape)}")
    y = clean + noise * torch.randn(T, N, 1, generator=gen, device=gen.device)
    return lm.make_batch(x, y, name="tasks"), clean, f


# -----------------------------------------------------------------------------
# the methods, with the benchmark's settings

def method_configs(args):
    """name -> (constructor, config); the same iterations budget for ours and its ablation."""
    it = args.iters
    # sigma_y fixed at the true noise for ours and BMAML (a learned sigma_y drifted to ~1 within our
    # training budget: the ELBO explained the data as noise); MAML and NP learn theirs.
    ldvi = dict(K=args.K, iters=it["ldvi"], lr=3e-3, step_init=0.05, particles=16, tasks_per_batch=16,
                sigma_y=args.noise, learn_sigma_y=False)
    return {
        "LDVI-underdamped": (lm.LDVIMeta, lm.LDVIConfig(kernel="underdamped", **ldvi)),
        "LDVI-overdamped": (lm.LDVIMeta, lm.LDVIConfig(kernel="overdamped", **ldvi)),
        "LDVI K=0 (amortized MFVI)": (lm.LDVIMeta, lm.LDVIConfig(**{**ldvi, "K": 0})),
        "NP": (bl.NeuralProcess, bl.NPConfig(iters=it["np"], lr=1e-3)),
        "MAML": (bl.MAML, bl.MAMLConfig(iters=it["maml"], lr=1e-3, adapt_steps=5, inner_lr=0.01)),
        "BMAML": (bl.BMAML, bl.BMAMLConfig(iters=it["bmaml"], lr=1e-3, particles=10, chaser_steps=5,
                                           leader_steps=1, svgd_lr=1e-3, sigma_y=args.noise)),
    }


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


def evaluate(model, test: lm.Batch, contexts, S: int, gen: torch.Generator, chunk: int):
    """Median LMLHD and MSE per context size, one batched call per chunk of tasks."""
    out, t0 = {}, time.perf_counter()
    T = test.x.shape[0]
    for n in contexts:
        lp, err = [], []
        for part in task_chunks(test, chunk):
            mean, std = model.predictive(lm.first_n(part, n), part.x, S, gen)
            lp.append(lm.log_predictive(mean, std, part))
            err.append(lm.mse(mean, part))
        lp, err = torch.cat(lp), torch.cat(err)
        if not (torch.isfinite(lp).all() and torch.isfinite(err).all()):
            raise FloatingPointError(f"non-finite predictive scores at context size {n}")
        out[n] = dict(lmlhd=lp.median().item(), mse=err.median().item())
    ms_per_task = (time.perf_counter() - t0) * 1e3 / (len(contexts) * T)
    return out, ms_per_task


def run_seed(args, family, seed: int, device):
    """Data, training and evaluation of every method for one seed."""
    g = lambda k: torch.Generator(device=device).manual_seed(1000 * seed + k)  # noqa: E731
    train, _, _ = make_tasks(family, args.meta_tasks, args.points, args.noise, g(1))
    test, clean, f_true = make_tasks(family, args.test_tasks, args.test_points, args.noise, g(2))
    ora_lp, ora_mse = oracle_scores(test, clean, args.noise)
    rows = {"oracle": dict(scores={n: dict(lmlhd=ora_lp.median().item(), mse=ora_mse.median().item())
                                   for n in args.contexts}, train_s=0.0, ms_per_task=0.0, params=0)}
    models = {}
    for name, (cls, cfg) in method_configs(args).items():
        cfg.log_every = max(cfg.iters // 10, 1) if not args.quiet else 0
        model = cls(cfg, torch.Generator().manual_seed(1000 * seed + 3)).to(device)
        t0 = time.perf_counter()
        print(f"[bench] seed {seed}: training {name}", file=sys.stderr, flush=True)
        model.fit(train, g(4))
        train_s = time.perf_counter() - t0
        print(f"[bench] seed {seed}: evaluating {name} ({train_s:.0f}s training)", file=sys.stderr, flush=True)
        scores, ms = evaluate(model, test, args.contexts, args.samples, g(5), args.chunk)
        rows[name] = dict(scores=scores, train_s=train_s, ms_per_task=ms, params=n_params(model))
        models[name] = model
    if args.plot and seed == args.seed:
        plot(args.plot, models, test, f_true, args, g(6))
    return rows


# -----------------------------------------------------------------------------
# output: Markdown table, JSON (atomic), plot

def aggregate(per_seed: list) -> dict:
    """mean and std over seeds of every number of every row."""
    def stats(vals):
        t = torch.tensor(vals, dtype=torch.float64)
        return dict(mean=t.mean().item(), std=t.std().item() if len(vals) > 1 else 0.0)
    agg = {}
    for name, first in per_seed[0].items():
        agg[name] = dict(
            scores={n: {k: stats([r[name]["scores"][n][k] for r in per_seed]) for k in ("lmlhd", "mse")}
                    for n in first["scores"]},
            **{k: stats([r[name][k] for r in per_seed]) for k in ("train_s", "ms_per_task")},
            params=first["params"])
    return agg


def fmt(s: dict, digits: int, scale: float = 1.0) -> str:
    m = s["mean"] / scale
    return f"{m:.{digits}f}" + (f" ± {s['std'] / scale:.{digits}f}" if s["std"] > 0 else "")


def table(agg: dict, contexts, test_points: int) -> str:
    head = (["method"] + [f"LMLHD n={n}" for n in contexts] + [f"MSE n={n}" for n in contexts]
            + ["train s", "ms/task", "params"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in agg.items():
        cells = [name]
        cells += [f"{fmt(r['scores'][n]['lmlhd'], 2)} ({fmt(r['scores'][n]['lmlhd'], 3, test_points)})"
                  for n in contexts]
        cells += [fmt(r["scores"][n]["mse"], 3) for n in contexts]
        cells += [fmt(r["train_s"], 0), fmt(r["ms_per_task"], 2), str(r["params"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json_atomic(path: str, obj) -> None:
    """Write whole or not at all: a temporary file in the same folder, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a results file is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def plot(path: str, models: dict, test: lm.Batch, f_true, args, gen) -> None:
    """Rows: methods; columns: 3 test tasks x context sizes 1, 4, 16. Mean, 2-sigma band of the
    predictive mixture, a few sampled functions, the context points and the true function."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [n for n in (1, 4, 16) if n <= args.test_points]
    tasks = list(range(min(3, test.x.shape[0])))
    line = torch.linspace(-5, 5, 200, device=test.x.device, dtype=test.x.dtype).view(1, 200, 1)
    truth = f_true(line.expand(test.x.shape[0], 200, 1))[tasks]   # f_true covers all test tasks
    grid = line.expand(len(tasks), 200, 1)
    sub = lm.Batch(test.x[tasks], test.y[tasks], test.mask[tasks])
    fig, axes = plt.subplots(len(models), len(tasks) * len(sizes), figsize=(3 * len(tasks) * len(sizes),
                             2.3 * len(models)), sharex=True, squeeze=False)
    xs = grid[0, :, 0].cpu()
    for i, (name, model) in enumerate(models.items()):
        for j, n in enumerate(sizes):
            ctx = lm.first_n(sub, n)
            mean, std = model.predictive(ctx, grid, 64, gen)                      # [t, S, 200, 1]
            std = torch.as_tensor(std, device=mean.device).expand_as(mean)
            mix_mean = mean.mean(1)
            mix_std = (mean.var(1, unbiased=False) + std.square().mean(1)).sqrt()
            for k, t in enumerate(tasks):
                ax = axes[i, k * len(sizes) + j]
                mu, sd = mix_mean[k, :, 0].cpu(), mix_std[k, :, 0].cpu()
                ax.fill_between(xs, mu - 2 * sd, mu + 2 * sd, color="C0", alpha=0.2)
                for s in range(min(5, mean.shape[1])):
                    ax.plot(xs, mean[k, s, :, 0].cpu(), color="C0", lw=0.5, alpha=0.6)
                ax.plot(xs, mu, color="C0", lw=1.5)
                ax.plot(xs, truth[k, :, 0].cpu(), "k--", lw=1)
                ax.scatter(ctx.x[k, :n, 0].cpu(), ctx.y[k, :n, 0].cpu(), color="C3", s=12, zorder=3)
                ax.set_ylim(-7, 7)
                if i == 0:
                    ax.set_title(f"task {t}, n = {n}", fontsize=9)
                if k * len(sizes) + j == 0:
                    ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path + ".tmp.png", dpi=80)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


# -----------------------------------------------------------------------------
# --speed: throughput of every method and how ours scales

def speed(args, device) -> dict:
    def timed(fn, reps=3):
        fn()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    g = torch.Generator(device=device).manual_seed(0)
    train, _, _ = make_tasks(sinusoid, 64, 16, 0.25, g)
    test, _, _ = make_tasks(sinusoid, args.test_tasks, args.test_points, 0.25, g)
    chunks = task_chunks(test, args.chunk)  # as in evaluate

    def adapt_all(model):  # adaptation + prediction for every test task, context size 8
        return [model.predictive(lm.first_n(part, 8), part.x, args.samples, g) for part in chunks]
    out = dict(device=str(device), machine=f"{platform.machine()}, {os.cpu_count()} CPUs", torch=torch.__version__,
               adapt_setting=dict(test_tasks=test.x.shape[0], test_points=test.x.shape[1], context=8,
                                  samples=args.samples, chunk=args.chunk), methods={}, scaling={})
    for name, (cls, cfg) in method_configs(args).items():
        cfg.log_every = 0
        model = cls(cfg, torch.Generator().manual_seed(0)).to(device)
        it = timed(lambda: train_step(model, train, g))
        ad = timed(lambda: adapt_all(model), reps=1)
        out["methods"][name] = dict(meta_iters_per_s=1 / it, adapt_s_all_tasks=ad,
                                    adapt_ms_per_task=ad * 1e3 / test.x.shape[0])
        if name == "MAML":
            ref = timed(lambda: train_step(model, train, g, lambda c, b, _: vmap_maml_loss(model, c, b)))
            out["methods"]["MAML (torch.func.vmap reference)"] = dict(meta_iters_per_s=1 / ref)
            print(f"[speed] MAML vmap reference: {1 / ref:.1f} meta-it/s", file=sys.stderr, flush=True)
        print(f"[speed] {name}: {1 / it:.1f} meta-it/s, {ad * 1e3 / test.x.shape[0]:.2f} ms/task "
              f"(S = {args.samples})", file=sys.stderr, flush=True)
    for kernel in lm.KERNELS:
        rows = out["scaling"][kernel] = []
        for P, K, T in ([(P, 10, 16) for P in (1, 4, 16, 64, 256)] + [(16, K, 16) for K in (0, 2, 4, 8, 16, 32)]
                        + [(16, 10, T) for T in (1, 4, 16, 64)]):
            model = lm.LDVIMeta(lm.LDVIConfig(kernel=kernel, K=K, particles=P, tasks_per_batch=T, log_every=0),
                                torch.Generator().manual_seed(0)).to(device)
            sec = timed(lambda: train_step(model, train, g), reps=2)
            rows.append(dict(P=P, K=K, T=T, ms_per_iter=sec * 1e3))
            print(f"[speed] {kernel} P={P} K={K} T={T}: {sec * 1e3:.1f} ms/iteration", file=sys.stderr, flush=True)
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
    if isinstance(model, lm.LDVIMeta):
        loss = model.loss(batch, g)
    else:
        loss = (loss_fn or model.loss)(lm.random_subset(batch, g, model.cfg.min_context), batch, g)
    loss.backward()


# -----------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sinusoid", help="sinusoid, linesine, or module:function (a task family)")
    p.add_argument("--meta-tasks", type=int, default=64, help="meta-training tasks")
    p.add_argument("--points", type=int, default=16, help="points per meta-training task")
    p.add_argument("--test-tasks", type=int, default=256, help="test tasks")
    p.add_argument("--test-points", type=int, default=64, help="points per test task (all are targets)")
    p.add_argument("--noise", type=float, default=0.25, help="observation noise std of every split")
    p.add_argument("--contexts", default="0,1,2,4,6,8,12,16", help="comma-separated context sizes")
    p.add_argument("--samples", type=int, default=128,
                   help="posterior samples S per test task (protocol: 1024; default 128 to fit 15 min on 2 cores)")
    p.add_argument("--K", type=int, default=5, help="diffusion steps of ours")
    p.add_argument("--iters", type=int, default=None, help="meta-training iterations of every method (overrides)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=1, help="repeat with this many seeds; report mean ± std")
    p.add_argument("--chunk", type=int, default=None,
                   help="test tasks per evaluation call (default max(1, 1024 // samples): on the CPU, "
                        "small [tasks, samples, D] tensors that stay in cache are 2-4x faster)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=None, help="JSON results (default results/<task>.json)")
    p.add_argument("--plot", default=None, help="PNG file with the predictive of every method")
    p.add_argument("--quick", action="store_true", help="shrink everything: a smoke run under 30 s")
    p.add_argument("--speed", action="store_true", help="measure throughput and scaling instead of the table")
    p.add_argument("--quiet", action="store_true", help="no training progress on stderr")
    args = p.parse_args(argv)
    try:
        args.contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        p.error(f"--contexts: expected comma-separated integers, got {args.contexts!r}")
    for name in ("meta_tasks", "points", "test_tasks", "test_points", "samples", "seeds", "chunk"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    if args.K < 0:
        p.error(f"--K: expected an integer >= 0, got {args.K}")
    if not (math.isfinite(args.noise) and args.noise > 0):
        p.error(f"--noise: expected a finite number > 0, got {args.noise}")
    if args.quick:
        args.meta_tasks, args.test_tasks, args.samples, args.K = min(args.meta_tasks, 16), min(args.test_tasks, 16), \
            min(args.samples, 8), min(args.K, 2)
        args.contexts = [n for n in args.contexts if n <= args.test_points]
    if any(n < 0 or n > args.test_points for n in args.contexts):
        p.error(f"--contexts: expected sizes in [0, --test-points = {args.test_points}], got {args.contexts}")
    if args.iters is not None and args.iters < 1:
        p.error(f"--iters: expected an integer >= 1, got {args.iters}")
    base = dict(ldvi=2400, np=3000, maml=1500, bmaml=1000) if not args.quick else dict(ldvi=15, np=15, maml=15, bmaml=15)
    args.iters = {k: args.iters for k in base} if args.iters is not None else base
    try:
        args.family = resolve_task(args.task)
    except ValueError as e:
        p.error(str(e))
    if args.device not in (None, "cpu", "cuda"):
        p.error(f"--device: expected cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args.out = args.out or os.path.join("results", f"{args.task.replace(':', '_')}.json")
    args.chunk = args.chunk or max(1, 1024 // args.samples)  # after --quick has set the samples
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else lm.default_device()  # chosen once, here
    torch.manual_seed(args.seed)  # nothing should use the global RNG; this makes sure anyway
    t0 = time.perf_counter()
    if args.speed:
        result = speed(args, device)
        write_json_atomic(args.out.replace(".json", "_speed.json"), result)
        print(json.dumps(result, indent=1))
        return
    per_seed = [run_seed(args, args.family, s, device) for s in range(args.seed, args.seed + args.seeds)]
    agg = aggregate(per_seed)
    config = dict(task=args.task, meta_tasks=args.meta_tasks, points=args.points, test_tasks=args.test_tasks,
                  test_points=args.test_points, noise=args.noise, contexts=args.contexts, samples=args.samples,
                  chunk=args.chunk,
                  seeds=list(range(args.seed, args.seed + args.seeds)), device=str(device),
                  torch=torch.__version__, machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
                  methods={name: asdict(cfg) for name, (_, cfg) in method_configs(args).items()},
                  wall_s=time.perf_counter() - t0)
    print("## Configuration\n")
    for k, v in config.items():
        if k != "methods":
            print(f"- {k}: {v}")
    for name, cfg in config["methods"].items():
        print(f"- {name}: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    print(f"\n## Results ({args.task}; LMLHD = median per task (per point); MSE = median)\n")
    print(table(agg, args.contexts, args.test_points))
    write_json_atomic(args.out, dict(config=config, results=agg, per_seed=per_seed))


if __name__ == "__main__":
    main()
