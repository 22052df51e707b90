"""
The benchmark's task families and their Bayes-optimal predictive.

A task family is a function family(T, gen) -> f that draws T tasks and returns f, which
maps x [T, M, 1] to the noise-free y [T, M, 1]. Two are built in, after the protocol of
Volpp et al. [1] (x ~ U[-5, 5], Gaussian observation noise):

  sinusoid  y = A sin(x + phi),  A ~ U[0.1, 5], phi ~ U[0, pi]
  linesine  with probability 1/2 the sinusoid, otherwise y = a x + b, a, b ~ U[-3, 3]

Both are linear in two parameters w once the family is known:
  A sin(x + phi) = w1 sin x + w2 cos x  with  w = A (cos phi, sin phi),
  a x + b        = w1 x + w2,
so the exact evidence p(y_1..n) of a task is a 2-d integral. The Bayes-optimal predictive
p(y | C) = E_{p(w|C)} p(y | w) under the TRUE task distribution, scored on all targets as
the benchmark scores every method (the targets include the context), is

  log E_{p(w|C)} p(y_all | w) = log p(y_all, y_C') - log p(y_C)   (y_C': the context again)

because p(y_all | w) p(y_C | w) is the likelihood of the targets plus a second copy of the
context. This is the exact (S = infinity) value of the benchmark's LMLHD estimator fed
exact posterior draws; log p(y_all) - log p(y_C) would score only the unseen points.
The prior density of w is 1 / (4.9 pi |w|) on 0.1 <= |w| <= 5, w2 >= 0 for the sinusoid
(polar coordinates: the Jacobian of (A, phi) -> w is A) and 1/36 on [-3, 3]^2 for lines.

The integral is computed by importance sampling with a defensive mixture proposal [2]:
half the draws from the prior, half from the Gaussian N(w_ls, sigma^2 (Phi^T Phi)^-1)
that the likelihood alone would give (all draws from the prior when n <= 1 or the design
is rank deficient). Weights are bounded by twice the likelihood's maximum, so the
estimate is stable at every n; it is checked against brute-force quadrature on a fine
2-d grid and against plain prior Monte Carlo in the tests. Resampling those weighted
draws (sampling-importance-resampling) gives exact-posterior draws, and feeding S of them
to the benchmark's LMLHD estimator shows what a perfect sampler scores at finite S.

References
  [1] M. Volpp, P. Dahlinger, P. Becker, C. Daniel, G. Neumann. Accurate Bayesian
      meta-learning by accurate task posterior inference. ICLR 2023.
  [2] T. Hesterberg. Weighted average importance sampling and defensive mixture
      distributions. Technometrics, 1995.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple

import torch

from ldvi_meta import Batch, _is_int, _require, check_batch, check_generator, make_batch

AMP, PHASE, SLOPE = (0.1, 5.0), (0.0, math.pi), 3.0   # sinusoid amplitude / phase ranges, line a, b ~ U[-3, 3]
FREQ = (0.5, 2.0)                                     # freqsine's frequency range
FREQ_GRID = 2000   # midpoints of the frequency grid of freqsine's exact predictive (doubling it moves < 0.01 nats)
FREQ_KEEP = 40.0   # grid frequencies whose best fit is this many nats below the best are left out of the integral
LOG_2PI = math.log(2 * math.pi)
MIN_ESS = 30.0  # fewer effective importance draws than this: the exact rows would be noise, so they fail


# -----------------------------------------------------------------------------
# the families: family(T, gen) -> f, f maps x [T, M, 1] to the noise-free y [T, M, 1]

def sinusoid(T: int, gen: torch.Generator):
    """y = A sin(x + phi), A ~ U[0.1, 5], phi ~ U[0, pi]."""
    _require_count(T, "T"), check_generator(gen)
    amp = AMP[0] + (AMP[1] - AMP[0]) * torch.rand(T, 1, 1, generator=gen, device=gen.device)
    phase = PHASE[0] + (PHASE[1] - PHASE[0]) * torch.rand(T, 1, 1, generator=gen, device=gen.device)
    return lambda x: amp * torch.sin(x + phase)


def linesine(T: int, gen: torch.Generator):
    """With probability 1/2 the sinusoid, else y = a x + b with a, b ~ U[-3, 3]."""
    sine = sinusoid(T, gen)
    is_line = torch.rand(T, 1, 1, generator=gen, device=gen.device) < 0.5
    a, b = (2 * SLOPE * torch.rand(2, T, 1, 1, generator=gen, device=gen.device) - SLOPE).unbind(0)
    return lambda x: torch.where(is_line, a * x + b, sine(x))


def freqsine(T: int, gen: torch.Generator):
    """y = A sin(w x + phi), A ~ U[0.1, 5], w ~ U[0.5, 2], phi ~ U[0, pi]: the features change per task."""
    _require_count(T, "T"), check_generator(gen)
    amp = AMP[0] + (AMP[1] - AMP[0]) * torch.rand(T, 1, 1, generator=gen, device=gen.device)
    freq = FREQ[0] + (FREQ[1] - FREQ[0]) * torch.rand(T, 1, 1, generator=gen, device=gen.device)
    phase = PHASE[0] + (PHASE[1] - PHASE[0]) * torch.rand(T, 1, 1, generator=gen, device=gen.device)
    return lambda x: amp * torch.sin(freq * x + phase)


TASKS = {"sinusoid": sinusoid, "linesine": linesine, "freqsine": freqsine}


def make_tasks(family, T: int, N: int, noise: float, gen: torch.Generator):
    """T tasks of N points, x ~ U[-5, 5]: (Batch with noisy y, noise-free f(x), f).

    Raises ValueError, naming the family, unless it is callable and its f returns a finite
    [T, N, 1] tensor of the inputs' dtype."""
    name = getattr(family, "__name__", repr(family))
    _require_count(T, "T"), _require_count(N, "N"), check_generator(gen)
    if not (isinstance(noise, (int, float)) and not isinstance(noise, bool) and math.isfinite(noise) and noise > 0):
        raise ValueError(f"noise: expected a finite number > 0, got {noise!r}")
    if not callable(family):
        raise ValueError(f"task family {name}: expected a function family(T, gen) -> f, got {type(family).__name__}")
    f = family(T, gen)
    if not callable(f):
        raise ValueError(f"task family {name}: expected family(T, gen) to return a function f(x), got {type(f).__name__}")
    x = 10 * torch.rand(T, N, 1, generator=gen, device=gen.device) - 5           # [T, N, 1]
    clean = f(x)                                                                  # [T, N, 1]
    if not isinstance(clean, torch.Tensor) or clean.shape != (T, N, 1) or clean.dtype != x.dtype:
        got = (tuple(clean.shape), clean.dtype) if isinstance(clean, torch.Tensor) else type(clean).__name__
        raise ValueError(f"task family {name}: f(x) must return a {x.dtype} tensor of shape {(T, N, 1)}, got {got}")
    if not torch.isfinite(clean).all():
        raise ValueError(f"task family {name}: f(x) returned NaN or inf")
    y = clean + noise * torch.randn(T, N, 1, generator=gen, device=gen.device)
    return make_batch(x, y, name="tasks"), clean, f


# -----------------------------------------------------------------------------
# the two linear-in-w families: features, prior draws and prior density

class Linear2(NamedTuple):
    features: Callable   # x [..., 1] -> Phi [..., 2]
    sample: Callable     # (M, gen, dtype) -> w [M, 2] from the prior
    log_prior: Callable  # w [..., 2] -> log p(w) [...] (-inf off the support)


def _sine_sample(M, gen, dtype):
    amp = AMP[0] + (AMP[1] - AMP[0]) * torch.rand(M, generator=gen, dtype=dtype)
    phase = PHASE[0] + (PHASE[1] - PHASE[0]) * torch.rand(M, generator=gen, dtype=dtype)
    return amp.unsqueeze(-1) * torch.stack([phase.cos(), phase.sin()], -1)          # [M, 2]


def _sine_log_prior(w):
    r = w.norm(dim=-1)                                                               # [...]
    inside = (r >= AMP[0]) & (r <= AMP[1]) & (w[..., 1] >= 0)
    return torch.where(inside, -math.log((AMP[1] - AMP[0]) * (PHASE[1] - PHASE[0])) - r.log(), -math.inf)


SINE = Linear2(lambda x: torch.cat([x.sin(), x.cos()], -1), _sine_sample, _sine_log_prior)
LINE = Linear2(lambda x: torch.cat([x, torch.ones_like(x)], -1),
               lambda M, gen, dtype: 2 * SLOPE * torch.rand(M, 2, generator=gen, dtype=dtype) - SLOPE,
               lambda w: torch.where((w.abs() <= SLOPE).all(-1), -2 * math.log(2 * SLOPE), -math.inf))
MIXTURES = {"sinusoid": [(1.0, SINE)], "linesine": [(0.5, SINE), (0.5, LINE)]}  # (prior weight, family)


# -----------------------------------------------------------------------------
# importance-sampled evidence and posterior draws

def _weighted_draws(fam: Linear2, Phi, y, mask, noise: float, M: int, gen: torch.Generator):
    """M draws w [T, M, 2] per task and their log weights [T, M] for p(w) p(y_C | w) / q(w),
    q the defensive mixture of the module docstring. Phi [T, N, 2], y [T, N], mask [T, N]."""
    T = Phi.shape[0]
    m = mask.to(Phi.dtype)
    G = torch.einsum("tni,tnj,tn->tij", Phi, Phi, m)                              # Phi^T Phi  [T, 2, 2]
    b = torch.einsum("tni,tn,tn->ti", Phi, y, m)                                  # Phi^T y    [T, 2]
    c, n = (y * y * m).sum(-1), m.sum(-1)                                         # y^T y, n   [T]
    # the likelihood-only Gaussian, where the design has full rank
    eig_min = torch.linalg.eigvalsh(G)[:, 0]                                      # [T]
    gauss = (n >= 2) & (eig_min > 1e-6 * G.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=1e-300))
    G_safe = torch.where(gauss.view(T, 1, 1), G, torch.eye(2, dtype=G.dtype))
    w_ls = torch.linalg.solve(G_safe, b.unsqueeze(-1)).squeeze(-1)                # [T, 2]
    L = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(G_safe))) * noise  # chol of Sigma
    half = M // 2
    z = torch.randn(T, M - half, 2, generator=gen, dtype=Phi.dtype)
    w_gauss = w_ls.unsqueeze(1) + z @ L.transpose(-1, -2)                         # [T, M - half, 2]
    w_prior = fam.sample(T * M, gen, Phi.dtype).view(T, M, 2)
    w = torch.where(gauss.view(T, 1, 1), torch.cat([w_prior[:, :half], w_gauss], 1), w_prior)  # [T, M, 2]
    # log q: the balance-heuristic mixture of the two proposals (the prior alone where not gauss)
    d = torch.linalg.solve_triangular(L.unsqueeze(1), (w - w_ls.unsqueeze(1)).unsqueeze(-1), upper=False)
    log_g = -0.5 * d.squeeze(-1).square().sum(-1) - L.diagonal(dim1=-2, dim2=-1).log().sum(-1, keepdim=True) - LOG_2PI
    log_p = fam.log_prior(w)                                                      # [T, M]
    frac = half / M
    log_q = torch.where(gauss.unsqueeze(-1), torch.logaddexp(math.log(frac) + log_p, math.log(1 - frac) + log_g),
                        log_p)
    rss = c.unsqueeze(-1) - 2 * (w * b.unsqueeze(1)).sum(-1) + torch.einsum("tmi,tij,tmj->tm", w, G, w)
    log_lik = -0.5 * n.unsqueeze(-1) * (2 * math.log(noise) + LOG_2PI) - rss.clamp(min=0) / (2 * noise ** 2)
    log_w = torch.where(torch.isfinite(log_p), log_p + log_lik - log_q, -math.inf)
    return w, log_w


def _pooled(x, y, mask, noise: float, family: str, gen: torch.Generator, draws: int):
    """Weighted draws of every family in the mixture: [(w [T, draws, 2], log weights [T, draws], family)]."""
    x, y = x.double(), y.double().squeeze(-1)                                     # [T, N, 1], [T, N]
    return [(*_weighted_draws(fam, fam.features(x), y, mask, noise, draws, gen), weight, fam)
            for weight, fam in MIXTURES[family]]


# -----------------------------------------------------------------------------
# freqsine: a uniform mixture over a fine frequency grid of the sinusoid's 2-d linear model

def sine_at(omega: torch.Tensor) -> Linear2:
    """The sinusoid's 2-d linear model at frequencies omega [K]: features [K, N, 2] of x [N, 1]."""
    return Linear2(lambda x: torch.stack([(omega[:, None] * x[..., 0]).sin(), (omega[:, None] * x[..., 0]).cos()], -1),
                   _sine_sample, _sine_log_prior)


def freq_grid(size: int | None = None) -> torch.Tensor:
    """The midpoints of `size` (default FREQ_GRID) equal cells of [0.5, 2] (float64): the midpoint rule
    for the w-integral."""
    size = FREQ_GRID if size is None else _require_count(size, "size")
    return FREQ[0] + (FREQ[1] - FREQ[0]) * (torch.arange(size, dtype=torch.float64) + 0.5) / size


def _freq_draws(x, y, mask, noise: float, gen: torch.Generator, draws: int, grid: torch.Tensor):
    """Weighted draws for ONE task of freqsine: (omega [K], w [K, d, 2], log weights [K, d]) with
    sum_k logsumexp_d(log w) - log d = log p(y_C) (the 1 / len(grid) of the mixture included).

    Given the frequency the model is linear, and the evidence at each grid frequency is the
    sinusoid's 2-d importance-sampled integral (_weighted_draws). Frequencies whose best fit
    (the unconstrained least-squares likelihood, an upper bound of their evidence) is more than
    FREQ_KEEP nats below the best one's are left out, and the bound certifies it: what they
    could add is checked to be below exp(-20) of the evidence, else more are kept. x [N, 1],
    y [N], mask [N] (float64); d = max(64, draws // K) draws per kept frequency."""
    n = int(mask.sum())
    m = mask.to(y.dtype)
    Phi = sine_at(grid).features(x)                                               # [G, N, 2]
    G = torch.einsum("kni,knj,n->kij", Phi, Phi, m)                               # [G, 2, 2]
    b = torch.einsum("kni,n,n->ki", Phi, y, m)                                    # [G, 2]
    rss_min = ((y * y * m).sum() - (b.unsqueeze(-2) @ torch.linalg.pinv(G, hermitian=True)
                                     @ b.unsqueeze(-1)).view(-1)).clamp(min=0)    # [G]
    bound = -0.5 * n * (2 * math.log(noise) + LOG_2PI) - rss_min / (2 * noise ** 2)  # max_w log p(y | w, omega)
    log_g = -math.log(len(grid))
    for keep_nats in (FREQ_KEEP, 2 * FREQ_KEEP, math.inf):
        keep = bound >= bound.max() - keep_nats                                   # [G]
        K = int(keep.sum())
        d = max(64, draws // K)
        Phi_k = Phi[keep]                                                         # [K, N, 2]
        w, log_w = _weighted_draws(SINE, Phi_k, y.expand(K, -1), mask.expand(K, -1), noise, d, gen)
        log_z = torch.logsumexp(log_w.flatten(), 0) - math.log(d) + log_g
        dropped = bound[~keep]
        if not len(dropped) or math.log(len(dropped)) + log_g + dropped.max() < log_z - 20:
            return grid[keep], w, log_w + log_g
    raise AssertionError("unreachable: keep_nats = inf keeps every frequency")


def _freq_log_evidence(x, y, mask, noise, gen, draws, grid):
    """log p(y_C) [T] of freqsine, task by task (float64)."""
    out = []
    for t in range(x.shape[0]):
        _, _, log_w = _freq_draws(x[t].double(), y[t].double().view(-1), mask[t], noise, gen, draws, grid)
        out.append(torch.logsumexp(log_w.flatten(), 0) - math.log(log_w.shape[1]))
    return torch.stack(out)


def _freq_posterior(x, y, mask, x_target, noise, S, gen, draws, grid):
    """posterior() for freqsine, task by task: (log p(y_C) [T], mean [T, M], f [T, S, M])."""
    log_z, means, fs = [], [], []
    for t in range(x.shape[0]):
        omega, w, log_w = _freq_draws(x[t].double(), y[t].double().view(-1), mask[t], noise, gen, draws, grid)
        K, d = log_w.shape
        log_z.append(torch.logsumexp(log_w.flatten(), 0) - math.log(d))
        prob = torch.softmax(log_w.flatten(), 0)                                  # [K d]
        _require_ess(prob, noise, K * d)
        feats = sine_at(omega).features(x_target[t].double())                     # [K, M, 2]
        means.append(torch.einsum("kmi,ki->m", feats, (prob.view(K, d, 1) * w).sum(1)))  # [M]
        idx = torch.multinomial(prob, S, replacement=True, generator=gen)         # [S]
        k, j = idx // d, idx % d                                                  # [S]
        fs.append((feats[k] * w[k, j].unsqueeze(1)).sum(-1))                      # [S, M]
    return torch.stack(log_z), torch.stack(means), torch.stack(fs)


def _require_ess(prob: torch.Tensor, noise: float, draws: int) -> None:
    ess = 1 / prob.flatten(1 if prob.dim() > 1 else 0).square().sum(-1)          # effective sample size
    if (~(ess >= MIN_ESS)).any():
        raise ValueError(f"noise: {noise} is too small for the importance-sampled exact posterior (effective "
                         f"sample size {ess.min().item():.1f} of {draws} draws, below {MIN_ESS}); use a larger "
                         "noise or more draws")


def log_evidence(x, y, mask, noise: float, family: str, gen: torch.Generator, draws: int = 1 << 16):
    """log p(y_C) per task [T] under the true task distribution `family` (float64)."""
    _require_family(family)
    _require_noise(noise)
    x, y, mask = _require_context(x, y, mask)
    draws, gen = _require_count(draws, "draws"), check_generator(gen)
    if family == "freqsine":
        return _freq_log_evidence(x, y, mask, noise, gen, draws, freq_grid())
    parts = [math.log(weight) + torch.logsumexp(log_w, -1) - math.log(draws)
             for _, log_w, weight, _ in _pooled(x, y, mask, noise, family, gen, draws)]
    return torch.logsumexp(torch.stack(parts), 0)


def posterior(x, y, mask, x_target, noise: float, family: str, S: int, gen: torch.Generator, draws: int = 1 << 16):
    """The exact posterior given the context (x, y, mask), at x_target [T, M, 1]: (log p(y_C) [T],
    the mean of the predictive [T, M] from the importance weights, and f [T, S, M] for S
    exact-posterior draws by sampling-importance-resampling). float64."""
    _require_family(family)
    _require_noise(noise)
    x, y, mask = _require_context(x, y, mask)
    _require_inputs(x_target, x.shape[0], "x_target")
    S, draws, gen = _require_count(S, "S"), _require_count(draws, "draws"), check_generator(gen)
    if family == "freqsine":
        return _freq_posterior(x, y, mask, x_target, noise, S, gen, draws, freq_grid())
    pooled = _pooled(x, y, mask, noise, family, gen, draws)
    log_w = torch.stack([math.log(weight) + lw for _, lw, weight, _ in pooled], 1)  # [T, F, draws]
    log_z = torch.logsumexp(log_w.flatten(1), -1) - math.log(draws)               # [T]
    prob = torch.softmax(log_w.flatten(1), -1).view_as(log_w)                     # [T, F, draws]
    _require_ess(prob, noise, draws)
    feats = [fam.features(x_target.double()) for *_, fam in pooled]               # [T, M, 2] each
    ws = [w for w, *_ in pooled]                                                  # [T, draws, 2] each
    # f is linear in w within a family: the mean is Phi_F times the weighted sum of w
    mean = sum(Phi @ (prob[:, i, :, None] * w).sum(1).unsqueeze(-1)
               for i, (Phi, w) in enumerate(zip(feats, ws))).squeeze(-1)          # [T, M]
    idx = torch.multinomial(prob.flatten(1), S, replacement=True, generator=gen)  # [T, S]
    fam_of, j = idx // draws, idx % draws                                         # [T, S]
    f = torch.stack([Phi @ w.gather(1, j.unsqueeze(-1).expand(-1, -1, 2)).transpose(-1, -2)
                     for Phi, w in zip(feats, ws)])                               # [F, T, M, S]
    f = f.gather(0, fam_of.view(1, -1, 1, S).expand(1, -1, x_target.shape[1], -1))[0]  # [T, M, S]
    return log_z, mean, f.transpose(-1, -2)                                       # [T], [T, M], [T, S, M]


def bayes_optimal(test, contexts, noise: float, family: str, S: int, gen: torch.Generator, chunk: int = 16,
                  draws: int = 1 << 16, cover: Callable | None = None):
    """The two Bayes rows for every context size n (the context is the first n points of
    each test task, the targets all of them): per-task LMLHD and MSE of the exact predictive
    (S = infinity) and of S exact-posterior draws fed to the benchmark's LMLHD estimator.
    Returns {n: dict(exact=[T], exact_mse=[T], draws=[T], draws_mse=[T])}, float64, and with
    cover(mean [t, S, M, 1], std, target Batch) -> [t, L] (bench.coverage_counts) also
    draws_cover [T, L]: the coverage of the S-draw mixture's central intervals.
    n <= 1 gets 4x the draws: there the proposal is the prior alone.

    The exact row is what the LMLHD estimator log (1/S) sum_s p(y_all | w_s), w_s ~ p(w | C),
    tends to as S -> infinity: log E_{p(w|C)} p(y_all | w) = log p(y_all, y_C') - log p(y_C),
    where y_C' is a second copy of the context (the targets include the context, so the
    context is scored twice). It is not log p(y_all) - log p(y_C), which scores only the
    points outside the context; measured on sinusoid test tasks, the two differ by up to
    0.7 nats per task at noise 0.25 but by 15 at noise 0.1 with n = 16."""
    _require_family(family)
    _require_noise(noise)
    test = _require_context(*check_batch(test, "test"), name="test")
    S, chunk, draws, gen = (_require_count(S, "S"), _require_count(chunk, "chunk"), _require_count(draws, "draws"),
                            check_generator(gen))
    if not isinstance(contexts, (list, tuple)) or not contexts or not all(_is_int(n) for n in contexts):
        raise ValueError(f"contexts: expected a non-empty list of context sizes, got {contexts!r}")
    if any(n < 0 or n > int(test.counts.min()) for n in contexts):
        raise ValueError(f"contexts: expected sizes in [0, {int(test.counts.min())}] (the fewest points of a test "
                         f"task), got {list(contexts)}")
    out = {n: dict(exact=[], exact_mse=[], draws=[], draws_mse=[], **({"draws_cover": []} if cover else {}))
           for n in contexts}
    for a in range(0, test.x.shape[0], chunk):
        x, y, mask = test.x[a:a + chunk].cpu(), test.y[a:a + chunk].cpu(), test.mask[a:a + chunk].cpu()
        yt, m = y.double().squeeze(-1), mask.double()                            # [t, M]
        x2, y2 = torch.cat([x, x], 1), torch.cat([y, y], 1)                      # [t, 2M, 1] targets, then context
        for n in contexts:
            ctx_mask = mask & (torch.arange(mask.shape[1]) < n)                   # the first n points
            nd = draws * (4 if n <= 1 else 1)
            log_all = log_evidence(x2, y2, torch.cat([mask, ctx_mask], 1), noise, family, gen, nd)  # [t]
            log_c, mean, f = posterior(x, y, ctx_mask, x, noise, family, S, gen, nd)
            ll = -0.5 * ((yt.unsqueeze(1) - f) / noise) ** 2 - math.log(noise) - 0.5 * LOG_2PI
            ll = (ll * m.unsqueeze(1)).sum(-1)                                    # [t, S]
            out[n]["exact"].append(log_all - log_c)
            out[n]["exact_mse"].append(((mean - yt) ** 2 * m).sum(-1) / m.sum(-1))
            out[n]["draws"].append(torch.logsumexp(ll, -1) - math.log(S))
            out[n]["draws_mse"].append(((f.mean(1) - yt) ** 2 * m).sum(-1) / m.sum(-1))
            if cover:
                out[n]["draws_cover"].append(cover(f.unsqueeze(-1), noise, Batch(x, y, mask)))
    return {n: {k: torch.cat(v) for k, v in d.items()} for n, d in out.items()}


def _require_count(v, name: str) -> int:
    """v if it is an integer >= 1, else ValueError naming it."""
    _require(_is_int(v) and v >= 1, name, "an integer >= 1", v)
    return int(v)


def _require_inputs(x, T: int, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != T or x.shape[-1] != 1:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a tensor of shape [T, M, 1] = [{T}, M, 1] (the families have one input), "
                         f"got {got}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: NaN or inf in the inputs")


def _require_context(x, y, mask, name: str = "context") -> Batch:
    """make_batch's checks (shapes, a bool mask, finite real points) and one input and one output."""
    batch = make_batch(x, y, mask, name=name)
    if batch.x.shape[-1] != 1 or batch.y.shape[-1] != 1:
        raise ValueError(f"{name}: expected x and y of shape [T, N, 1] (the families have one input and one output), "
                         f"got {tuple(batch.x.shape)} and {tuple(batch.y.shape)}")
    return batch


def _require_family(family: str) -> None:
    if family not in TASKS:
        raise ValueError(f"family: the Bayes-optimal predictive is known for {sorted(TASKS)}, got {family!r}")


def _require_noise(noise) -> None:
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not math.isfinite(noise) or noise <= 0:
        raise ValueError(f"noise: expected the observation noise std, a finite number > 0, got {noise!r}")
