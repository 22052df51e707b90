"""
The gold standard of the benchmark: a batched, Metropolis-corrected HMC [1] on the same target
as the amortized sampler, so that  ours - gold  is the cost of the amortized inference and
gold - Bayes-optimal the cost of the learned model.

Every task runs C chains as one [T, C, D] tensor; one step size per task is adapted during
warm-up by dual averaging towards an acceptance of 0.75 [2]; the mass matrix is diagonal (q0's
scales); convergence is judged by the split R-hat [3] of the context log-likelihood across
chains. Checked on Gaussians with known moments (test_ldvi_meta.py).

References
  [1] R. Neal. MCMC using Hamiltonian dynamics. Handbook of MCMC, 2011.
  [2] M. Hoffman, A. Gelman. The No-U-Turn sampler. JMLR 2014 (dual averaging, Algorithm 5).
  [3] A. Vehtari, A. Gelman, D. Simpson, B. Carpenter, P. Buerkner. Rank-normalization,
      folding, and localization: an improved R-hat. Bayesian Analysis, 2021 (split R-hat).
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, NamedTuple

import torch

import ldvi_meta as lm


# -----------------------------------------------------------------------------
# the gold standard: Metropolis-corrected HMC on the same target [1]

class HMCState(NamedTuple):
    v: torch.Tensor      # [T, C, D] one position per chain
    value: torch.Tensor  # [T, C] log gamma(v)
    grad: torch.Tensor   # [T, C, D] grad log gamma(v)


def hmc_step(state: HMCState, target: Callable, eps, n_leapfrog: int, inv_mass, gen):
    """One HMC transition for every chain: momentum p ~ N(0, M), n_leapfrog leapfrog steps of
    size eps [T, 1, 1] times a per-chain jitter U[0.8, 1.2] (fixed trajectories can resonate
    with the target and mix badly [1]), accept with prob min(1, exp(-dH)). M = diag(1 / inv_mass),
    inv_mass [T, 1, D]. Returns (new state, acceptance probabilities [T, C]); a NaN proposal is rejected."""
    v, value, grad = state
    T, C, _ = v.shape
    eps = eps * (0.8 + 0.4 * torch.rand(T, C, 1, generator=gen, device=v.device, dtype=v.dtype))  # [T, C, 1]
    p = lm.randn(v.shape, gen, v.dtype, v.device) * inv_mass.rsqrt()                   # [T, C, D]
    h0 = value - 0.5 * (p * p * inv_mass).sum(-1)                         # -H at the start, [T, C]
    p = p + 0.5 * eps * grad
    for i in range(n_leapfrog):
        v = v + eps * inv_mass * p                                        # [T, C, D]
        value, grad = target(v)
        p = p + (eps if i < n_leapfrog - 1 else 0.5 * eps) * grad
    log_accept = (value - 0.5 * (p * p * inv_mass).sum(-1) - h0).nan_to_num(nan=-torch.inf).clamp(max=0.0)
    accept = torch.rand(log_accept.shape, generator=gen, device=v.device, dtype=v.dtype).log() < log_accept
    keep = accept.unsqueeze(-1)                                           # [T, C, 1]
    new = HMCState(torch.where(keep, v, state.v), torch.where(accept, value, state.value),
                   torch.where(keep, grad, state.grad))
    return new, log_accept.exp()


def hmc(target: Callable, v0, inv_mass, gen, warmup: int = 200, draws: int = 100, n_leapfrog: int = 10,
        thin: int = 1, trace: Callable | None = None, accept_target: float = 0.75, progress: str = ""):
    """Run C chains per task from v0 [T, C, D]: `warmup` transitions that adapt one step size
    per task by dual averaging towards the target acceptance [2], then `draws` transitions,
    every `thin`-th of which is kept. Returns (kept states [T, C, draws // thin, D], the trace
    [T, C, draws] of trace(v) -> [T, C] (default log gamma) for convergence checks, mean
    acceptance after warm-up [T])."""
    T, C, D = v0.shape
    for name, v, lo in (("warmup", warmup, 0), ("draws", draws, 1), ("n_leapfrog", n_leapfrog, 1), ("thin", thin, 1)):
        lm._require(lm._is_int(v) and v >= lo, name, f"an integer >= {lo}", v)
    lm._require(thin <= draws, "thin", f"at most draws = {draws} (every thin-th of the draws is kept)", thin)
    state = HMCState(v0, *target(v0))
    log_eps = torch.full((T, 1, 1), math.log(0.1 / math.sqrt(D)), dtype=v0.dtype, device=v0.device)
    mu, h_bar, log_eps_bar = log_eps + math.log(10), torch.zeros_like(log_eps), torch.zeros_like(log_eps)
    kept, values, acc_sum, t0 = [], [], torch.zeros(T, dtype=v0.dtype, device=v0.device), time.perf_counter()
    for it in range(warmup + draws):
        eps = log_eps.exp() if it < warmup else log_eps_bar.exp()
        state, acc = hmc_step(state, target, eps, n_leapfrog, inv_mass, gen)
        if it < warmup:  # dual averaging with gamma = 0.05, t0 = 10, kappa = 0.75 (Hoffman & Gelman, Alg. 5)
            t = it + 1
            h_bar = (1 - 1 / (t + 10)) * h_bar + (accept_target - acc.mean(-1).view(T, 1, 1)) / (t + 10)
            log_eps = mu - math.sqrt(t) / 0.05 * h_bar
            log_eps_bar = t ** -0.75 * log_eps + (1 - t ** -0.75) * log_eps_bar
        else:
            if (it - warmup + 1) % thin == 0:
                kept.append(state.v)
            values.append(state.value if trace is None else trace(state.v))
            acc_sum += acc.mean(-1)
        if progress and (it + 1) % 50 == 0:
            print(f"[{progress}] HMC {it + 1}/{warmup + draws}  {time.perf_counter() - t0:.0f}s", file=sys.stderr,
                  flush=True)
    return torch.stack(kept, 2), torch.stack(values, 2), acc_sum / max(draws, 1)


def split_rhat(x: torch.Tensor) -> torch.Tensor:
    """Split R-hat [3] of a scalar over chains: x [T, C, N] -> [T] (1 = converged)."""
    lm._require(isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[1] >= 1 and x.shape[2] >= 4, "x",
                "a tensor [T, C, N] with N >= 4 draws per chain (each half of a chain needs 2 for a variance)",
                tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__)
    T, C, N = x.shape
    half = N // 2
    x = torch.cat([x[..., :half], x[..., half:2 * half]], 1)               # [T, 2C, N/2]
    n = x.shape[-1]
    within = x.var(-1).mean(-1)                                            # W, [T]
    between = x.mean(-1).var(-1)                                           # B / n, [T]
    return (((n - 1) / n * within + between) / within).sqrt()


# -----------------------------------------------------------------------------
# the gold standard: HMC on a trained LDVI model's own posterior

class Gold:
    """predictive() of a trained LDVIMeta with the diffusion replaced by a long batched HMC
    (chains started from the prior, mass matrix from q0's scales, step size adapted in
    warm-up); S draws are taken evenly from the kept part of all chains. Convergence: the
    split R-hat across chains of the context log-likelihood log p(C | theta)."""

    def __init__(self, model: lm.LDVIMeta, chains: int, warmup: int, draws: int, n_leapfrog: int, name: str):
        for arg, v, lo in (("chains", chains, 1), ("warmup", warmup, 0), ("draws", draws, 4),
                           ("n_leapfrog", n_leapfrog, 1)):
            lm._require(lm._is_int(v) and v >= lo, arg, f"an integer >= {lo}" + (" (split R-hat needs 2 draws per "
                        "half-chain)" if arg == "draws" else ""), v)
        self.model, self.chains, self.warmup, self.draws, self.n_leapfrog = model, chains, warmup, draws, n_leapfrog
        self.name, self.stats = name, {}

    def predictive(self, ctx: lm.Batch, x_target, S: int, gen: torch.Generator):
        model = self.model
        ctx = model.check(ctx)
        n, C = int(ctx.counts.max()), self.chains
        loglik = lambda v: model.context_loglik(v, ctx)                                # [T, C]  # noqa: E731
        with torch.no_grad():
            m, log_s = model.q0(ctx)                                                 # [T, r + D]
            v0 = model.sample_prior(ctx.x.shape[0], C, gen)                          # [T, C, r + D]
            v, trace, acc = hmc(model.target(ctx), v0, (2 * log_s).exp().unsqueeze(1), gen, self.warmup,
                                   self.draws, self.n_leapfrog, thin=max(1, self.draws * C // S), trace=loglik,
                                   progress=f"{self.name} gold n={n}" if self.name else "")
            T, _, N, Dv = v.shape
            keep = torch.linspace(0, C * N - 1, S).round().long()                    # S of the C * N kept draws
            v = v.transpose(1, 2).reshape(T, N * C, Dv)[:, keep]                     # [T, S, r + D]
            self.stats[n] = dict(accept=acc.tolist(), rhat_loglik=split_rhat(trace).tolist())
            return lm.finite(model.bnn(model.weights(v, ctx, gen), x_target), "gold"), model.sigma_y
