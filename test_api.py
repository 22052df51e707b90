"""A user's first day: bad input across the command line and the API gets a clear error that
names the argument (never NaN or a deep stack trace), and every method saves and loads."""
import dataclasses
import os
import sys

import pytest
import torch

import baselines as bl
import bench
import ldvi_meta as lm
import tasks

SMALL = dict(hidden=(8, 8), log_every=0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def data(T=3, N=6, seed=1):
    return tasks.make_tasks(tasks.sinusoid, T, N, 0.25, gen(seed))[0]


def models():
    return {"LDVI": lm.LDVIMeta(lm.LDVIConfig(K=2, latent=2, enc_hidden=16, enc_dim=8, **SMALL), gen(0)),
            "MAML": bl.MAML(bl.MAMLConfig(**SMALL), gen(0)),
            "BMAML": bl.BMAML(bl.BMAMLConfig(particles=3, **SMALL), gen(0)),
            "NP": bl.NeuralProcess(bl.NPConfig(hidden=16, r_dim=8, z_dim=4, log_every=0), gen(0))}


# -----------------------------------------------------------------------------
# the command line: (argv, fragment of the message); parse_args exits with status 2

FAMILIES = '''
import torch
not_callable = 3
def returns_none(T, gen):
    return None
def wrong_shape(T, gen):
    return lambda x: x[:, :, 0]
def nonfinite(T, gen):
    return lambda x: x / 0.0
def raises(T, gen):
    raise RuntimeError("boom")
def numpy_global(T, gen):
    import numpy as np
    a = torch.tensor(np.random.rand(T, 1, 1), dtype=torch.float32)
    return lambda x: a * x
def torch_global(T, gen):
    a = torch.rand(T, 1, 1)
    return lambda x: a * torch.sin(x)
def python_global(T, gen):
    import random
    a = torch.tensor([[[random.random()]] for _ in range(T)])
    return lambda x: a * torch.sin(x)
'''

CLI = [
    (["--contexts", "0,100"], "--contexts: expected sizes in [0, --test-points"),
    (["--contexts", "a,b"], "--contexts: expected comma-separated integers"),
    (["--contexts", "4,4"], "--contexts: expected distinct sizes"),
    (["--contexts", "99", "--quick"], "--contexts: expected sizes in [0"),
    (["--samples", "0"], "--samples: expected an integer >= 1"),
    (["--task", "nonexistent"], "--task: expected one of"),
    (["--task", ":"], "--task: expected one of"),
    (["--task", "no_such_module_xyz:f"], "cannot import it"),
    (["--task", "fam_cli:not_callable"], "expected a function family(T, gen)"),
    (["--task", "fam_cli:returns_none"], "expected family(T, gen) to return a function"),
    (["--task", "fam_cli:wrong_shape"], "f(x) must return"),
    (["--task", "fam_cli:nonfinite"], "f(x) returned NaN or inf"),
    (["--task", "fam_cli:raises"], "drawing 2 tasks failed (RuntimeError: boom)"),
    (["--noise", "-1"], "--noise: expected a finite number > 0"),
    (["--noise", "nan"], "--noise: expected a finite number > 0"),
    (["--K", "-2"], "--K: expected an integer >= 0"),
    (["--K", "2.5"], "--K: invalid int value"),
    (["--latent", "-1"], "--latent: expected an integer >= 0"),
    (["--device", "tpu"], "--device: expected cpu, cuda or cuda:N"),
    (["--device", "cuda:7"], "--device cuda:7: no such CUDA device"),
    (["--bogus"], "unrecognized arguments"),
    (["--seed", str(10 ** 19)], "--seed: expected seeds below"),
    (["--seed", "-1"], "--seed: expected an integer >= 0"),
    (["--seeds", "0"], "--seeds: expected an integer >= 1"),
    (["--methods", "NP,XYZ"], "--methods: expected distinct names"),
    (["--methods", "NP,np"], "--methods: expected distinct names"),
    (["--gold", "300"], "--gold: expected at most --test-tasks"),
    (["--gold", "4", "--methods", "NP"], "--gold: needs at least one LDVI method"),
    (["--out", "{tmp}"], "is a folder"),
    (["--out", "{tmp}/missing/r.json"], "--out: the folder"),
    (["--plot", "{tmp}/fig.xyz"], "--plot: expected a file name ending in one of"),
    (["--plot", "{tmp}/missing/fig.png"], "--plot: the folder"),
    (["--load-dir", "{tmp}"], "--load-dir: no saved model for"),
    (["--speed", "--gold", "2"], "--speed: cannot be combined"),
    (["--iters", "0"], "--iters: expected an integer >= 1"),
    (["--chunk", "0"], "--chunk: expected an integer >= 1"),
    (["--test-points", "0"], "--test-points: expected an integer >= 1"),
    (["--meta-tasks", "0"], "--meta-tasks: expected an integer >= 1"),
    (["--out", "{tmp}/report.md"], "--out: expected a file name ending in .json"),
    (["--out", ""], "--out: expected a file name ending in .json"),
    (["--out", "{tmp}/.json"], "--out: expected a file name ending in .json"),
    (["--save-dir", "{tmp}/fam_cli.py"], "--save-dir: expected a folder"),
    (["--save-dir", "/proc/no_such_place"], "--save-dir: cannot create the folder"),
    (["--noise", "1e-30"], "noise: 1e-30 is too small for the importance-sampled exact posterior"),
    (["--task", "tasks:quadratic"], "is shadowed by the benchmark's own"),
    (["--task", "fam_cli:numpy_global"], "two draws from equal generator seeds gave different tasks"),
    (["--task", "fam_cli:python_global"], "draw every random number from gen, e.g. torch.rand(T, 1, 1, generator=gen"),
    (["--task", "fam_cli:torch_global"], "(torch's global generator, e.g. a torch.rand without generator=gen"),
    (["--noise", "1e30"], "--noise: expected a noise std at most 1000 times the scale of the tasks' functions"),
    (["--noise", "5000", "--task", "linesine"], "--noise: expected a noise std at most 1000 times"),
    (["--out", "{tmp}/name"], "did you mean '{tmp}/name.json'?"),
    (["--quick", "--out", "{here}/results/sinusoid.json"], "--out: a --quick smoke run never writes into the "
                                                          "project's results folder"),
    (["--quick", "--plot", "{here}/results/smoke.png"], "--plot: a --quick smoke run never writes into"),
    (["--quick", "--save-dir", "{here}/results/models"], "--save-dir: a --quick smoke run never writes into"),
    (["--baseline", "{tmp}"], "--baseline: only with --speed"),
    (["--speed", "--baseline", "{tmp}"], "--baseline: expected a checkout of this project"),
]


@pytest.mark.parametrize("argv, message", CLI, ids=[" ".join(a) for a, _ in CLI])
def test_bad_command_lines_are_refused_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "fam_cli.py").write_text(FAMILIES)
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("fam_cli", None)
    here = os.path.dirname(os.path.abspath(__file__))
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{here}", here) for a in argv]
    before = sorted(os.listdir(os.path.join(here, "results")))
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv + ["--out", str(tmp_path / "r.json")] if "--out" not in argv else argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    message = message.replace("{tmp}", str(tmp_path))
    assert "usage:" in err and message in err, err
    assert sorted(os.listdir(os.path.join(here, "results"))) == before


def test_a_bad_command_line_exits_2_from_the_shell():
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, os.path.join(here, "bench.py"), "--contexts", "99", "--quick"],
                          capture_output=True, text=True, cwd=here, timeout=120)
    assert proc.returncode == 2 and "--contexts" in proc.stderr and "Traceback" not in proc.stderr


# -----------------------------------------------------------------------------
# the API: (what, a call, the exception, fragment of the message)

def nan_y_batch():
    b = data()
    y = b.y.clone()
    y[0, 2, 0] = float("nan")
    return lm.Batch(b.x, y, b.mask)  # built by hand, not through make_batch


def float_mask_batch():
    b = data()
    return lm.Batch(b.x, b.y, b.mask.float())


def huge_inner_lr():
    model = bl.MAML(bl.MAMLConfig(inner_lr=1e30, **SMALL), gen(0))
    b = data()
    return model.predictive(lm.first_n(b, 4), b.x, 1, gen(0))


def diverging_bmaml():
    model = bl.BMAML(bl.BMAMLConfig(particles=3, svgd_lr=1e12, iters=5, **SMALL), gen(0))
    return model.fit(data(8, 8), gen(0))


def saved_maml(tmp_path):
    path = str(tmp_path / "maml.pt")
    bl.MAML(bl.MAMLConfig(**SMALL), gen(0)).save(path)
    return path


API = [
    ("LDVIConfig K=2.5", lambda t: lm.LDVIConfig(K=2.5), ValueError, "K: expected an integer >= 0, got 2.5"),
    ("LDVIConfig K='5'", lambda t: lm.LDVIConfig(K="5"), ValueError, "K: expected an integer >= 0, got '5'"),
    ("LDVIConfig hidden=40", lambda t: lm.LDVIConfig(hidden=40), ValueError, "hidden: expected a tuple of integer"),
    ("LDVIConfig dx=1.5", lambda t: lm.LDVIConfig(dx=1.5), ValueError, "dx: expected an integer >= 1"),
    ("LDVIConfig sigma_y=0", lambda t: lm.LDVIConfig(sigma_y=0), ValueError, "sigma_y: expected a finite number > 0"),
    ("MAMLConfig first_order=1", lambda t: bl.MAMLConfig(first_order=1), ValueError, "first_order: expected True or"),
    ("NPConfig z_dim=0", lambda t: bl.NPConfig(z_dim=0), ValueError, "z_dim: expected an integer >= 1"),
    ("model of the wrong config", lambda t: lm.LDVIMeta(bl.MAMLConfig(), gen(0)), ValueError, "cfg: expected an LDVIConfig"),
    ("Batch with NaN y", lambda t: models()["LDVI"].predictive(nan_y_batch(), data().x, 4, gen(0)), ValueError,
     "context.y: NaN or inf in real (unmasked) points"),
    ("Batch with a float mask", lambda t: models()["NP"].predictive(float_mask_batch(), data().x, 4, gen(0)),
     ValueError, "context.mask: expected a bool tensor"),
    ("not a Batch", lambda t: models()["MAML"].predictive(data().x, data().x, 1, gen(0)), ValueError,
     "context: expected a Batch(x, y, mask)"),
    ("first_n n=2.5", lambda t: lm.first_n(data(), 2.5), ValueError, "n: expected an integer"),
    ("first_n n=True", lambda t: lm.first_n(data(), True), ValueError, "n: expected an integer"),
    ("first_n float tensor", lambda t: lm.first_n(data(), torch.tensor([1.0, 2.0, 3.0])), ValueError, "n: expected"),
    ("first_n too many", lambda t: lm.first_n(data(), 7), ValueError, "n: expected context sizes in [0, points"),
    ("x_target with NaN", lambda t: models()["LDVI"].predictive(data(), torch.full((3, 5, 1), float("nan")), 4,
                                                                 gen(0)), ValueError, "x_target: NaN or inf"),
    ("x_target wrong width", lambda t: models()["NP"].predictive(data(), torch.zeros(3, 5, 2), 4, gen(0)),
     ValueError, "x_target: expected a tensor of shape [T, M, dx] = [3, M, 1]"),
    ("x_target wrong T", lambda t: models()["BMAML"].predictive(data(), torch.zeros(2, 5, 1), 4, gen(0)),
     ValueError, "x_target: expected a tensor of shape"),
    ("x_target float64", lambda t: models()["MAML"].predictive(data(), torch.zeros(3, 5, 1, dtype=torch.float64),
                                                                1, gen(0)), ValueError, "x_target: expected torch.float32"),
    ("NP S=0", lambda t: models()["NP"].predictive(data(), data().x, 0, gen(0)), ValueError,
     "S: expected an integer >= 1"),
    ("MAML S=1.5", lambda t: models()["MAML"].predictive(data(), data().x, 1.5, gen(0)), ValueError, "S: expected"),
    ("sample P=0", lambda t: models()["LDVI"].sample(data(), 0, gen(0)), ValueError, "P: expected an integer >= 1"),
    ("log_predictive NaN target", lambda t: lm.log_predictive(torch.zeros(3, 2, 6, 1), 0.25, nan_y_batch()),
     ValueError, "target.y: NaN or inf"),
    ("log_predictive bad mean", lambda t: lm.log_predictive(torch.zeros(3, 6, 1), 0.25, data()), ValueError,
     "mean: expected a tensor of shape [T, S, M, dy]"),
    ("log_predictive std=0", lambda t: lm.log_predictive(torch.zeros(3, 2, 6, 1), 0.0, data()), ValueError,
     "std: expected finite predictive standard deviations > 0"),
    ("mse NaN mean", lambda t: lm.mse(torch.full((3, 2, 6, 1), float("nan")), data()), ValueError,
     "mean: NaN or inf in the predictive means"),
    ("fit on 0 tasks", lambda t: models()["LDVI"].fit(lm.make_batch(torch.zeros(0, 4, 1), torch.zeros(0, 4, 1)),
                                                      gen(0)), ValueError, "data: expected at least one task"),
    ("fit on empty tasks", lambda t: models()["NP"].fit(lm.make_batch(torch.zeros(2, 4, 1), torch.zeros(2, 4, 1),
                                                                      torch.zeros(2, 4, dtype=torch.bool)), gen(0)),
     ValueError, "data: expected at least one task and >= 1 real points per task"),
    ("fit on wrong dy", lambda t: models()["MAML"].fit(lm.make_batch(torch.zeros(2, 4, 1), torch.zeros(2, 4, 2)),
                                                       gen(0)), ValueError, "data: expected dx = 1, dy = 1"),
    ("MAML huge inner_lr", lambda t: huge_inner_lr(), FloatingPointError, "MAML predictive: NaN or inf"),
    ("BMAML diverging step", lambda t: diverging_bmaml(), FloatingPointError, "bmaml: loss is nan at iteration 0"),
    ("family not callable", lambda t: tasks.make_tasks(3, 2, 4, 0.25, gen(0)), ValueError,
     "expected a function family(T, gen)"),
    ("load another method", lambda t: bl.NeuralProcess.load(saved_maml(t)), ValueError,
     "path: expected a saved NeuralProcess"),
    ("randn on the wrong device", lambda t: lm.randn((2, 3), gen(0), device="cuda"), ValueError,
     "gen: expected a generator on cuda"),
    ("make_tasks negative noise", lambda t: tasks.make_tasks(tasks.sinusoid, 2, 4, -0.25, gen(0)), ValueError,
     "noise: expected a finite number > 0, got -0.25"),
    ("bayes_optimal n beyond the points", lambda t: tasks.bayes_optimal(data(2, 4), [0, 6], 0.25, "sinusoid", 4,
                                                                         gen(0)), ValueError, "contexts: expected sizes"),
    ("bayes_optimal noise=0", lambda t: tasks.bayes_optimal(data(2, 4), [0, 1], 0, "sinusoid", 4, gen(0)),
     ValueError, "noise: expected the observation noise std, a finite number > 0, got 0"),
    ("log_evidence noise=nan", lambda t: tasks.log_evidence(data().x, data().y, data().mask, float("nan"),
                                                            "sinusoid", gen(0)), ValueError, "noise: expected"),
    ("log_predictive with a tensor target", lambda t: lm.log_predictive(torch.zeros(3, 2, 6, 1), 0.25, data().y),
     ValueError, "target: expected a Batch(x, y, mask) (see make_batch), got Tensor"),
    ("mse with a tensor target", lambda t: lm.mse(torch.zeros(3, 2, 6, 1), data().x), ValueError,
     "target: expected a Batch(x, y, mask)"),
    ("first_n with a tensor batch", lambda t: lm.first_n(data().x, 2), ValueError, "batch: expected a Batch"),
    ("first_n n of the wrong length", lambda t: lm.first_n(data(), torch.tensor([1, 2])), ValueError,
     "n: expected an integer or an integer tensor of shape [T] = [3], got 'a tensor of shape [2]'"),
    ("context on the meta device", lambda t: models()["NP"].predictive(
        lm.Batch(*(v.to("meta") for v in data())), data().x, 4, gen(0)), ValueError,
     "context.x: expected a tensor on one of cpu, cuda, got one on meta"),
    ("make_batch on the meta device", lambda t: lm.make_batch(torch.zeros(2, 3, 1, device="meta"),
                                                              torch.zeros(2, 3, 1, device="meta")), ValueError,
     "(other devices are not supported)"),
    ("a removed option", lambda t: lm.LDVIConfig(latent_hidden=4), TypeError, "unexpected keyword argument"),
    ("gen=0", lambda t: lm.LDVIMeta(lm.LDVIConfig(**SMALL), 0), ValueError, "gen: expected a torch.Generator"),
    ("gen=None to sample", lambda t: models()["LDVI"].sample(data(), 4, None), ValueError,
     "gen: expected a torch.Generator"),
    ("gen=None to the NP", lambda t: models()["NP"].predictive(data(), data().x, 4, None), ValueError,
     "gen: expected a torch.Generator"),
    ("data that require grad", lambda t: models()["LDVI"].fit(lm.Batch(data().x.requires_grad_(), data().y,
                                                                       data().mask), gen(0)), ValueError,
     "data: x or y requires grad"),
    ("truncated model file", lambda t: lm.LDVIMeta.load(truncated_model(t)), ValueError,
     "is not a readable model file"),
    ("model of an older format", lambda t: lm.LDVIMeta.load(old_format_model(t)), ValueError,
     "was saved by another version of this code"),
]


def truncated_model(tmp):
    path = str(tmp / "m.pt")
    models()["LDVI"].save(path)
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[:len(blob) // 2])
    return path


def old_format_model(tmp):
    """A file as an earlier version wrote it: one of today's weights missing."""
    path = str(tmp / "m.pt")
    model = models()["LDVI"]
    model.save(path)
    obj = torch.load(path, weights_only=True)
    del obj["state_dict"]["prior_mean"]
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("what, call, exc, message", API, ids=[a[0] for a in API])
def test_bad_api_input_is_refused_with_a_clear_message(what, call, exc, message, tmp_path):
    with pytest.raises(exc) as info:
        call(tmp_path)
    assert message in str(info.value), str(info.value)


def test_the_table_covers_at_least_forty_distinct_bad_inputs():
    assert len(CLI) + len(API) >= 40


# -----------------------------------------------------------------------------
# save and load

@pytest.mark.parametrize("name", ["LDVI", "MAML", "BMAML", "NP"])
def test_save_load_round_trip_gives_bitwise_identical_predictions(name, tmp_path):
    model = models()[name]
    b = data(4, 8)
    model.cfg.iters = 3
    model.fit(b, gen(1))  # trained weights, not the initial ones
    path = str(tmp_path / "m.pt")
    model.save(path)
    raw = torch.load(path, weights_only=True)
    assert raw["method"] == type(model).__name__ and raw["config"] == dataclasses.asdict(model.cfg)
    loaded = type(model).load(path)
    assert loaded.cfg == model.cfg
    ctx = lm.first_n(b, 3)
    a, sa = model.predictive(ctx, b.x, 5, gen(2))
    c, sc = loaded.predictive(ctx, b.x, 5, gen(2))
    assert torch.equal(a, c) and torch.equal(torch.as_tensor(sa), torch.as_tensor(sc))
    assert os.listdir(tmp_path) == ["m.pt"]  # no temporary file left behind


def test_a_config_holding_numpy_integers_saves_and_loads(tmp_path):
    import numpy as np
    model = lm.LDVIMeta(lm.LDVIConfig(K=np.int64(2), latent=np.int64(2), hidden=(np.int64(8), 8), log_every=0), gen(0))
    path = str(tmp_path / "m.pt")
    model.save(path, train_s=np.float32(1.5))
    loaded = lm.LDVIMeta.load(path)
    assert loaded.cfg.K == 2 and type(loaded.cfg.K) is int and loaded.saved_meta == {"train_s": 1.5}
