"""Tests for tasks.py: the Bayes-optimal evidence against brute-force quadrature on a fine 2-d
grid and against plain prior Monte Carlo, the exact-posterior draws, and the families."""
import math

import pytest
import torch

import tasks

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def grid_log_evidence(x, y, noise, family, n_grid=1000):
    """log p(y) by the midpoint rule on the prior's own coordinates: (A, phi) for the
    sinusoid (uniform there), (a, b) for lines. x, y: [N] float64."""
    mid = lambda lo, hi: lo + (hi - lo) * (torch.arange(n_grid, dtype=F64) + 0.5) / n_grid  # noqa: E731
    parts = []
    for weight, fam in tasks.MIXTURES[family]:
        if fam is tasks.SINE:
            A, phi = mid(*tasks.AMP), mid(*tasks.PHASE)
            w = torch.stack([A[:, None] * phi.cos()[None], A[:, None] * phi.sin()[None]], -1).view(-1, 2)
        else:
            a = mid(-tasks.SLOPE, tasks.SLOPE)
            w = torch.stack(torch.meshgrid(a, a, indexing="ij"), -1).view(-1, 2)
        Phi = fam.features(x.unsqueeze(-1))                               # [N, 2]
        rss = y @ y - 2 * w @ (Phi.T @ y) + ((w @ (Phi.T @ Phi)) * w).sum(-1)   # |y - Phi w|^2 for every w
        ll = -0.5 * rss / noise ** 2 - len(y) * (math.log(noise) + 0.5 * math.log(2 * math.pi))
        parts.append(math.log(weight) + torch.logsumexp(ll, 0) - math.log(ll.numel()))
    return torch.logsumexp(torch.stack(parts), 0).item()


@pytest.mark.parametrize("family", ["sinusoid", "linesine"])
def test_log_evidence_matches_grid_quadrature(family):
    g = gen(1)
    test, _, _ = tasks.make_tasks(tasks.TASKS[family], 4, 40, 0.25, g)
    for t in range(4):
        for n in (1, 2, 5, 16, 40):
            mask = torch.zeros(1, 40, dtype=torch.bool)
            mask[0, :n] = True
            ours = tasks.log_evidence(test.x[t:t + 1], test.y[t:t + 1], mask, 0.25, family, gen(10 + n)).item()
            ref = grid_log_evidence(test.x[t, :n, 0].double(), test.y[t, :n, 0].double(), 0.25, family)
            assert ours == pytest.approx(ref, abs=0.03), (t, n, ours, ref)


@pytest.mark.parametrize("family", ["sinusoid", "linesine"])
def test_log_evidence_matches_prior_monte_carlo_for_few_points(family):
    """n = 0 context: the ceiling is log p(y_targets); for 3 targets plain prior Monte Carlo
    with 400k draws is accurate to a few hundredths, and independent of the proposal used in tasks.py."""
    g = gen(2)
    test, _, _ = tasks.make_tasks(tasks.TASKS[family], 3, 3, 0.25, g)
    ours = tasks.log_evidence(test.x, test.y, test.mask, 0.25, family, gen(3))
    x, y = test.x.double().squeeze(-1), test.y.double().squeeze(-1)    # [T, 3]
    M = 400_000
    logs = []
    for weight, fam in tasks.MIXTURES[family]:
        w = fam.sample(M, gen(4), F64)                                  # [M, 2]
        f = torch.einsum("tni,mi->tmn", fam.features(x.unsqueeze(-1)), w)  # [T, M, 3]
        ll = (-0.5 * ((y.unsqueeze(1) - f) / 0.25) ** 2 - math.log(0.25) - 0.5 * math.log(2 * math.pi)).sum(-1)
        logs.append(math.log(weight) + torch.logsumexp(ll, -1) - math.log(M))
    ref = torch.logsumexp(torch.stack(logs), 0)
    assert torch.allclose(ours, ref, atol=0.05), (ours, ref)


def test_empty_context_has_zero_log_evidence_and_posterior_draws_follow_the_prior():
    g = gen(5)
    test, _, _ = tasks.make_tasks(tasks.sinusoid, 2, 8, 0.25, g)
    empty = torch.zeros(2, 8, dtype=torch.bool)
    assert torch.allclose(tasks.log_evidence(test.x, test.y, empty, 0.25, "sinusoid", g), torch.zeros(2, dtype=F64))
    # at x = pi/2, f = A sin(pi/2 + phi) = A cos(phi): under the prior its mean is 0 and E[f^2] = E[A^2] / 2
    x = torch.full((2, 1, 1), math.pi / 2)
    _, mean, f = tasks.posterior(test.x, test.y, empty, x, 0.25, "sinusoid", 20000, g)
    ea2 = (5 ** 3 - 0.1 ** 3) / (3 * 4.9)
    assert abs(f.mean()) < 0.05 and abs(mean).max() < 0.05
    assert (f ** 2).mean().item() == pytest.approx(ea2 / 2, rel=0.03)


def test_posterior_draws_concentrate_on_the_true_function_with_many_points():
    g = gen(6)
    test, clean, _ = tasks.make_tasks(tasks.linesine, 6, 64, 0.25, g)
    _, mean, f = tasks.posterior(test.x, test.y, test.mask, test.x, 0.25, "linesine", 256, g)
    assert ((mean - clean.squeeze(-1).double()) ** 2).mean(-1).max() < 0.01
    assert ((f - clean.squeeze(-1).double().unsqueeze(1)) ** 2).mean((-1, -2)).max() < 0.02


@pytest.mark.parametrize("noise", [0.25, 0.1])
def test_exact_bayes_row_is_the_estimators_limit_and_matches_quadrature(noise):
    """The exact row is log E_{p(w|C)} p(y_all | w): by quadrature it is the evidence of the
    targets plus a second copy of the context minus the context's evidence, and the S-draw
    estimator, whose S = infinity limit it is, comes within Monte Carlo error of it at large S."""
    g = gen(3)
    test, _, _ = tasks.make_tasks(tasks.sinusoid, 3, 24, noise, g)
    rows = tasks.bayes_optimal(test, [2, 8, 24], noise, "sinusoid", 1 << 14, g, draws=1 << 14)
    for t in range(3):
        x, y = test.x[t, :, 0].double(), test.y[t, :, 0].double()
        for n in (2, 8, 24):
            ref = grid_log_evidence(torch.cat([x, x[:n]]), torch.cat([y, y[:n]]), noise, "sinusoid") \
                - grid_log_evidence(x[:n], y[:n], noise, "sinusoid")
            assert rows[n]["exact"][t].item() == pytest.approx(ref, abs=0.05), (t, n)
            assert rows[n]["draws"][t].item() == pytest.approx(ref, abs=0.15), (t, n)
    # scoring only the unseen points would be a different number: 0 when the context is everything
    assert rows[24]["exact"].abs().min() > 1.0


def test_bayes_rows_are_ordered_sensibly():
    """Exact ceiling >= the S-draw estimate on average (finite S is biased low), both below
    the oracle at n = 0, and more context helps the ceiling on average."""
    g = gen(7)
    test, clean, _ = tasks.make_tasks(tasks.sinusoid, 32, 64, 0.25, g)
    rows = tasks.bayes_optimal(test, [0, 2, 16], 0.25, "sinusoid", 64, g, draws=1 << 13)
    oracle = (-0.5 * ((test.y - clean) / 0.25) ** 2 - math.log(0.25) - 0.5 * math.log(2 * math.pi)).sum((1, 2))
    assert rows[0]["exact"].mean() < oracle.double().mean()
    assert rows[0]["exact"].mean() < rows[2]["exact"].mean() < rows[16]["exact"].mean()
    for n in (0, 2, 16):
        assert rows[n]["draws"].mean() <= rows[n]["exact"].mean() + 0.5
    with pytest.raises(ValueError, match="family"):
        tasks.bayes_optimal(test, [0], 0.25, "quadratic", 8, g)


def test_linesine_family_mixes_lines_and_sines():
    g = torch.Generator().manual_seed(0)
    f = tasks.linesine(400, g)
    x = torch.linspace(-5, 5, 50).view(1, 50, 1).expand(400, 50, 1)
    y = f(x)
    second_diff = (y[:, 2:] - 2 * y[:, 1:-1] + y[:, :-2]).abs().amax((1, 2))
    share_lines = (second_diff < 1e-4).float().mean().item()
    assert 0.4 < share_lines < 0.6


# -----------------------------------------------------------------------------
# freqsine: a uniform mixture over a frequency grid, checked against 3-d quadrature

def grid3_log_evidence(x, y, noise, n_amp=100, n_freq=800, n_phase=200):
    """log p(y) of freqsine by the midpoint rule on the prior's own coordinates (A, w, phi), where
    it is uniform: an independent check of the frequency grid and its 2-d importance sampling."""
    mid = lambda lo, hi, k: lo + (hi - lo) * (torch.arange(k, dtype=F64) + 0.5) / k  # noqa: E731
    amp, freq, phase = mid(*tasks.AMP, n_amp), mid(*tasks.FREQ, n_freq), mid(*tasks.PHASE, n_phase)
    parts = []
    for w in freq.split(50):
        f = amp[None, :, None, None] * torch.sin(w[:, None, None, None] * x + phase[None, None, :, None])  # [w, A, phi, N]
        ll = (-0.5 * ((y - f) / noise) ** 2).sum(-1) - len(y) * (math.log(noise) + 0.5 * math.log(2 * math.pi))
        parts.append(torch.logsumexp(ll.flatten(), 0))
    return (torch.logsumexp(torch.stack(parts), 0) - math.log(n_amp * n_freq * n_phase)).item()


def test_freqsine_log_evidence_matches_3d_quadrature():
    test, _, _ = tasks.make_tasks(tasks.freqsine, 2, 8, 0.25, gen(1))
    for t in range(2):
        for n in (1, 3, 8):
            mask = torch.zeros(1, 8, dtype=torch.bool)
            mask[0, :n] = True
            ours = tasks.log_evidence(test.x[t:t + 1], test.y[t:t + 1], mask, 0.25, "freqsine", gen(5)).item()
            ref = grid3_log_evidence(test.x[t, :n, 0].double(), test.y[t, :n, 0].double(), 0.25)
            assert ours == pytest.approx(ref, abs=0.02), (t, n, ours, ref)


def test_freqsine_leaves_out_only_frequencies_its_bound_certifies():
    """With many points most grid frequencies are left out; the kept ones carry the evidence: the
    same number as keeping every frequency, to Monte Carlo error."""
    test, _, _ = tasks.make_tasks(tasks.freqsine, 1, 48, 0.25, gen(2))
    x, y, m = test.x[0].double(), test.y[0, :, 0].double(), test.mask[0]
    grid = tasks.freq_grid(400)
    omega, _, _ = tasks._freq_draws(x, y, m, 0.25, gen(3), 1 << 14, grid)
    assert len(omega) < 100
    full = tasks._weighted_draws(tasks.SINE, tasks.sine_at(grid).features(x), y.expand(400, -1), m.expand(400, -1),
                                 0.25, 1 << 10, gen(4))[1]
    every = torch.logsumexp(full.flatten(), 0) - math.log(1 << 10) - math.log(400)
    kept = tasks._freq_log_evidence(x[None], y[None, :, None], m[None], 0.25, gen(3), 1 << 14, grid)[0]
    assert kept.item() == pytest.approx(every.item(), abs=0.05)


def test_freqsine_draws_and_posterior():
    g = gen(6)
    f = tasks.freqsine(2000, g)
    x = torch.linspace(-5, 5, 201).view(1, 201, 1).expand(2000, 201, 1)
    y = f(x)
    amp = y.abs().amax((1, 2))
    assert 0.1 <= amp.min() and amp.max() <= 5.0
    zero_crossings = ((y[:, 1:] * y[:, :-1]) < 0).sum((1, 2)).float()  # about 10 w / pi over [-5, 5]
    assert 10 * 0.5 / math.pi - 1.5 <= zero_crossings.min() and zero_crossings.max() <= 10 * 2 / math.pi + 1.5
    test, clean, _ = tasks.make_tasks(tasks.freqsine, 3, 64, 0.25, gen(7))
    _, mean, draws = tasks.posterior(test.x, test.y, test.mask, test.x, 0.25, "freqsine", 256, gen(8), draws=1 << 13)
    assert ((mean - clean.squeeze(-1).double()) ** 2).mean(-1).max() < 0.01
    assert ((draws - clean.squeeze(-1).double().unsqueeze(1)) ** 2).mean((-1, -2)).max() < 0.02


def _small(family="freqsine"):
    test, _, _ = tasks.make_tasks(tasks.TASKS[family], 2, 6, 0.25, gen(11))
    return test


BAD_TASK_CALLS = [
    (lambda t: tasks.freqsine(0, gen()), "T: expected an integer >= 1, got 0"),
    (lambda t: tasks.sinusoid(2.5, gen()), "T: expected an integer >= 1, got 2.5"),
    (lambda t: tasks.linesine(-1, gen()), "T: expected an integer >= 1, got -1"),
    (lambda t: tasks.freqsine(2, None), "gen: expected a torch.Generator"),
    (lambda t: tasks.make_tasks(tasks.freqsine, 2, 0, 0.25, gen()), "N: expected an integer >= 1, got 0"),
    (lambda t: tasks.make_tasks(tasks.freqsine, True, 4, 0.25, gen()), "T: expected an integer >= 1, got True"),
    (lambda t: tasks.log_evidence(t.x, t.y, t.mask, 0.25, "freqsine", gen(), draws=0),
     "draws: expected an integer >= 1, got 0"),
    (lambda t: tasks.log_evidence(t.x, t.y * float("nan"), t.mask, 0.25, "freqsine", gen()),
     r"context.y: NaN or inf in real \(unmasked\) points"),
    (lambda t: tasks.log_evidence(t.x[..., 0], t.y, t.mask, 0.25, "sinusoid", gen()),
     r"context.x: expected a tensor of shape \[T, N, dx\], got \(2, 6\)"),
    (lambda t: tasks.log_evidence(t.x.expand(-1, -1, 2), t.y, t.mask, 0.25, "sinusoid", gen()),
     r"context: expected x and y of shape \[T, N, 1\]"),
    (lambda t: tasks.log_evidence(t.x, t.y, t.mask.double(), 0.25, "linesine", gen()), "context.mask: expected a bool"),
    (lambda t: tasks.posterior(t.x, t.y, t.mask, t.x, 0.25, "freqsine", 0, gen()), "S: expected an integer >= 1, got 0"),
    (lambda t: tasks.posterior(t.x, t.y, t.mask, t.x[:1], 0.25, "sinusoid", 4, gen()),
     r"x_target: expected a tensor of shape \[T, M, 1\] = \[2, M, 1\].*got \(1, 6, 1\)"),
    (lambda t: tasks.posterior(t.x, t.y, t.mask, t.x * float("inf"), 0.25, "sinusoid", 4, gen()),
     "x_target: NaN or inf in the inputs"),
    (lambda t: tasks.bayes_optimal(t, [], 0.25, "freqsine", 8, gen()), "contexts: expected a non-empty list"),
    (lambda t: tasks.bayes_optimal(t, 2, 0.25, "freqsine", 8, gen()), "contexts: expected a non-empty list"),
    (lambda t: tasks.bayes_optimal(t, [1.5], 0.25, "freqsine", 8, gen()), "contexts: expected a non-empty list"),
    (lambda t: tasks.bayes_optimal(t, [1], 0.25, "freqsine", 8, gen(), chunk=0), "chunk: expected an integer >= 1"),
    (lambda t: tasks.bayes_optimal(t.x, [1], 0.25, "freqsine", 8, gen()), r"test: expected a Batch\(x, y, mask\)"),
    (lambda t: tasks.bayes_optimal(t, [1], 0.25, "freqsine", 0, gen()), "S: expected an integer >= 1, got 0"),
    (lambda t: tasks.freq_grid(0), "size: expected an integer >= 1, got 0"),
    (lambda t: tasks.freq_grid(2.5), "size: expected an integer >= 1, got 2.5"),
]


@pytest.mark.parametrize("call, message", BAD_TASK_CALLS)
def test_bad_inputs_to_the_families_and_the_exact_rows_name_the_argument(call, message):
    """Each refused before any integration, with the argument's name (these were silent or deep errors:
    T = 0 tasks, draws = 0, x without its last dimension all returned numbers)."""
    with pytest.raises(ValueError, match=message):
        call(_small())
