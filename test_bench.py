"""Smoke tests of bench.py: the quick run end to end, its JSON, the oracle row, the CLI's
errors and a user-defined task family."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import bench

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ["oracle", "LDVI-underdamped", "LDVI-overdamped", "LDVI K=0 (amortized MFVI)", "NP", "MAML", "BMAML"]


def parse_table(text):
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--task", "sinusoid", "--quick",
                           "--quiet", "--out", str(out)], capture_output=True, text=True, cwd=HERE, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_quick_run_has_every_method_and_finite_numbers(quick_run):
    stdout, _ = quick_run
    rows = parse_table(stdout)
    assert list(rows) == METHODS
    for name, cells in rows.items():
        numbers = [float(v) for cell in cells for v in re.findall(r"-?\d+\.?\d*(?:e[-+]?\d+)?", cell)]
        assert numbers and all(math.isfinite(v) for v in numbers), (name, cells)


def test_json_matches_the_table(quick_run):
    stdout, result = quick_run
    rows = parse_table(stdout)
    contexts = result["config"]["contexts"]
    assert set(result["results"]) == set(METHODS)
    for name, r in result["results"].items():
        for i, n in enumerate(contexts):
            s = r["scores"][str(n)]
            assert rows[name][i].startswith(f"{s['lmlhd']['mean']:.2f}")
            assert rows[name][len(contexts) + i] == f"{s['mse']['mean']:.3f}"


def test_oracle_row_equals_its_closed_form(quick_run):
    _, result = quick_run
    cfg = result["config"]
    g = torch.Generator().manual_seed(1000 * cfg["seeds"][0] + 2)
    test, clean, _ = bench.make_tasks(bench.sinusoid, cfg["test_tasks"], cfg["test_points"], cfg["noise"], g)
    per_task = (-0.5 * ((test.y - clean) / cfg["noise"]) ** 2 - math.log(cfg["noise"]) - 0.5 * math.log(2 * math.pi))
    expected = per_task.sum((1, 2)).median().item()
    for n in cfg["contexts"]:
        assert result["results"]["oracle"]["scores"][str(n)]["lmlhd"]["mean"] == pytest.approx(expected, abs=1e-4)
        assert result["results"]["oracle"]["scores"][str(n)]["mse"]["mean"] == pytest.approx(
            ((test.y - clean) ** 2).mean((1, 2)).median().item(), abs=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--contexts", "0,100"], "--contexts"), (["--contexts", "a,b"], "--contexts"), (["--samples", "0"], "--samples"),
    (["--task", "nonexistent"], "--task"), (["--noise", "-1"], "--noise"), (["--K", "-2"], "--K"),
    (["--device", "tpu"], "--device"), (["--bogus"], "unrecognized"),
])
def test_bad_arguments_give_a_usage_error(argv, message):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), *argv], capture_output=True, text=True,
                          cwd=HERE, timeout=120)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and message in proc.stderr


def test_user_defined_task_family_runs_through_the_same_path(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_tasks.py").write_text(
        "import torch\n"
        "def quadratic(T, gen):\n"
        "    a = torch.rand(T, 1, 1, generator=gen, device=gen.device) - 0.5\n"
        "    return lambda x: a * x ** 2\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "quad.json"
    bench.main(["--task", "my_tasks:quadratic", "--quick", "--quiet", "--iters", "3", "--contexts", "0,4",
                "--out", str(out)])
    rows = parse_table(capsys.readouterr().out)
    assert list(rows) == METHODS
    assert json.loads(out.read_text())["config"]["task"] == "my_tasks:quadratic"


def test_linesine_family_mixes_lines_and_sines():
    g = torch.Generator().manual_seed(0)
    f = bench.linesine(400, g)
    x = torch.linspace(-5, 5, 50).view(1, 50, 1).expand(400, 50, 1)
    y = f(x)
    second_diff = (y[:, 2:] - 2 * y[:, 1:-1] + y[:, :-2]).abs().amax((1, 2))
    share_lines = (second_diff < 1e-4).float().mean().item()
    assert 0.4 < share_lines < 0.6
