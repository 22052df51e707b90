"""Tests of bench.py: the quick run end to end, its JSON and reference rows, results that
survive a failing method or Ctrl-C, --resume, --save-dir / --load-dir, and user task families."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace

import pytest
import torch

import baselines as bl
import bench

HERE = os.path.dirname(os.path.abspath(__file__))
GAUSSIAN = ("ALPaCA", "DeepKernelGP")
ROWS = ["oracle", "Bayes-optimal", "Bayes, S draws",
        *(row for m in bench.DEFAULT_METHODS for row in ([m, m + bench.EXACT] if m in GAUSSIAN else [m]))]


def parse_table(text, title="LMLHD"):
    """Rows of the first Markdown table after the line starting with `title`."""
    rows, on = {}, False
    for line in text.splitlines():
        if line.startswith(title):
            on = True
        elif on and line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif on and rows and not line.startswith("|"):
            break
    return rows


def files_in(folder):
    return sorted(os.listdir(folder))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The README's smoke run, as a user types it: no --out."""
    tmp = tmp_path_factory.mktemp("quick")
    committed = os.path.join(HERE, "results", "sinusoid.json")
    before = open(committed, "rb").read() if os.path.exists(committed) else None
    proc = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--task", "sinusoid", "--quick", "--quiet"],
                          capture_output=True, text=True, cwd=HERE, timeout=600, env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = open(committed, "rb").read() if os.path.exists(committed) else None
    folder, = tmp.glob("ldvi_meta_quick_*")  # a fresh folder of its own
    result = json.loads((folder / "sinusoid.json").read_text())
    result["report"] = (folder / "sinusoid.md").read_text().strip()
    assert "smoke run" in proc.stderr and f"wrote {folder / 'sinusoid.json'}" in proc.stderr
    return proc.stdout, result, before == after


def test_quick_run_never_touches_results_and_says_it_is_quick(quick_run):
    stdout, result, untouched = quick_run
    assert untouched and result["config"]["quick"] is True and result["complete"] is True
    assert result["report"] == stdout.strip()  # the printed tables, also written to sinusoid.md


def test_quick_run_has_every_row_and_finite_numbers(quick_run):
    stdout, _, _ = quick_run
    rows = parse_table(stdout)
    assert list(rows) == ROWS
    for name, cells in rows.items():
        numbers = [float(v) for cell in cells for v in re.findall(r"-?\d+\.?\d*(?:e[-+]?\d+)?", cell)]
        assert numbers and all(math.isfinite(v) for v in numbers), (name, cells)
    assert list(parse_table(stdout, "Distance to the Bayes-optimal ceiling")) == ROWS


def test_json_matches_the_table(quick_run):
    stdout, result, _ = quick_run
    rows, mse_rows = parse_table(stdout), parse_table(stdout, "MSE")
    contexts = result["config"]["contexts"]
    assert set(result["results"]) == set(ROWS)
    for name, r in result["results"].items():
        for i, n in enumerate(contexts):
            s = r["scores"][str(n)]
            assert rows[name][i].startswith(f"{s['lmlhd']['mean']:.2f}")
            assert mse_rows[name][i] == f"{s['mse']['mean']:.3f}"
    ceiling = result["results"]["Bayes-optimal"]["scores"]
    for n in contexts:  # the oracle knows the task, the ceiling only its distribution
        assert result["results"]["oracle"]["scores"][str(n)]["lmlhd"]["mean"] > ceiling[str(n)]["lmlhd"]["mean"]


def test_oracle_row_equals_its_closed_form(quick_run):
    _, result, _ = quick_run
    cfg = result["config"]
    g = torch.Generator().manual_seed(1000 * cfg["seeds"][0] + 2)
    test, clean, _ = bench.make_tasks(bench.sinusoid, cfg["test_tasks"], cfg["test_points"], cfg["noise"], g)
    per_task = (-0.5 * ((test.y - clean) / cfg["noise"]) ** 2 - math.log(cfg["noise"]) - 0.5 * math.log(2 * math.pi))
    expected = per_task.sum((1, 2)).median().item()
    for n in cfg["contexts"]:
        assert result["results"]["oracle"]["scores"][str(n)]["lmlhd"]["mean"] == pytest.approx(expected, abs=1e-4)
        assert result["results"]["oracle"]["scores"][str(n)]["mse"]["mean"] == pytest.approx(
            ((test.y - clean) ** 2).mean((1, 2)).median().item(), abs=1e-6)


def diverging_maml(monkeypatch):
    """MAML with an absurd inner learning rate: its adapted weights overflow to inf."""
    original = bench.method_configs

    def configs(args):
        out = original(args)
        cls, cfg = out["MAML"]
        cfg.inner_lr = 1e30
        return out
    monkeypatch.setattr(bench, "method_configs", configs)


def test_a_failing_method_becomes_a_row_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    diverging_maml(monkeypatch)
    out = tmp_path / "r.json"
    code = bench.main(["--quick", "--quiet", "--methods", "MAML,NP", "--contexts", "0,4", "--out", str(out)])
    assert code == 1
    result = json.loads(out.read_text())
    assert result["results"]["MAML"]["status"] == "failed" and "maml" in result["results"]["MAML"]["error"]
    assert result["results"]["NP"]["status"] == "ok" and result["results"]["oracle"]["status"] == "ok"
    rows = parse_table(capsys.readouterr().out)
    assert rows["MAML"][0].startswith("FAILED") and not rows["NP"][0].startswith("FAILED")
    assert files_in(tmp_path) == ["r.json", "r.md"]  # the partial file is gone once the run has finished


def test_resume_reuses_finished_methods_and_save_load_skip_training(tmp_path, monkeypatch, capsys):
    out, models = tmp_path / "r.json", tmp_path / "models"
    fits = []
    fit = bl.NeuralProcess.fit
    monkeypatch.setattr(bl.NeuralProcess, "fit", lambda self, *a: fits.append("NP") or fit(self, *a))

    def interrupt(self, *a):  # MAML is reached after NP has finished: Ctrl-C there
        raise KeyboardInterrupt
    monkeypatch.setattr(bl.MAML, "fit", interrupt)
    argv = ["--quick", "--quiet", "--methods", "NP,MAML", "--contexts", "0,4", "--out", str(out),
            "--save-dir", str(models)]
    assert bench.main(argv) == 130 and not out.exists()
    partial = json.loads((tmp_path / "r.partial.json").read_text())
    assert partial["complete"] is False and partial["per_seed"][0]["NP"]["status"] == "ok"
    monkeypatch.undo()
    monkeypatch.setattr(bl.NeuralProcess, "fit", lambda self, *a: fits.append("NP again") or fit(self, *a))
    assert bench.main(argv + ["--resume"]) == 0
    assert fits == ["NP"]  # NP was not trained again
    result = json.loads(out.read_text())
    assert result["per_seed"][0]["NP"] == partial["per_seed"][0]["NP"]
    assert result["config"]["wall_s"] > partial["wall_s_so_far"] > 0  # wall time counts the interrupted run too
    assert sorted(files_in(models)) == ["sinusoid_seed0_MAML.pt", "sinusoid_seed0_NP.pt"]
    # --load-dir evaluates the saved models without training and gives the same numbers
    out2 = tmp_path / "loaded.json"
    assert bench.main(argv[:-4] + ["--out", str(out2), "--load-dir", str(models)]) == 0
    loaded = json.loads(out2.read_text())
    for name in ("NP", "MAML"):
        assert loaded["results"][name]["scores"] == result["results"][name]["scores"]
        # train s of a loaded model is the training time recorded in its file, not the loading time
        assert loaded["per_seed"][0][name]["train_s"] == result["per_seed"][0][name]["train_s"] > 0
    assert fits == ["NP"]
    capsys.readouterr()


def test_ctrl_c_leaves_the_results_file_unchanged_and_no_temporary_file(tmp_path):
    out = tmp_path / "sinusoid.json"
    out.write_text('{"committed": true}')
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "bench.py"), "--quick", "--out", str(out),
                             "--plot", str(tmp_path / "fig.png"), "--methods", "LDVI-overdamped,NP,MAML"],
                            cwd=HERE, stderr=subprocess.PIPE, text=True,  # a shell's background job ignores
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # SIGINT: undo that
    for line in proc.stderr:  # wait until the second method is training, then press Ctrl-C
        if "training NP" in line:
            proc.send_signal(signal.SIGINT)
            break
    proc.stderr.read()
    assert proc.wait(timeout=120) == 130
    assert out.read_text() == '{"committed": true}'
    assert files_in(tmp_path) == ["sinusoid.json", "sinusoid.partial.json"]  # no temporary file, no half plot
    assert json.loads((tmp_path / "sinusoid.partial.json").read_text())["per_seed"][0]["LDVI-overdamped"]["status"] == "ok"


def test_user_defined_task_family_runs_through_the_same_path(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_tasks.py").write_text(
        "import torch\n"
        "def quadratic(T, gen):\n"
        "    a = torch.rand(T, 1, 1, generator=gen, device=gen.device) - 0.5\n"
        "    return lambda x: a * x ** 2\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "quad.json"
    assert bench.main(["--task", "my_tasks:quadratic", "--quick", "--quiet", "--iters", "3", "--contexts", "0,4",
                       "--methods", "LDVI-overdamped,MAML,ALPaCA,DeepKernelGP", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert list(parse_table(text)) == ["oracle", "LDVI-overdamped", "MAML", "ALPaCA", "ALPaCA, exact", "DeepKernelGP",
                                       "DeepKernelGP, exact"]
    assert "no Bayes-optimal rows" in text
    assert json.loads(out.read_text())["config"]["task"] == "my_tasks:quadratic"


def test_plot_format_follows_the_extension(tmp_path, capsys):
    pdf = tmp_path / "fig.pdf"
    assert bench.main(["--quick", "--quiet", "--methods", "MAML", "--contexts", "0,1", "--out",
                       str(tmp_path / "r.json"), "--plot", str(pdf)]) == 0
    assert pdf.read_bytes()[:5] == b"%PDF-" and files_in(tmp_path) == ["fig.pdf", "r.json", "r.md"]
    capsys.readouterr()


@pytest.mark.parametrize("family", ["sinusoid", "linesine"])
@pytest.mark.parametrize("noise", [0.05, 0.1, 0.25, 0.5])
def test_every_method_trains_at_every_reasonable_noise_level(family, noise, tmp_path):
    """The benchmark's own configurations (smaller batches to keep the suite fast), a few dozen
    iterations on data with this noise: finite losses and finite predictions for every method."""
    args = bench.parse_args(["--task", family, "--noise", str(noise), "--iters", "30", "--out",
                             str(tmp_path / "unused.json")])
    g = torch.Generator().manual_seed(0)
    train, _, _ = bench.make_tasks(args.family, 32, 16, noise, g)
    test, _, _ = bench.make_tasks(args.family, 4, 32, noise, g)
    for name, (cls, cfg) in bench.method_configs(args).items():
        cfg.log_every, cfg.tasks_per_batch = 0, 4
        if hasattr(cfg, "particles") and name.startswith("LDVI"):
            cfg.particles = 4
        model = cls(cfg, torch.Generator().manual_seed(1))
        losses = model.fit(train, g)
        assert all(math.isfinite(v) for v in losses), (name, noise)
        mean, std = model.predictive(bench.lm.first_n(test, 8), test.x, 16, g)
        assert torch.isfinite(mean).all() and torch.isfinite(torch.as_tensor(std)).all(), (name, noise)


def test_gold_rows_report_the_gaps_and_hmc_diagnostics(tmp_path, capsys):
    out = tmp_path / "g.json"
    assert bench.main(["--quick", "--quiet", "--gold", "3", "--methods", "LDVI-overdamped,MAML", "--contexts", "0,2,4",
                       "--out", str(out), "--plot", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0 and (tmp_path / "g_prior.png").exists()  # HMC rows in the figure
    result = json.loads(out.read_text())
    gold = result["results"]["gold: LDVI-overdamped"]
    assert set(gold["inference_gap"]) == {"2", "4"} and "gold: MAML" not in result["results"]  # n >= 1, LDVI only
    for key in ("inference_gap", "model_gap", "ours_on_gold_tasks", "rhat_median", "accept_median"):
        assert all(math.isfinite(v["mean"]) for v in gold[key].values()), key
    stats = result["per_seed"][0]["gold: LDVI-overdamped"]["convergence"]["2"]
    assert len(stats["accept"]) == len(stats["rhat_loglik"]) == 3 and all(0 <= a <= 1 for a in stats["accept"])
    assert "inference gap: ours - gold" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# tails and calibration: each against a case with a known answer

def test_mixture_cdf_matches_a_loop_over_components():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 5, 7, 1, generator=g, dtype=torch.float64)          # [T, S, M, dy]
    std = 0.2 + torch.rand(2, 5, 7, 1, generator=g, dtype=torch.float64)
    y = torch.randn(2, 7, 1, generator=g, dtype=torch.float64)
    ref = torch.zeros(2, 7, 1, dtype=torch.float64)
    for t in range(2):
        for s in range(5):
            for m in range(7):
                z = (y[t, m, 0] - mean[t, s, m, 0]) / std[t, s, m, 0]
                ref[t, m, 0] += 0.5 * (1 + math.erf(z.item() / math.sqrt(2))) / 5
    assert torch.allclose(bench.mixture_cdf(mean, std, y), ref, atol=1e-12)


def test_coverage_counts_at_known_quantiles():
    """One N(0, 1) component; targets just inside / outside the central 50% and 90% intervals."""
    q50, q90 = 0.6744897501960817, 1.6448536269514722
    y = torch.tensor([[[0.0], [q50 - 1e-6], [-(q50 + 1e-6)], [q90 - 1e-6], [q90 + 1e-6]]], dtype=torch.float64)
    target = bench.lm.make_batch(torch.zeros_like(y), y)
    counts = bench.coverage_counts(torch.zeros(1, 1, 5, 1, dtype=torch.float64), 1.0, target, (0.5, 0.9, 0.99))
    assert counts.tolist() == [[2, 4, 5]]  # 0 and q50-; then q50+ (outside 50%) and q90-; all inside 99%
    masked = bench.lm.make_batch(torch.zeros_like(y), y, torch.tensor([[True, True, False, False, False]]))
    assert bench.coverage_counts(torch.zeros(1, 1, 5, 1, dtype=torch.float64), 1.0, masked, (0.5,)).tolist() == [[2]]


def test_calibration_error_of_a_calibrated_and_of_a_too_narrow_predictive():
    g = torch.Generator().manual_seed(1)
    T, M = 64, 2000
    mean = torch.stack([torch.full((T, M, 1), -1.0), torch.full((T, M, 1), 2.0)], 1).double()  # [T, 2, M, 1]
    pick = torch.randint(0, 2, (T, M, 1), generator=g)
    y = torch.where(pick == 0, -1.0, 2.0).double() + 0.5 * torch.randn(T, M, 1, generator=g, dtype=torch.float64)
    target = bench.lm.make_batch(torch.zeros_like(y), y)
    points = target.counts
    calibrated = bench.calibration_error(bench.coverage_counts(mean, 0.5, target), points)
    assert calibrated < 0.005  # Monte Carlo error of a coverage over 128k points is about 0.0014
    # one N(0, 1) predictive for N(0, 2^2) data: coverage at level a is 2 Phi(z_a / 2) - 1, z_a = Phi^-1((1 + a) / 2)
    y = 2.0 * torch.randn(T, M, 1, generator=g, dtype=torch.float64)
    target = bench.lm.make_batch(torch.zeros_like(y), y)
    narrow = bench.calibration_error(bench.coverage_counts(torch.zeros(T, 1, M, 1, dtype=torch.float64), 1.0,
                                                           target), points)
    a = torch.tensor(bench.LEVELS, dtype=torch.float64)
    exact = ((2 * torch.special.ndtr(torch.special.ndtri((1 + a) / 2) / 2) - 1) - a).abs().mean().item()
    assert exact > 0.2 and abs(narrow - exact) < 0.005


def test_summaries_tail_fraction_and_low_quantile():
    lp = torch.tensor([-5.0, -30.0, -10.0, -100.0, -2.0, -8.0, -9.0, -7.0, -6.0, -4.0])
    bayes = torch.full((10,), -6.0)                      # more than 20 below: -30 and -100
    test = bench.lm.make_batch(torch.zeros(10, 3, 1), torch.zeros(10, 3, 1))
    per_task = {1: dict(lmlhd=lp, mse=torch.ones(10), cover=torch.zeros(10, len(bench.LEVELS)))}
    out = bench.summaries(per_task, test, {1: bayes})[1]
    assert out["tail"] == pytest.approx(0.2)
    assert out["lmlhd_q10"] == pytest.approx(-100.0 + 0.9 * 70.0)  # linear interpolation at 0.9 of sorted[0:2]
    assert out["calibration"] == pytest.approx(sum(bench.LEVELS) / len(bench.LEVELS))  # nothing covered
    assert out["lmlhd"] == pytest.approx(lp.median().item())
    assert "tail" not in bench.summaries(per_task, test)[1]  # no Bayes-optimal score: no tail


def test_evaluation_does_not_depend_on_the_number_of_workers():
    g = torch.Generator().manual_seed(0)
    test, _, _ = bench.make_tasks(bench.sinusoid, 5, 12, 0.25, g)
    model = bench.lm.LDVIMeta(bench.lm.LDVIConfig(hidden=(8, 8), enc_hidden=16, enc_dim=8, K=2, latent=2,
                                                  log_every=0), torch.Generator().manual_seed(1))
    runs = [bench.evaluate(model, test, [0, 3], 40, torch.Generator().manual_seed(2), 2, progress=False,
                           workers=w)[0] for w in (1, 2, 3)]
    for other in runs[1:]:
        assert all(torch.equal(runs[0][n][k], other[n][k]) for n in (0, 3) for k in ("lmlhd", "mse", "cover"))
    assert runs[0][3]["cover"].shape == (5, len(bench.LEVELS))


# -----------------------------------------------------------------------------
# saved models, resumed runs, --speed and --quick: refused or reported, never silent

def test_load_dir_refuses_models_trained_with_other_flags(tmp_path, capsys):
    out = str(tmp_path / "r.json")
    args = bench.parse_args(["--quick", "--methods", "LDVI-K0", "--out", out])
    cls, cfg = bench.method_configs(args)["LDVI-K0"]
    cls(cfg, torch.Generator().manual_seed(0)).save(str(tmp_path / "sinusoid_seed0_LDVI-K0.pt"))
    ok = bench.parse_args(["--quick", "--methods", "LDVI-K0", "--load-dir", str(tmp_path), "--out", out])
    assert ok.load_dir == str(tmp_path)
    for extra, message in ((["--latent", "4"], "trained with latent = 8, but --latent gives latent = 4"),
                           (["--noise", "0.5"], "trained with sigma_y = 0.25, but --noise gives sigma_y = 0.5"),
                           (["--seeds", "2"], "no saved model for LDVI-K0 (seed 1)")):
        with pytest.raises(SystemExit):
            bench.parse_args(["--quick", "--methods", "LDVI-K0", "--load-dir", str(tmp_path), "--out", out] + extra)
        assert message in capsys.readouterr().err


def test_resume_from_a_truncated_results_file_says_so(tmp_path, capsys):
    (tmp_path / "r.partial.json").write_text('{"config": {"task": "sinu')
    code = bench.main(["--quick", "--quiet", "--methods", "NP", "--resume", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and "is not a readable results file" in err and "r.partial.json" in err
    assert not (tmp_path / "r.json").exists()


def test_speed_runs_with_several_tasks_per_chunk(tmp_path):
    out = tmp_path / "s.json"
    assert bench.main(["--speed", "--quick", "--methods", "LDVI-K0,NP", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["setting"]["chunk"] > 1 and result["setting"]["task"] == "sinusoid"
    for name in ("LDVI-K0", "NP"):
        assert result["methods"][name]["eval_ms_per_task"] > 0 and result["methods"][name]["train_ms_per_iter"] > 0
    assert result["methods"]["LDVI-K0"]["train_matmul_gflop_per_iter"] > 0


def test_an_old_checkout_gets_its_own_common_module(tmp_path):
    # --speed --baseline loads another checkout's ldvi_meta.py; if that one imports common (the code from
    # before ldvi_meta.py stood alone again), it must get that checkout's common.py and leave no module
    # named common behind in this process
    had = sys.modules.get("common")
    old = tmp_path / "old"
    old.mkdir()
    (old / "common.py").write_text("WHOSE = 'the old checkout'\n")
    (old / "ldvi_meta.py").write_text("from common import WHOSE\n")
    assert bench.load_checkout(str(old)).WHOSE == "the old checkout"
    assert sys.modules.get("common") is had
    (tmp_path / "older").mkdir()  # a checkout without common.py: a module of its own
    (tmp_path / "older" / "ldvi_meta.py").write_text("KERNELS = ('overdamped',)\n")
    assert bench.load_checkout(str(tmp_path / "older")).KERNELS == ("overdamped",)


def test_quick_caps_every_size_and_says_what_it_changed(tmp_path):
    args = bench.parse_args(["--quick", "--iters", "500", "--samples", "4", "--out", str(tmp_path / "r.json")])
    assert set(args.iters.values()) == {15} and args.samples == 4
    assert "--iters 500 -> 15" in args.quick_changes and not any("--samples" in c for c in args.quick_changes)


def test_headline_figure_from_results(quick_run, tmp_path, monkeypatch):
    _, result, _ = quick_run
    (tmp_path / "sinusoid.json").write_text(json.dumps(result))
    bench.plot_headline(str(tmp_path / "h.png"), {"sinusoid": result})
    assert (tmp_path / "h.png").stat().st_size > 0
    assert bench.headline(str(tmp_path / "h2.png"), str(tmp_path)) == 0 and (tmp_path / "h2.png").exists()
    assert bench.headline(str(tmp_path / "h3.png"), str(tmp_path / "nothing")) == 2


# -----------------------------------------------------------------------------
# the floor rows, the Gaussian models' exact rows, --resume with new methods

def test_the_s_draw_floor_row_has_failures_and_calibration_and_the_gaussian_models_exact_rows(quick_run):
    stdout, result, _ = quick_run
    contexts = result["config"]["contexts"]
    floor = result["results"]["Bayes, S draws"]["scores"]
    for n in contexts:
        assert 0 <= floor[str(n)]["tail"]["mean"] <= 1 and 0 <= floor[str(n)]["calibration"]["mean"] < 0.5
    fails = parse_table(stdout, "Failures")
    calib = parse_table(stdout, "Calibration error")
    assert "–" not in fails["Bayes, S draws"] and "–" not in calib["Bayes, S draws"]
    for name in GAUSSIAN:  # the S = infinity row of each Gaussian model is scored like every other row
        exact = result["results"][name + bench.EXACT]
        assert exact["status"] == "ok" and all(math.isfinite(exact["scores"][str(n)]["lmlhd"]["mean"]) for n in contexts)
        assert name + bench.EXACT in fails and "–" not in fails[name + bench.EXACT]


def test_the_floor_rows_are_recomputed_for_an_older_results_file():
    old = {"Bayes-optimal": {"per_task": {0: [1.0]}}, "Bayes, S draws": {"scores": {0: {"lmlhd": 1.0}}}}
    assert not bench.bayes_rows_complete(old) and not bench.bayes_rows_complete({})
    old["Bayes, S draws"]["scores"][0]["calibration"] = 0.1
    assert bench.bayes_rows_complete(old)


def test_resume_trains_only_the_methods_a_finished_run_lacks_or_ran_otherwise(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    base = ["--quick", "--quiet", "--contexts", "0,2", "--out", str(out)]
    assert bench.main(base + ["--methods", "NP,MAML"]) == 0
    first = json.loads(out.read_text())
    del first["config"]["iters"]["gauss"]  # as a file of a version that had no Gaussian models wrote it
    out.write_text(json.dumps(first))
    fits = []
    for cls in (bl.NeuralProcess, bl.MAML, bl.GaussianModel):
        fit = cls.fit
        monkeypatch.setattr(cls, "fit", lambda self, *a, fit=fit, cls=cls: fits.append(cls.__name__) or fit(self, *a))
    assert bench.main(base + ["--methods", "NP,MAML,ALPaCA", "--resume"]) == 0
    assert fits == ["GaussianModel"]  # only the method the finished run lacked
    second = json.loads(out.read_text())
    for name in ("NP", "MAML", "Bayes-optimal"):
        assert second["per_seed"][0][name] == first["per_seed"][0][name]
    assert {"ALPaCA", "ALPaCA, exact"} <= set(second["results"])
    original = bench.method_configs

    def other_maml(args):  # MAML's settings changed since: it is retrained, the others are not
        configs = original(args)
        configs["MAML"][1].inner_lr = 0.02
        return configs
    monkeypatch.setattr(bench, "method_configs", other_maml)
    assert bench.main(base + ["--methods", "NP,MAML,ALPaCA", "--resume"]) == 0
    assert fits == ["GaussianModel", "MAML"]


def test_the_benchmark_s_own_family_by_its_full_name_is_the_same_run(tmp_path):
    args = bench.parse_args(["--task", "tasks:linesine", "--quick", "--out", str(tmp_path / "r.json")])
    assert args.task == "linesine" and args.family is bench.TASKS["linesine"]  # so the Bayes rows are computed


def test_a_quick_run_checks_the_noise_by_the_same_rule_as_a_full_run(tmp_path):
    out = ["--out", str(tmp_path / "r.json")]
    assert bench.parse_args(["--quick"] + out).bayes_draws == bench.parse_args(out).bayes_draws


def test_a_refused_quick_run_leaves_no_temporary_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--plot", str(tmp_path / "fig.xyz")])
    assert "--plot" in capsys.readouterr().err and files_in(tmp_path) == []
    args = bench.parse_args(["--quick"])  # an accepted one gets its fresh folder
    assert os.path.dirname(args.out).startswith(str(tmp_path / "ldvi_meta_quick_"))


def test_a_quick_run_never_overwrites_complete_results(tmp_path, capsys):
    full, smoke = tmp_path / "full.json", tmp_path / "smoke.json"
    full.write_text(json.dumps({"complete": True, "config": {"quick": False}}))
    smoke.write_text(json.dumps({"complete": True, "config": {"quick": True}}))
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--out", str(full)])
    assert "holds the complete results of a full run" in capsys.readouterr().err
    assert bench.parse_args(["--quick", "--out", str(smoke)]).out == str(smoke)  # a smoke run's file may go
    assert bench.parse_args(["--out", str(full)]).out == str(full)  # and a full run overwrites a full run


def test_load_dir_holding_another_method_s_model_says_which_it_holds(tmp_path, capsys):
    out = str(tmp_path / "r.json")
    args = bench.parse_args(["--quick", "--methods", "NP", "--out", out])
    for name, file in (("NP", "LDVI-overdamped"), ("LDVI-underdamped", "LDVI-K0")):
        cls, cfg = bench.method_configs(args)[name]
        cls(cfg, torch.Generator().manual_seed(0)).save(str(tmp_path / f"sinusoid_seed0_{file}.pt"))
    for method, message in (("LDVI-overdamped", "should hold the LDVI-overdamped model but holds the NP model"),
                            ("LDVI-K0", "should hold the LDVI-K0 model but holds the LDVI-underdamped model")):
        with pytest.raises(SystemExit):
            bench.parse_args(["--quick", "--methods", method, "--load-dir", str(tmp_path), "--out", out])
        err = capsys.readouterr().err
        assert message in err and "hidden" not in err, err


# ours' design chosen on held-out meta-training tasks (select_design), once per seed

def test_quick_run_chooses_one_design_for_all_of_ours_rows(quick_run):
    """The three rows of ours share one choice, made once, and each trained the chosen design."""
    _, result, _ = quick_run
    rows = result["per_seed"][0]
    ours = [name for name in ("LDVI-underdamped", "LDVI-overdamped", "LDVI-K0")]
    choices = [rows[name]["selection"] for name in ours]
    assert all(c == choices[0] for c in choices)
    chosen = choices[0]
    assert set(chosen["scores"]) == {"no scale, 15 iters", "scale 0.5, 15 iters", "no scale, 30 iters",
                                     "scale 0.5, 30 iters"}
    assert chosen["chosen"] == max(chosen["scores"], key=chosen["scores"].get)
    for name in ours:
        cfg = rows[name]["config"]
        assert {f: cfg[f] for f in bench.SELECTED_FIELDS} == chosen["fields"]
    assert rows["LDVI-underdamped"]["config"]["K"] == 2 and rows["LDVI-K0"]["config"]["K"] == 0  # K kept
    assert f"seed 0: {chosen['chosen']}" in result["report"]


def test_no_select_trains_ours_as_configured_and_the_ablation_is_never_selected(tmp_path):
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--quiet", "--no-select", "--methods", "LDVI-K0", "--contexts", "0,2",
                       "--out", str(out)]) == 0
    row = json.loads(out.read_text())["per_seed"][0]["LDVI-K0"]
    assert "selection" not in row and row["config"]["input_scale"] == 0 and row["config"]["iters"] == 15
    out2 = tmp_path / "r2.json"
    assert bench.main(["--quick", "--quiet", "--methods", "LDVI-fixed-hidden", "--contexts", "0,2",
                       "--out", str(out2)]) == 0
    row = json.loads(out2.read_text())["per_seed"][0]["LDVI-fixed-hidden"]
    assert row["status"] == "ok" and "selection" not in row
    assert row["config"]["hidden_latent"] == 0 and row["config"]["drift_grad"] is True


def test_load_dir_accepts_a_chosen_design_and_refuses_another(tmp_path, capsys):
    out = str(tmp_path / "r.json")
    args = bench.parse_args(["--quick", "--methods", "LDVI-K0", "--out", out])
    cls, cfg = bench.method_configs(args)["LDVI-K0"]
    path = str(tmp_path / "sinusoid_seed0_LDVI-K0.pt")
    load = ["--quick", "--methods", "LDVI-K0", "--load-dir", str(tmp_path), "--out", out]
    cls(replace(cfg, input_scale=0.5, learn_input_scale=False, iters=30), torch.Generator().manual_seed(0)).save(path)
    assert bench.parse_args(load).load_dir == str(tmp_path)  # one of the four designs the choice makes
    with pytest.raises(SystemExit):  # with --no-select the flags give the plain config
        bench.parse_args(load + ["--no-select"])
    assert "input_scale = 0.5" in capsys.readouterr().err
    cls(replace(cfg, input_scale=0.3, learn_input_scale=False), torch.Generator().manual_seed(0)).save(path)
    with pytest.raises(SystemExit):  # not a design the choice makes
        bench.parse_args(load)
    assert "input_scale = 0.3" in capsys.readouterr().err


def test_a_row_of_ours_has_the_same_numbers_alone_as_beside_the_others(quick_run, tmp_path):
    """A row of ours run alone (with its own held-out choice) gives exactly the numbers it has in the
    full run: its generators are its own, and the held-out choice's candidates train on one intra-op
    thread each whatever else runs."""
    _, result, _ = quick_run
    out = tmp_path / "r.json"
    assert bench.main(["--task", "sinusoid", "--quick", "--quiet", "--methods", "LDVI-K0", "--out", str(out)]) == 0
    alone, full = json.loads(out.read_text())["per_seed"][0]["LDVI-K0"], result["per_seed"][0]["LDVI-K0"]
    assert alone["selection"]["scores"] == full["selection"]["scores"]
    assert alone["scores"] == full["scores"]


def test_a_row_of_ours_that_diverges_beside_the_others_fails_alone(tmp_path, monkeypatch, capsys):
    original = bench.method_configs

    def configs(args):  # the K = 0 row with an absurd learning rate, the other as configured
        out = original(args)
        out["LDVI-K0"][1].lr = 1e30
        return out
    monkeypatch.setattr(bench, "method_configs", configs)
    out = tmp_path / "r.json"
    code = bench.main(["--quick", "--quiet", "--no-select", "--methods", "LDVI-overdamped,LDVI-K0", "--contexts", "0,2",
                       "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert code == 1 and rows["LDVI-K0"]["status"] == "failed" and "K0" in rows["LDVI-K0"]["error"]
    assert rows["LDVI-overdamped"]["status"] == "ok"
    assert "LDVI-K0 FAILED" in capsys.readouterr().err
