"""Screening runs behind the lab notes (results/README.md): one LDVI variant, one seed, the first 64
test tasks of the benchmark's seed, scored by the benchmark's own estimator (S = 1024 draws).

The data, seeds and training follow bench.py exactly (meta-training tasks from seed 1000 s + 1,
the model from 1000 s + 3, training 1000 s + 4); evaluation draws from 1000 s + 5. Prints and
appends one JSON line per run: median LMLHD, failures (> 20 nats below the Bayes-optimal score),
the 10% quantile and the calibration error at each n, the training time and, at each n, the
median effective sample size of the importance weights of 1024 particles (ESS, from 1 to 1024).

    python results/screen.py OUT.jsonl FAMILY SEED name=value ...   (LDVIConfig fields, e.g. structure=last;
        meta_tasks=N trains on N meta-training tasks instead of the benchmark's 64; replicate=N > 0 draws
        the model's init and training stream afresh, on the same data and test tasks: the training noise;
        select_scale=TAU chooses between the config and the config with input scales fixed at TAU by
        ldvi_meta.select_config on held-out meta-training tasks, then trains the chosen one on all of them;
        select_iters=N also lets it choose between the config's training length and N iterations;
        select=True makes the benchmark's own choice instead, bench.choose_design with its seed: what a
        default row of bench.py trains)
    python results/screen.py OUT.jsonl FAMILY SEED method=ALPaCA     (a baseline with the benchmark's settings)
    python results/screen.py OUT.jsonl FAMILY SEED load=MODEL.pt gold=16
        (a saved screening model, no training; gold=N adds bench.py's HMC gold standard on the first N
        of the 64 tasks at n = 1, 2, 4: the inference gap ours - HMC, the split R-hat and the acceptance)
"""
import ast
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
import ldvi_meta as lm  # noqa: E402
import tasks  # noqa: E402

CONTEXTS = [0, 1, 2, 4, 8, 16]
TASKS = 64


def bayes_rows(family, seed, test):
    """The Bayes-optimal per-task scores of these test tasks (cached: the same for every variant)."""
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"screen_bayes_{family}_{seed}.pt")
    if os.path.exists(path):
        return torch.load(path)
    rows = tasks.bayes_optimal(test, CONTEXTS, 0.25, family, 1024, torch.Generator().manual_seed(1000 * seed + 7),
                               draws=bench.BAYES_DRAWS)
    torch.save(rows, path)
    return rows


def ess(model, test, n, gen, P=1024, chunk=8):
    """Median over tasks of the effective sample size of P importance weights at context size n."""
    out = []
    with torch.no_grad():
        for part in bench.task_chunks(test, chunk):
            _, log_w = model.sample(lm.first_n(part, n), P, gen)
            out.append(1 / torch.softmax(log_w, -1).square().sum(-1))
    return torch.cat(out).median().item()


def replace_fields(cfg, fields: dict, what: str):
    """cfg with fields replaced (checked again by its __post_init__); SystemExit naming a field it lacks."""
    unknown = sorted(set(fields) - set(cfg.__dataclass_fields__))
    if unknown:
        raise SystemExit(f"{', '.join(unknown)}: not a field of {what}'s {type(cfg).__name__} "
                         f"(its fields: {', '.join(cfg.__dataclass_fields__)})")
    try:
        return dataclasses.replace(cfg, **fields)
    except (ValueError, TypeError) as e:
        raise SystemExit(str(e)) from None


def pop_choice(overrides: dict, key: str, method, rep: dict, expected: str, ok):
    """overrides[key] popped and checked (None if absent); SystemExit if it fails ok or comes with method=."""
    value = overrides.pop(key, None)
    if value is None:
        return None
    if not ok(value):
        raise SystemExit(f"{key}: expected {expected}, got {value!r}")
    if method is not None:
        raise SystemExit(f"{key}: chooses between LDVI configs, so it cannot be set with method=")
    rep[key] = value
    return value


def with_alternative(candidates: dict, field: str, value, label) -> dict:
    """Every named candidate config as it is and with field = value, named by label(config) as well."""
    return {f"{name}, {label(c)}": c for name, c in candidates.items()} | {
        f"{name}, {label(alt)}": alt for name, alt in
        ((name, dataclasses.replace(c, **{field: value})) for name, c in candidates.items())}


def configure(family: str, fields) -> tuple:
    """The name=value fields checked, before any work: (the overrides recorded with the row, gold, the
    path of a saved model or None, the class, its config or None). SystemExit naming a field that is
    misspelt, unknown to the method's config, out of range, or would be ignored."""
    overrides = {}
    for f in fields:
        k, _, v = f.partition("=")
        try:
            overrides[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            overrides[k] = v
    if family not in tasks.TASKS:
        raise SystemExit(f"FAMILY: expected one of {sorted(tasks.TASKS)}, got {family!r}")
    method = overrides.pop("method", None)
    if method is not None and method not in bench.METHODS:
        raise SystemExit(f"method: expected one of {', '.join(bench.METHODS)}, got {method!r}")
    extra = sorted(set(overrides) - {"load", "gold", "meta_tasks"}) + (["method"] if method is not None else [])
    is_int = lambda v, low: isinstance(v, int) and not isinstance(v, bool) and v >= low  # noqa: E731
    replicate = overrides.pop("replicate", 0)
    if not is_int(replicate, 0):
        raise SystemExit(f"replicate: expected an integer >= 0, got {replicate!r}")
    rep = {"replicate": replicate} if replicate else {}  # recorded with the row
    # the held-out choices (select_config): each is checked, refused with method=, and recorded with the row
    select = pop_choice(overrides, "select_scale", method, rep, "a number > 0 (the fixed tau to choose against none)",
                        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf"))
    select_iters = pop_choice(overrides, "select_iters", method, rep, "an integer >= 1 (the training length to "
                              "choose against the config's own)", lambda v: is_int(v, 1))
    bench_choice = pop_choice(overrides, "select", method, rep, "True or False (the benchmark's held-out choice "
                              "of input scale and training length)", lambda v: isinstance(v, bool))
    if bench_choice and (select is not None or select_iters is not None):
        raise SystemExit("select: makes the benchmark's own choice, so select_scale and select_iters cannot be set "
                         "with it")
    if "load" in overrides and extra:
        raise SystemExit(f"load=: a saved model keeps the config it was trained with, so {', '.join(extra)} "
                         "cannot be set with it")
    gold = overrides.pop("gold", 0)
    meta_tasks = overrides.pop("meta_tasks", 64)
    if not (isinstance(meta_tasks, int) and meta_tasks >= 1):
        raise SystemExit(f"meta_tasks: expected an integer >= 1, got {meta_tasks!r}")
    if "load" in overrides:  # a model saved by an earlier screening run: its config, no training
        return overrides, (gold, meta_tasks), overrides["load"], lm.LDVIMeta, None
    if method is not None:  # a method of the benchmark, as bench.py configures it, with these fields changed
        args = bench.parse_args(["--out", os.path.join(tempfile.gettempdir(), "screen.json")])
        cls, cfg = bench.method_configs(args)[method]
        cfg = replace_fields(cfg, dict(overrides, log_every=0), method)
        return dict(overrides, method=method, **rep), (gold, meta_tasks), None, cls, cfg
    cfg = replace_fields(lm.LDVIConfig(sigma_y=0.25), dict(overrides, log_every=0), "LDVI")
    if select is not None and not cfg.hidden_latent:
        raise SystemExit("select_scale: input scales need a hidden latent (set hidden_latent=N)")
    if bench_choice and not cfg.hidden_latent:
        raise SystemExit("select: input scales need a hidden latent (leave hidden_latent at its default)")
    if select_iters is not None and select_iters == cfg.iters:
        raise SystemExit(f"select_iters: expected a training length other than the config's own iters "
                         f"({cfg.iters}), got {select_iters!r}")
    return dict(overrides, **rep), (gold, meta_tasks), None, lm.LDVIMeta, cfg


def main(out, family, seed, *fields):
    if not seed.isdigit():
        raise SystemExit(f"SEED: expected an integer >= 0, got {seed!r}")
    seed = int(seed)
    overrides, (gold, meta_tasks), load, cls, cfg = configure(family, fields)
    if meta_tasks != 64:
        overrides["meta_tasks"] = meta_tasks  # recorded with the row
    g = lambda k: torch.Generator().manual_seed(1000 * seed + k)  # noqa: E731
    replicate, selected = overrides.get("replicate", 0), None
    if replicate:  # another model init and training stream on the same data and test tasks
        g_data = g
        g = lambda k: g_data(k) if k in (1, 2, 5, 6, 8) else torch.Generator().manual_seed(  # noqa: E731
            1000 * seed + k + 100 * replicate)
    fam = tasks.TASKS[family]
    train, _, _ = tasks.make_tasks(fam, meta_tasks, 16, 0.25, g(1))
    test, _, _ = tasks.make_tasks(fam, 256, 64, 0.25, g(2))
    test = lm.Batch(*(t[:TASKS] for t in test))
    if load:
        model = lm.LDVIMeta.load(load)
        cfg, train_s = model.cfg, 0.0
    else:
        t0 = time.perf_counter()
        candidates = {"no scale" if overrides.get("select_scale") else "as given": cfg}
        if overrides.get("select_scale"):  # or a fixed scale: chosen on held-out meta-training tasks
            candidates["fixed scale"] = dataclasses.replace(cfg, input_scale=float(overrides["select_scale"]),
                                                            learn_input_scale=False)
        if overrides.get("select_iters"):  # each of them at its own length, or at this one
            candidates = with_alternative(candidates, "iters", overrides["select_iters"], lambda c: f"{c.iters} iters")
        if overrides.get("select"):  # what bench.py does for its default rows, with its seed
            args = bench.parse_args(["--out", os.path.join(tempfile.gettempdir(), "screen.json")])
            choice = bench.choose_design(args, seed, cfg, train, torch.device("cpu"))
            cfg = dataclasses.replace(cfg, **choice["fields"])
            selected = dict(chosen=choice["chosen"], scores=choice["scores"])
        elif len(candidates) > 1:
            chosen, val = lm.select_config(list(candidates.values()), train, g(9))
            name, cfg = list(candidates.items())[chosen]
            selected = dict(chosen=name, scores={k: round(v, 3) for k, v in zip(candidates, val)})
        model = cls(cfg, g(3))
        model.fit(train, g(4))
        train_s = time.perf_counter() - t0
        if os.environ.get("SCREEN_MODELS"):  # keep the model for later looks (HMC, priors, resampling)
            os.makedirs(os.environ["SCREEN_MODELS"], exist_ok=True)
            model_name = f"{family}_{seed}_" + "_".join(f"{k}={v}" for k, v in sorted(overrides.items())) + ".pt"
            model.save(os.path.join(os.environ["SCREEN_MODELS"], model_name), train_s=train_s)
    bayes = bayes_rows(family, seed, test)
    scores, ms = bench.evaluate(model, test, CONTEXTS, 1024, g(5), 1, progress=False)
    summary = bench.summaries(scores, test, {n: bayes[n]["exact"] for n in CONTEXTS})
    row = dict(family=family, seed=seed, config=overrides, train_s=round(train_s, 1), eval_ms_per_task=round(ms, 1),
               skipped=len(getattr(model, "skipped_updates", [])))
    if selected:
        row["selected"] = selected
    for n in CONTEXTS:
        row[n] = {k: round(v, 4) for k, v in summary[n].items()}
        row[n]["ess"] = round(ess(model, test, n, g(6)), 1) if n and cls is lm.LDVIMeta else 1024.0
    if getattr(cfg, "structure", None) == "last":
        prior = model.last_prior()
        if hasattr(model, "hidden_log_std"):
            row["hidden_std"] = [round(v, 5) for v in model.hidden_log_std.exp().tolist()]
        else:  # the hidden latent's basis B_h
            row["hidden_basis_singular_values"] = [round(v, 3) for v in
                                                   torch.linalg.svdvals(model.hidden_basis.detach()).tolist()]
            if hasattr(model, "input_log_scale"):  # the learned prior std tau of each input's log length-scale
                row["input_scale_tau"] = [round(v, 4) for v in model.input_log_scale.exp().tolist()]
        row["mix"] = [round(v, 3) for v in prior.log_mix.exp().tolist()]
        row["last_std_median"] = [round(v, 4) for v in prior.log_std.exp().median(-1).values.tolist()]
        row["basis_singular_values"] = [[round(v, 3) for v in torch.linalg.svdvals(b).tolist()]
                                        for b in prior.basis.detach()]
    if gold:  # bench.py's gold standard on the first `gold` tasks, with the benchmark's HMC settings
        args = bench.parse_args(["--out", os.path.join(tempfile.gettempdir(), "screen.json"), "--gold", str(gold)])
        args.contexts, args.quiet = [1, 2, 4], True
        per_task = {"ours": {n: scores[n]["lmlhd"] for n in CONTEXTS},
                    "Bayes-optimal": {n: bayes[n]["exact"] for n in CONTEXTS}}
        rows = {}
        bench.gold_rows(args, rows, {"ours": model}, per_task, test, g(8), seed)
        r = rows["gold: ours"]
        row["gold"] = {k: r[k] for k in ("status", "tasks", "inference_gap", "model_gap", "ours_on_gold_tasks",
                                         "rhat_median", "accept_median", "train_s") if k in r}
        row["gold"]["hmc_lmlhd"] = {n: s["lmlhd"] for n, s in r["scores"].items()} if "scores" in r else None
    if os.environ.get("SCREEN_MODELS") and not load:
        row["model"] = model_name
    line = json.dumps(row)
    with open(out, "a") as fh:
        fh.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main(*sys.argv[1:])
