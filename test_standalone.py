"""ldvi_meta.py copied alone into another project works (the promise of this repository), and the bad
inputs of the newer features (last-layer prior, Gaussian baselines, HMC gold standard, the screening
script) get a clear error that names the argument, before any expensive work, or a correct run."""
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import baselines as bl
import bench
import gold
import ldvi_meta as lm
import tasks

HERE = os.path.dirname(os.path.abspath(__file__))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def data(T=3, N=6, seed=1):
    return tasks.make_tasks(tasks.sinusoid, T, N, 0.25, gen(seed))[0]


# -----------------------------------------------------------------------------
# one file

ROUND_TRIP = textwrap.dedent('''
    import os, sys
    import torch
    import ldvi_meta as lm
    assert os.path.dirname(os.path.abspath(lm.__file__)) == os.getcwd(), lm.__file__
    project = {"common", "bench", "baselines", "tasks", "gold"}
    assert not project & set(sys.modules), project & set(sys.modules)
    g = torch.Generator().manual_seed(0)
    x = 4 * torch.rand(6, 10, 2, generator=g) - 2                                  # 6 tasks, 10 points, dx = 2
    y = torch.stack([x[..., 0].sin() + x[..., 1], x[..., 0] * x[..., 1]], -1)      # dy = 2
    data = lm.make_batch(x, y + 0.1 * torch.randn(y.shape, generator=g))
    model = lm.LDVIMeta(lm.LDVIConfig(dx=2, dy=2, hidden=(16, 16), sigma_y=0.1, iters=3, log_every=0,
                                      tasks_per_batch=4, particles=4), torch.Generator().manual_seed(1))
    losses = model.fit(data, torch.Generator().manual_seed(2))
    assert len(losses) == 3 and all(v == v for v in losses), losses
    ctx = lm.first_n(data, 3)
    theta, log_w = model.sample(ctx, 5, torch.Generator().manual_seed(3))
    assert theta.shape == (6, 5, model.bnn.n_params) and torch.isfinite(log_w).all()
    mean, std = model.predictive(ctx, data.x, 7, torch.Generator().manual_seed(4))
    assert mean.shape == (6, 7, 10, 2)
    model.save("model.pt", train_s=1.0)
    again = lm.LDVIMeta.load("model.pt")
    mean2, std2 = again.predictive(ctx, data.x, 7, torch.Generator().manual_seed(4))
    assert torch.equal(mean, mean2) and torch.equal(std, std2), (mean - mean2).abs().max()
    print("round trip", float(lm.log_predictive(mean2, std2, data).mean()))
''')


def test_ldvi_meta_copied_alone_into_an_empty_folder_runs_the_round_trip(tmp_path):
    shutil.copy(os.path.join(HERE, "ldvi_meta.py"), tmp_path / "ldvi_meta.py")
    (tmp_path / "run.py").write_text(ROUND_TRIP)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round trip" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ldvi_meta.py", "model.pt", "run.py"]


def test_ldvi_meta_imports_nothing_from_the_project():
    project = ("common", "bench", "baselines", "tasks", "gold")
    for line in open(os.path.join(HERE, "ldvi_meta.py")):
        words = line.split()
        if words[:1] in (["import"], ["from"]):
            assert words[1].split(".")[0] not in project, line


# -----------------------------------------------------------------------------
# the bad inputs of the newer features

def screen_module():
    spec = importlib.util.spec_from_file_location("screen", os.path.join(HERE, "results", "screen.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_screen_applies_every_field_it_records_to_a_baseline():
    overrides, (gold, meta_tasks), load, cls, cfg = screen_module().configure(
        "sinusoid", ["method=ALPaCA", "iters=2", "features=8", "meta_tasks=128"])
    assert (gold, meta_tasks) == (0, 128)
    assert cls is bl.GaussianModel and load is None
    assert (cfg.iters, cfg.features, cfg.kernel) == (2, 8, "linear")
    assert overrides == dict(iters=2, features=8, method="ALPaCA")
    overrides, _, _, cls, cfg = screen_module().configure("sinusoid", ["K=0", "replicate=2"])
    assert overrides == dict(K=0, replicate=2) and cls is lm.LDVIMeta and cfg.K == 0  # recorded, not a field


@pytest.mark.parametrize("family, fields, message", [
    ("sinusoid", ["load=m.pt", "K=5", "sigma_y=0.5"], "load=: a saved model keeps the config it was trained "
                                                       "with, so K, sigma_y cannot be set with it"),
    ("sinusoid", ["load=m.pt", "method=NP"], "so method cannot be set with it"),
    ("sinusiod", [], "FAMILY: expected one of ['freqsine', 'linesine', 'sinusoid']"),
    ("sinusoid", ["method=ALPACA"], "method: expected one of LDVI-underdamped"),
    ("sinusoid", ["method=ALPaCA", "K=5"], "K: not a field of ALPaCA's GaussianConfig"),
    ("sinusoid", ["Kk=5"], "Kk: not a field of LDVI's LDVIConfig"),
    ("sinusoid", ["K=-1"], "K: expected an integer >= 0"),
    ("sinusoid", ["meta_tasks=0"], "meta_tasks: expected an integer >= 1"),
    ("sinusoid", ["replicate=-1"], "replicate: expected an integer >= 0, got -1"),
    ("sinusoid", ["replicate=1.5"], "replicate: expected an integer >= 0, got 1.5"),
    ("sinusoid", ["replicate=two"], "replicate: expected an integer >= 0, got 'two'"),
    ("sinusoid", ["load=m.pt", "replicate=1"], "so replicate cannot be set with it"),
    ("sinusoid", ["hidden_latent=4", "select_scale=0"], "select_scale: expected a number > 0"),
    ("sinusoid", ["hidden_latent=4", "select_scale=big"], "select_scale: expected a number > 0"),
    ("sinusoid", ["method=ALPaCA", "select_scale=0.5"], "select_scale: chooses between LDVI configs"),
    ("sinusoid", ["hidden_latent=0", "select_scale=0.5"], "select_scale: input scales need a hidden latent"),
    ("sinusoid", ["load=m.pt", "select_scale=0.5"], "so select_scale cannot be set with it"),
    ("sinusoid", ["select_iters=0"], "select_iters: expected an integer >= 1"),
    ("sinusoid", ["select_iters=36.5"], "select_iters: expected an integer >= 1"),
    ("sinusoid", ["iters=900", "select_iters=900"], "select_iters: expected a training length other than the "
                                                    "config's own iters (900)"),
    ("sinusoid", ["method=NP", "select_iters=3600"], "select_iters: chooses between LDVI configs"),
    ("sinusoid", ["load=m.pt", "select_iters=3600"], "so select_iters cannot be set with it"),
    ("sinusoid", ["select=1"], "select: expected True or False"),
    ("sinusoid", ["select=True", "select_scale=0.5"], "select: makes the benchmark's own choice"),
    ("sinusoid", ["method=NP", "select=True"], "select: chooses between LDVI configs"),
    ("sinusoid", ["hidden_latent=0", "select=True"], "select: input scales need a hidden latent"),
    ("sinusoid", ["load=m.pt", "select=True"], "so select cannot be set with it"),
])
def test_screen_refuses_fields_it_would_ignore_or_cannot_read(family, fields, message):
    with pytest.raises(SystemExit) as info:
        screen_module().configure(family, fields)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize("field, value, expected", [("hidden_std", 0.5, "its default .*"),
                                                     ("hidden_latent_init", 0.5, "its default .*"),
                                                     ("hidden_latent", 2, "0")])
def test_a_last_layer_field_with_the_all_weights_prior_is_refused(field, value, expected):
    with pytest.raises(ValueError, match=f"{field}: expected {expected} with structure = 'all'"):
        lm.LDVIConfig(**{"structure": "all", "components": 1, "hidden_latent": 0, field: value})
    lm.LDVIConfig(structure="all", components=1, hidden_latent=0)  # its defaults otherwise are accepted


def test_random_subset_needs_a_generator():
    with pytest.raises(ValueError, match="gen: expected a torch.Generator"):
        lm.random_subset(data(), None)


def test_a_minibatch_of_empty_contexts_trains():
    """One meta-training task of 2 points drawn alone: a third of the minibatches have an empty
    context, whose ELBO is exactly 0 and has no gradient. Training goes on, and it learns."""
    model = lm.LDVIMeta(lm.LDVIConfig(hidden=(8, 8), K=1, tasks_per_batch=1, iters=30, log_every=0,
                                      enc_hidden=16, enc_dim=8), gen(0))
    before = [p.detach().clone() for p in model.parameters()]
    losses = model.fit(data(1, 2), gen(1))
    assert len(losses) == 30 and 0.0 in losses and all(map(torch.isfinite, map(torch.tensor, losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bench_quick_with_one_meta_training_task_runs(tmp_path):
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--quiet", "--meta-tasks", "1", "--methods", "LDVI-K0", "--contexts", "0,1",
                       "--out", str(out)]) == 0
    assert out.exists()


def test_one_meta_training_task_says_ours_is_trained_without_the_held_out_choice(tmp_path, capsys):
    out = str(tmp_path / "r.json")
    bench.parse_args(["--quick", "--meta-tasks", "1", "--methods", "LDVI-K0", "--out", out])
    assert "no task to hold out" in capsys.readouterr().err
    bench.parse_args(["--quick", "--meta-tasks", "1", "--no-select", "--methods", "LDVI-K0", "--out", out])
    assert "no task to hold out" not in capsys.readouterr().err


def test_split_rhat_needs_two_draws_per_half_chain():
    with pytest.raises(ValueError, match=r"x: expected a tensor \[T, C, N\] with N >= 4"):
        gold.split_rhat(torch.zeros(2, 8, 1))


@pytest.mark.parametrize("kwargs, message", [(dict(draws=0), "draws: expected an integer >= 1"),
                                             (dict(draws=4, thin=5), "thin: expected at most draws = 4"),
                                             (dict(thin=0), "thin: expected an integer >= 1")])
def test_hmc_refuses_draws_it_cannot_keep_before_the_warm_up(kwargs, message):
    calls = []

    def target(v):
        calls.append(1)
        return -0.5 * v.square().sum(-1), -v

    with pytest.raises(ValueError, match=message):
        gold.hmc(target, torch.zeros(1, 2, 3), torch.ones(1, 1, 3), gen(0), warmup=50, **kwargs)
    assert not calls  # refused before a single evaluation of the target


def test_gold_refuses_too_few_draws_for_its_r_hat():
    model = lm.LDVIMeta(lm.LDVIConfig(hidden=(8, 8), log_every=0), gen(0))
    with pytest.raises(ValueError, match="draws: expected an integer >= 4"):
        gold.Gold(model, chains=4, warmup=10, draws=2, n_leapfrog=3, name="")


def test_exact_log_predictive_with_a_tensor_target_names_it():
    model = bl.GaussianModel(bl.GaussianConfig(iters=1, log_every=0), gen(0))
    test = data()
    with pytest.raises(ValueError, match=r"target: expected a Batch\(x, y, mask\)"):
        model.exact_log_predictive(lm.first_n(test, 2), test.y)


@pytest.mark.parametrize("make", [lambda: lm.LDVIConfig(sigma_y=1e-12),
                                  lambda: bl.GaussianConfig(kernel="rbf", sigma_y=1e-9)])
def test_a_noise_std_too_small_to_factor_is_refused_by_name(make):
    with pytest.raises(ValueError, match="sigma_y: expected a noise std >= 1e-06"):
        make()


def test_a_singular_gram_matrix_names_sigma_y():
    """A GP on repeated inputs whose learned sigma_y has shrunk below what float64 can factor."""
    model = bl.GaussianModel(bl.GaussianConfig(kernel="rbf", sigma_y=1e-6, iters=1, log_every=0), gen(0))
    model.log_sigma_y.fill_(-40.0)  # sigma_y = 4e-18, as a learned one could end
    x = torch.zeros(1, 5, 1)  # the same input five times
    with pytest.raises(FloatingPointError, match="sigma_y: K \\+ sigma_y\\^2 I is not positive definite"):
        model.log_evidence(lm.make_batch(x, torch.zeros(1, 5, 1)))


def test_a_non_finite_last_layer_posterior_names_sigma_y():
    model = lm.LDVIMeta(lm.LDVIConfig(hidden=(8, 8), hidden_latent=0, log_every=0), gen(0))
    ctx = lm.first_n(data(), 3)
    with torch.no_grad():
        Phi = model._design(model.feature_bnn(model.sample_prior(3, 2, gen(1)), ctx.x), ctx.mask)
        prior = model.last_prior()
        Ainv, G, resp = lm.last_layer_evidence(Phi, ctx, prior, 0.0625)[2]
        with pytest.raises(FloatingPointError, match="last layer: its posterior is not finite at sigma_y = 0.25"):
            lm.last_layer_draw(Phi, ctx, prior, 0.0625, (Ainv, G, resp * float("nan")), gen(2))


def test_save_into_a_missing_folder_names_the_path(tmp_path):
    model = lm.LDVIMeta(lm.LDVIConfig(hidden=(8, 8), log_every=0), gen(0))
    target = tmp_path / "no" / "such" / "model.pt"
    with pytest.raises(ValueError) as info:
        model.save(str(target))
    message = str(info.value)
    assert message.startswith("path: the folder") and "does not exist" in message and ".tmp-" not in message
    assert list(tmp_path.iterdir()) == []


def test_load_dir_with_another_method_s_model_and_other_flags_names_the_field(tmp_path, capsys):
    out = str(tmp_path / "r.json")
    args = bench.parse_args(["--quick", "--methods", "LDVI-K0", "--latent", "4", "--out", out])
    cls, cfg = bench.method_configs(args)["LDVI-underdamped"]  # the underdamped model, trained with --latent 4
    cls(cfg, gen(0)).save(str(tmp_path / "sinusoid_seed0_LDVI-overdamped.pt"))
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--methods", "LDVI-overdamped", "--load-dir", str(tmp_path), "--out", out])
    err = capsys.readouterr().err
    assert "kernel = 'underdamped' where LDVI-overdamped has kernel = 'overdamped', and no flag sets kernel" in err
    assert "pass the flags it was trained with" not in err, err
