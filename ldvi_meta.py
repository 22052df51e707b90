"""
Amortized Langevin-diffusion variational inference (LDVI) for Bayesian meta-learning.

Every task tau has its own weights theta of a small Bayesian neural net f_theta; a
meta-learned Gaussian prior p_psi(theta) ties the tasks together. For a context set C
the task posterior p_psi(theta | C) is approximated by one model that serves all tasks:

  1. a DeepSets encoder maps C to a diagonal Gaussian q0(theta | C) = N(m, diag s^2),
  2. K learned Langevin-diffusion steps, run in the whitened coordinates
     u = (theta - m) / s, move the q0 samples towards the posterior,
  3. every particle carries a log importance weight log w whose mean is the augmented
     ELBO  E[log w] <= log p_psi(C), trained end to end for psi, encoder and kernels.

Two kernels integrate the Gaussian part of the dynamics exactly, so that if q0 already
is the posterior every log w equals log Z (tested to 1e-8):
  overdamped  (exponential-integrator ULA, MCD family [1, 2])
  underdamped (exact rotation + half kicks + partial momentum refresh, UHA/LDVI [1, 3]).
The mathematics and the exact properties are written out in DESIGN.md (section 3).

All particle tensors are batched [T, P, D] = [tasks, particles, parameters]; data are
padded [T, N, dx] / [T, N, dy] tensors with a boolean mask [T, N] (empty sets allowed).

References
  [1] T. Geffner, J. Domke. Langevin diffusion variational inference. AISTATS 2023.
  [2] A. Doucet, W. Grathwohl, A. Matthews, H. Strathmann. Score-based diffusion meets
      annealed importance sampling. NeurIPS 2022.
  [3] G. Zhang, K. Hsu, J. Li, C. Finn, R. Grosse. Differentiable annealed importance
      sampling and the perils of gradient noise. NeurIPS 2021.
  [4] M. Volpp, P. Dahlinger, P. Becker, C. Daniel, G. Neumann. Accurate Bayesian
      meta-learning by accurate task posterior inference. ICLR 2023.
  [5] M. Zaheer et al. Deep sets. NeurIPS 2017.
  [6] C. Finn, P. Abbeel, S. Levine. Model-agnostic meta-learning. ICML 2017 (the
      1-40-40-1 sinusoid network).
  [7] N. Brosse, A. Durmus, E. Moulines, S. Sabanis. The tamed unadjusted Langevin
      algorithm. Stochastic Processes and their Applications, 2019.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)
KERNELS = ("underdamped", "overdamped")


def default_device() -> torch.device:
    """CUDA when present, else CPU. Called once, at an entry point."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -----------------------------------------------------------------------------
# configuration

@dataclass
class LDVIConfig:
    dx: int = 1                       # input dimension of the BNN
    dy: int = 1                       # output dimension of the BNN
    hidden: tuple = (40, 40)          # hidden widths of the BNN (ReLU); (40, 40) -> D = 1761
    kernel: str = "underdamped"       # "underdamped" or "overdamped" diffusion kernel
    K: int = 10                       # number of diffusion steps (0 = amortized mean-field VI)
    step_init: float = 0.05           # initial step size h_k (small: training starts near mean-field VI)
    refresh_init: float = 0.8         # initial momentum refresh factor c_k (underdamped)
    prior_std_init: float = 0.1       # initial std sigma_psi of the meta-learned prior
    sigma_y: float = 0.5              # observation noise std (initial value when learned)
    learn_sigma_y: bool = True        # meta-learn sigma_y (False: keep it fixed)
    enc_hidden: int = 128             # width of the set-encoder MLPs
    enc_dim: int = 64                 # dimension of the set representation r
    particles: int = 16               # particles per task during meta-training
    tasks_per_batch: int = 16         # tasks per meta-training minibatch
    min_context: int = 0              # context sizes are drawn uniformly in [min_context, N]
    iters: int = 2000                 # meta-training iterations
    lr: float = 1e-3                  # Adam learning rate
    clip: float = 10.0                # gradient-norm clipping threshold
    log_every: int = 100              # progress line on stderr every this many iterations (0: never)
    tamed: bool = True                # drive the diffusion with the tamed score (see tame)

    def __post_init__(self):
        self.hidden = tuple(self.hidden)
        _require(self.kernel in KERNELS, "kernel", f"one of {KERNELS}", self.kernel)
        _require_fields(self, ("dx", "dy", "enc_hidden", "enc_dim", "particles", "tasks_per_batch"), *INT_GE1)
        _require(all(w >= 1 for w in self.hidden), "hidden", "widths >= 1", self.hidden)
        _require_fields(self, ("K", "min_context", "iters", "log_every"), *INT_GE0)
        _require_fields(self, ("step_init", "prior_std_init", "sigma_y", "lr", "clip"), *POSITIVE)
        _require(0 <= self.refresh_init < 1, "refresh_init", "a number in [0, 1)", self.refresh_init)


def _require(ok: bool, name: str, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {got!r}")


# (predicate, what it expects) pairs for _require_fields
INT_GE0 = (lambda v: v >= 0, "an integer >= 0")
INT_GE1 = (lambda v: v >= 1, "an integer >= 1")
POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def _require_fields(obj, names, ok, expected: str) -> None:
    """_require for several fields of a config that share one rule."""
    for name in names:
        _require(ok(getattr(obj, name)), name, expected, getattr(obj, name))


# -----------------------------------------------------------------------------
# task batches: padded [T, N, .] tensors with a boolean mask [T, N]

class Batch(NamedTuple):
    x: torch.Tensor     # [T, N, dx]
    y: torch.Tensor     # [T, N, dy]
    mask: torch.Tensor  # [T, N] bool, True marks a real point

    @property
    def counts(self) -> torch.Tensor:
        return self.mask.sum(-1)  # [T]


def make_batch(x, y, mask=None, name: str = "context") -> Batch:
    """Validate a padded task batch; padded entries are zeroed so they can never leak.

    Raises ValueError naming the argument for wrong ranks or shapes, a non-bool mask,
    or NaN / inf in the real (unmasked) points.
    """
    for arg, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}.{arg}: expected a tensor of shape [T, N, d{arg}], got {shape}")
    if x.shape[:2] != y.shape[:2]:
        raise ValueError(f"{name}: x is [T, N] = {tuple(x.shape[:2])} but y is {tuple(y.shape[:2])}")
    if x.dtype != y.dtype or not x.is_floating_point():
        raise ValueError(f"{name}: x and y must share one floating dtype, got {x.dtype} and {y.dtype}")
    T, N, _ = x.shape
    if mask is None:
        mask = torch.ones(T, N, dtype=torch.bool, device=x.device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (T, N):
        got = (mask.dtype, tuple(mask.shape)) if isinstance(mask, torch.Tensor) else mask
        raise ValueError(f"{name}.mask: expected a bool tensor of shape [T, N] = {(T, N)}, got {got}")
    if x.device != y.device or mask.device != x.device:
        raise ValueError(f"{name}: x, y and mask must be on one device, got {x.device}, {y.device}, {mask.device}")
    for arg, t in (("x", x), ("y", y)):
        if not torch.isfinite(t[mask]).all():
            raise ValueError(f"{name}.{arg}: NaN or inf in real (unmasked) points")
    keep = mask.unsqueeze(-1)  # [T, N, 1]
    return Batch(torch.where(keep, x, 0.0), torch.where(keep, y, 0.0), mask)


def check_compatible(batch: Batch, dx: int, dy: int, like: torch.Tensor, name: str = "context") -> Batch:
    """Raise ValueError unless batch has the model's dx, dy, dtype and device (those of `like`)."""
    if batch.x.shape[-1] != dx or batch.y.shape[-1] != dy:
        raise ValueError(f"{name}: expected dx = {dx}, dy = {dy}, got x {tuple(batch.x.shape)}, y {tuple(batch.y.shape)}")
    if batch.x.dtype != like.dtype or batch.x.device != like.device:
        raise ValueError(f"{name}: data are {batch.x.dtype} on {batch.x.device}, the model is {like.dtype} on {like.device}")
    return batch


def first_n(batch: Batch, n) -> Batch:
    """Context made of the first n[t] points of each task (n an int or a [T] tensor)."""
    T, N = batch.mask.shape
    n = torch.as_tensor(n, device=batch.mask.device).expand(T)  # [T]
    if (n < 0).any() or (n > batch.counts).any():
        raise ValueError(f"n: expected context sizes in [0, points per task], got {n.tolist()} "
                         f"for tasks with {batch.counts.tolist()} points")
    keep = torch.arange(N, device=n.device) < n.unsqueeze(-1)  # [T, N]
    L = max(int(n.max()), 1) if T else 0  # trim the padding: the BNN never sees points past L
    return make_batch(batch.x[:, :L], batch.y[:, :L], (batch.mask & keep)[:, :L])


def random_subset(batch: Batch, gen: torch.Generator, min_size: int = 0) -> Batch:
    """A random context subset per task, size uniform in [min_size, #points] (DESIGN 4)."""
    T, N = batch.mask.shape
    counts = batch.counts  # [T]
    if (counts < min_size).any():
        raise ValueError(f"min_size: tasks have only {counts.min().item()} points, need >= {min_size}")
    dev = batch.mask.device
    size = min_size + (torch.rand(T, generator=gen, device=dev) * (counts - min_size + 1)).floor()  # [T]
    keys = torch.rand(T, N, generator=gen, device=dev).masked_fill(~batch.mask, 2.0)  # padding ranks last
    rank = keys.argsort(-1).argsort(-1)  # [T, N], random rank of each real point
    return make_batch(batch.x, batch.y, batch.mask & (rank < size.unsqueeze(-1)))


# -----------------------------------------------------------------------------
# the functional BNN: theta [T, P, D] and x [T, N, dx] -> f [T, P, N, dy]

class BNN:
    """A ReLU MLP whose weights are a flat vector; evaluated for all tasks and particles."""

    def __init__(self, dx: int = 1, dy: int = 1, hidden: Iterable[int] = (40, 40)):
        self.sizes = [dx, *hidden, dy]
        self.shapes = [(a, b) for a, b in zip(self.sizes[:-1], self.sizes[1:])]
        self.n_params = sum(a * b + b for a, b in self.shapes)

    def unflatten(self, theta: torch.Tensor):
        """Yield (W [..., din, dout], b [..., dout]) per layer from theta [..., D]."""
        if theta.shape[-1] != self.n_params:
            raise ValueError(f"theta: expected last dimension D = {self.n_params}, got {tuple(theta.shape)}")
        i = 0
        for a, b in self.shapes:
            W = theta[..., i:i + a * b].unflatten(-1, (a, b)); i += a * b  # [..., a, b]
            bias = theta[..., i:i + b]; i += b                             # [..., b]
            yield W, bias

    def _check(self, theta, x):
        if theta.dim() != 3 or x.dim() != 3 or theta.shape[0] != x.shape[0] or x.shape[-1] != self.sizes[0]:
            raise ValueError(f"BNN: expected theta [T, P, {self.n_params}] and x [T, N, {self.sizes[0]}], "
                             f"got {tuple(theta.shape)} and {tuple(x.shape)}")

    def _forward(self, theta, x):
        """Outputs [T, P, N, dy], the layers and the pre-activations (kept for the gradient)."""
        self._check(theta, x)
        layers = list(self.unflatten(theta))
        h, pre = x.unsqueeze(1), []  # [T, 1, N, dx]
        for l, (W, b) in enumerate(layers):
            h = h @ W + b.unsqueeze(-2)  # [T, P, N, dout]
            if l < len(layers) - 1:
                pre.append(h)
                h = F.relu(h)
        return h, layers, pre

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._forward(theta, x)[0]  # [T, P, N, dy]

    def loglik_and_grad(self, theta: torch.Tensor, data: "Batch", sigma):
        """sum_n log N(y_n; f_theta(x_n), sigma^2) [T, P] and its gradient in theta [T, P, D].

        Backpropagation written out with ordinary (differentiable) tensor ops, so that
        autograd differentiates the score with a first-order pass: much cheaper than
        autograd.grad(create_graph=True). Tested against autograd."""
        f, layers, pre = self._forward(theta, data.x)
        mask = data.mask.unsqueeze(1).unsqueeze(-1).to(f.dtype)   # [T, 1, N, 1]
        r = (data.y.unsqueeze(1) - f) / sigma                      # [T, P, N, dy]
        ll = ((-0.5 * r.square() - torch.log(sigma) - 0.5 * LOG_2PI) * mask).sum((-1, -2))  # [T, P]
        delta = r / sigma * mask                                    # d ll / d f  [T, P, N, dy]
        grads = []
        for l in range(len(layers) - 1, -1, -1):
            W, _ = layers[l]
            h_in = data.x.unsqueeze(1) if l == 0 else F.relu(pre[l - 1])   # [T, P|1, N, din]
            grads.append(delta.sum(-2))                                    # d/db  [T, P, dout]
            grads.append((h_in.transpose(-1, -2) @ delta).flatten(-2))     # d/dW  [T, P, din*dout]
            if l > 0:
                delta = (delta @ W.transpose(-1, -2)) * (pre[l - 1] > 0)   # [T, P, N, din]
        T, P = f.shape[:2]
        grads = [g.expand(T, P, -1) for g in grads[::-1]]
        return ll, torch.cat(grads, -1)  # [T, P], [T, P, D]

    def init(self, gen: torch.Generator, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """A flat weight vector with PyTorch's nn.Linear default: U(-1/sqrt(fan_in), +)."""
        parts = []
        for a, b in self.shapes:
            bound = 1 / math.sqrt(a)
            parts.append((2 * torch.rand(a * b + b, generator=gen, dtype=dtype, device=device) - 1) * bound)
        return torch.cat(parts)  # [D]


def gaussian_loglik(f: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, sigma) -> torch.Tensor:
    """sum_n log N(y_n; f_n, sigma^2) over the real points: f [T, P, N, dy] -> [T, P].

    sigma is a scalar tensor or broadcasts to f (the NP baseline passes one per point)."""
    sigma = torch.as_tensor(sigma, dtype=f.dtype, device=f.device)
    z = (y.unsqueeze(1) - f) / sigma                                   # [T, P, N, dy]
    ll = -0.5 * z.square() - torch.log(sigma) - 0.5 * LOG_2PI          # [T, P, N, dy]
    return (ll.sum(-1) * mask.unsqueeze(1)).sum(-1)                    # [T, P]


def diag_normal_logpdf(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, diag exp(log_std)^2), summed over the last dimension."""
    z = (x - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - 0.5 * LOG_2PI).sum(-1)


# -----------------------------------------------------------------------------
# the Gaussian-exact Langevin kernels, in whitened coordinates u = (theta - m) / s

def autograd_target(log_gamma: Callable) -> Callable:
    """Turn a log density theta [T, P, D] -> [T, P] into a target returning (value, grad).

    The gradient is differentiable (create_graph) when grad mode is on, so the diffusion
    can be trained through it; under torch.no_grad() everything is detached."""
    def target(theta):
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            th = theta if (create_graph and theta.requires_grad) else theta.detach().requires_grad_(True)
            value = log_gamma(th)  # [T, P]
            grad, = torch.autograd.grad(value.sum(), th, create_graph=create_graph)  # [T, P, D]
        return (value, grad) if create_graph else (value.detach(), grad.detach())
    return target


def _sq(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(v, v)  # |v|^2 over the last dimension, [T, P]


def tame(score, h):
    """Coordinatewise tamed drift g / (1 + h |g|) (tamed ULA, Brosse et al. 2019 [7]).

    Equal to g where h |g| << 1 and bounded by 1/h, so one step moves a particle by at most
    about one q0 standard deviation per coordinate even where the likelihood is far steeper
    than q0 (early in training, or steep tasks), instead of blowing up. Validity of the
    weights does not depend on the drift (the backward kernel uses the same field), and
    Gaussian exactness holds because there grad l = 0."""
    return score / (1 + h * score.abs())


def untamed(score, h):
    """The plain drift field: grad l itself (the step size is unused)."""
    return score


def overdamped_step(u, drift_field, beta, h, eps):
    """F_k: u' = a u + (1 - a) beta g(u) + sqrt(1 - a^2) eps, a = exp(-h), g = grad l or tame(grad l, h).

    Exact for the OU part (stationary N(0, I)); only the residual score is frozen."""
    a = torch.exp(-h)
    drift = torch.addcmul(a * u, (1 - a) * beta, drift_field)   # a u + (1 - a) beta g(u)
    return torch.addcmul(drift, torch.sqrt(1 - a * a), eps)


def underdamped_step(u, p, score, beta, h, c, xi, score_fn, field=untamed):
    """One split-Hamiltonian step: OU refresh, half kick, exact rotation, half kick.

    The kicks use field(grad l, h) (untamed or tame). Each kick is a shear and the rotation
    is orthogonal, so the map after the refresh is volume preserving for any field.
    Returns (u, p, p_refreshed, value, score) at the new position; score_fn(u) gives the
    (value, grad l) pair there, which the next step reuses."""
    # (torch.addcmul(a, b, c) = a + b * c: one pass over the [T, P, D] state instead of two)
    kick, cos, sin = 0.5 * h * beta, torch.cos(h), torch.sin(h)   # scalars
    p_ref = torch.addcmul(c * p, torch.sqrt(1 - c * c), xi)        # p' = c p + sqrt(1 - c^2) xi
    p = torch.addcmul(p_ref, kick, field(score, h))                # half kick
    u, p = torch.addcmul(cos * u, sin, p), torch.addcmul(cos * p, -sin, u)  # exact rotation
    value, score = score_fn(u)
    p = torch.addcmul(p, kick, field(score, h))                    # half kick
    return u, p, p_ref, value, score


def diffusion(target: Callable, m, log_s, u0, steps, refresh, betas, gen, kernel: str = "underdamped",
              tamed: bool = True):
    """Run the q0-preconditioned diffusion and return (theta_K [T, P, D], log w [T, P]).

    target: theta [T, P, D] -> (log gamma(theta) [T, P], grad_theta log gamma [T, P, D]),
            e.g. autograd_target(log_gamma). Gradients flow through the whole chain when
            grad mode is on (reparameterized noise); wrap in torch.no_grad() to sample only.
    m, log_s:  [T, D] mean and log std of q0;   u0: [T, P, D] standard-normal draws;
    steps h, refresh c, betas: [K] tensors (the overdamped kernel has no momentum and
                               ignores refresh, but its shape is still checked);
    gen: torch.Generator for the per-step noise;
    tamed: drive the steps with tame(grad l, h_k) instead of grad l (see tame).

    log w = log gamma(theta_K) - log q0(theta_0) + (kernel correction), see DESIGN 3.
    A particle whose weight comes out NaN has diverged: it gets log w = -inf (zero weight).
    """
    _require(kernel in KERNELS, "kernel", f"one of {KERNELS}", kernel)
    _require(u0.dim() == 3 and m.shape == log_s.shape == (u0.shape[0], u0.shape[2]),
             "u0/m/log_s", "u0 [T, P, D] with m and log_s [T, D]", (u0.shape, m.shape, log_s.shape))
    T, P, D = u0.shape
    K = steps.shape[0] if steps.dim() == 1 else -1
    _require(K >= 0 and betas.shape == (K,) and refresh.shape == (K,), "steps/refresh/betas",
             "three 1-d tensors of one length K", (tuple(steps.shape), tuple(refresh.shape), tuple(betas.shape)))
    if K:  # one check per call, not per step
        h_ok = (steps > 0).all() if kernel == "overdamped" else (steps >= 0).all()
        _require(bool(h_ok & torch.isfinite(steps).all()), "steps",
                 "finite step sizes, > 0 (overdamped) or >= 0 (underdamped)", steps.tolist())
        _require(bool(((refresh >= 0) & (refresh < 1)).all()), "refresh", "factors in [0, 1)", refresh.tolist())
        _require(bool(((betas > 0) & (betas <= 1 + 1e-6)).all()), "betas", "values in (0, 1]", betas.tolist())
    s = torch.exp(log_s).unsqueeze(1)  # [T, 1, D]

    def score_fn(u):  # log gamma(m + s u) [T, P] and grad_u l(u) = s * grad_theta log gamma + u
        value, grad = target(torch.addcmul(m.unsqueeze(1), s, u))
        return value, torch.addcmul(u, s, grad)

    field = tame if tamed else untamed
    log_q0 = -0.5 * _sq(u0) - 0.5 * D * LOG_2PI - log_s.sum(-1, keepdim=True)  # [T, P]
    u = u0
    value, score = score_fn(u)
    log_w = -log_q0  # [T, P]
    if kernel == "overdamped":
        for k in range(K):
            eps = torch.randn(u.shape, generator=gen, dtype=u.dtype, device=u.device)  # [T, P, D]
            a = torch.exp(-steps[k])
            u_new = overdamped_step(u, field(score, steps[k]), betas[k], steps[k], eps)
            value, score = score_fn(u_new)
            back_mean = a * u_new + (1 - a) * betas[k] * field(score, steps[k])       # [T, P, D]
            # log B_k(u | u') - log F_k(u' | u); the Gaussian normalizers cancel
            log_w = log_w - _sq(u - back_mean) / (2 * (1 - a * a)) + 0.5 * _sq(eps)
            u = u_new
    elif K:  # underdamped (at K = 0 no momentum is drawn: both kernels are then one method)
        p = torch.randn(u.shape, generator=gen, dtype=u.dtype, device=u.device)  # [T, P, D]
        for k in range(K):
            xi = torch.randn(u.shape, generator=gen, dtype=u.dtype, device=u.device)
            u, p, p_ref, value, score = underdamped_step(u, p, score, betas[k], steps[k], refresh[k], xi,
                                                         score_fn, field)
            log_w = log_w - 0.5 * (_sq(p) - _sq(p_ref))
    log_w = log_w + value
    log_w = torch.where(torch.isnan(log_w), -torch.inf, log_w)
    return m.unsqueeze(1) + s * u, log_w  # [T, P, D], [T, P]


def elbo(log_w: torch.Tensor) -> torch.Tensor:
    """Per-task ELBO estimate: mean over particles of log w [T, P] -> [T]."""
    return log_w.mean(-1)


def iw_bound(log_w: torch.Tensor) -> torch.Tensor:
    """Per-task importance-weighted bound logsumexp_p log w - log P: [T, P] -> [T]."""
    return torch.logsumexp(log_w, -1) - math.log(log_w.shape[-1])


# -----------------------------------------------------------------------------
# the DeepSets set encoder: C -> (dm, dlogs), initialized so that q0 = prior

def mlp(sizes, gen: torch.Generator) -> nn.Sequential:
    """ReLU MLP with nn.Linear's default init drawn from gen (not the global RNG)."""
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        lin = nn.Linear(a, b)
        for p in lin.parameters():
            nn.init.uniform_(p, -1 / math.sqrt(a), 1 / math.sqrt(a), generator=gen)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1])

class SetEncoder(nn.Module):
    """Per-point MLP on (x, y), masked mean, MLP head on [r, log(1 + n)] [5].

    A learned vector stands in for the mean of an empty set. The count feature lets
    the posterior width depend on how many points were seen."""

    def __init__(self, dx: int, dy: int, D: int, gen: torch.Generator, hidden: int = 128, dim: int = 64):
        super().__init__()
        self.point = mlp([dx + dy, hidden, hidden, dim], gen)
        self.empty = nn.Parameter(torch.zeros(dim))
        self.head = mlp([dim + 1, hidden, 2 * D], gen)
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, ctx: Batch):
        mask = ctx.mask.unsqueeze(-1).to(ctx.x.dtype)                    # [T, N, 1]
        r = self.point(torch.cat([ctx.x, ctx.y], -1))                     # [T, N, R]
        n = mask.sum(1)                                                   # [T, 1]
        mean = (r * mask).sum(1) / n.clamp(min=1)                         # [T, R]
        r = torch.where(n > 0, mean, self.empty)                          # [T, R]
        out = self.head(torch.cat([r, torch.log1p(n)], -1))               # [T, 2D]
        return out.chunk(2, -1)                                           # ([T, D], [T, D])


# -----------------------------------------------------------------------------
# the model: meta-learned prior, likelihood, amortized q0 and learned diffusion

class LDVIMeta(nn.Module):
    """Amortized LDVI for a BNN with a meta-learned diagonal Gaussian prior."""

    def __init__(self, cfg: LDVIConfig, gen: torch.Generator):
        super().__init__()
        self.cfg = cfg
        self.bnn = BNN(cfg.dx, cfg.dy, cfg.hidden)
        D, K = self.bnn.n_params, cfg.K
        self.prior_mean = nn.Parameter(self.bnn.init(gen))                            # mu_psi [D]
        self.prior_log_std = nn.Parameter(torch.full((D,), math.log(cfg.prior_std_init)))  # [D]
        log_sy = torch.tensor(math.log(cfg.sigma_y))
        if cfg.learn_sigma_y:
            self.log_sigma_y = nn.Parameter(log_sy)
        else:
            self.register_buffer("log_sigma_y", log_sy)
        self.encoder = SetEncoder(cfg.dx, cfg.dy, D, gen, cfg.enc_hidden, cfg.enc_dim)
        inv_softplus = lambda v: math.log(math.expm1(v))  # noqa: E731
        self.raw_steps = nn.Parameter(torch.full((K,), inv_softplus(cfg.step_init)))
        self.raw_refresh = nn.Parameter(torch.full((K,), math.log(cfg.refresh_init / (1 - cfg.refresh_init))
                                                   if cfg.refresh_init > 0 else -20.0))
        self.raw_betas = nn.Parameter(torch.zeros(K))  # equal increments: beta_k = k / K

    # --- the learned kernel parameters
    def schedule(self):
        """(steps h_k > 0, refresh c_k in (0, 1), betas 0 < beta_1 <= ... <= beta_K = 1)."""
        inc = F.softplus(self.raw_betas)  # [K]
        return F.softplus(self.raw_steps), torch.sigmoid(self.raw_refresh), inc.cumsum(0) / inc.sum()

    @property
    def sigma_y(self) -> torch.Tensor:
        return self.log_sigma_y.exp()

    # --- the target gamma(theta) = p_psi(theta) p(C | theta)
    def log_prior(self, theta: torch.Tensor) -> torch.Tensor:
        return diag_normal_logpdf(theta, self.prior_mean, self.prior_log_std)  # [T, P]

    def log_joint(self, theta: torch.Tensor, ctx: Batch) -> torch.Tensor:
        f = self.bnn(theta, ctx.x)  # [T, P, N, dy]
        return self.log_prior(theta) + gaussian_loglik(f, ctx.y, ctx.mask, self.sigma_y)  # [T, P]

    def target(self, ctx: Batch) -> Callable:
        """theta -> (log gamma(theta), grad_theta log gamma) with the analytic BNN gradient."""
        log_norm = -self.prior_log_std.sum() - 0.5 * self.bnn.n_params * LOG_2PI
        prec = torch.exp(-2 * self.prior_log_std)  # [D]

        def value_and_grad(theta):
            ll, g_lik = self.bnn.loglik_and_grad(theta, ctx, self.sigma_y)   # [T, P], [T, P, D]
            d = theta - self.prior_mean                                      # [T, P, D]
            d_prec = d * prec                                                # = -grad log prior
            log_prior = log_norm - 0.5 * torch.linalg.vecdot(d, d_prec)      # [T, P]
            return log_prior + ll, g_lik - d_prec
        return value_and_grad

    def q0(self, ctx: Batch):
        """Mean m [T, D] and log std [T, D] of the amortized initial distribution."""
        dm, dlogs = self.encoder(ctx)
        return self.prior_mean + dm, self.prior_log_std + dlogs

    def check(self, batch: Batch, name: str = "context") -> Batch:
        return check_compatible(batch, self.cfg.dx, self.cfg.dy, self.prior_mean, name)

    def fit(self, data: Batch, gen: torch.Generator) -> list:
        """Meta-train (the interface shared with the baselines)."""
        return meta_train(self, data, gen)

    # --- sampling, bounds and prediction
    def sample(self, ctx: Batch, P: int, gen: torch.Generator):
        """P particles per task from the diffusion started at q0(. | C): (theta [T, P, D], log w [T, P]).

        Differentiable end to end in grad mode; call under torch.no_grad() to sample only."""
        self.check(ctx)
        _require(P >= 1, "P", "an integer >= 1", P)
        m, log_s = self.q0(ctx)
        T, D = m.shape
        u0 = torch.randn(T, P, D, generator=gen, dtype=m.dtype, device=m.device)  # [T, P, D]
        steps, refresh, betas = self.schedule()
        return diffusion(self.target(ctx), m, log_s, u0, steps, refresh, betas, gen, self.cfg.kernel,
                         self.cfg.tamed)

    def predictive(self, ctx: Batch, x_target: torch.Tensor, S: int, gen: torch.Generator):
        """Predictive mixture for the targets: means [T, S, M, dy] and the noise std."""
        with torch.no_grad():
            theta, _ = self.sample(ctx, S, gen)
            return self.bnn(theta, x_target), self.sigma_y

    def loss(self, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        """Negative mean ELBO over a random context subset of each task (DESIGN 4)."""
        ctx = random_subset(batch, gen, self.cfg.min_context)
        _, log_w = self.sample(ctx, self.cfg.particles, gen)
        return -elbo(log_w).mean()


# -----------------------------------------------------------------------------
# evaluation: the same two numbers for every method (DESIGN 5)

def log_predictive(mean, std, target: Batch) -> torch.Tensor:
    """Per-task log marginal predictive likelihood of an equal-weight mixture [T]:
    logsumexp_s sum_n log N(y_n; mean_s(x_n), std_s^2) - log S, mean [T, S, M, dy]."""
    ll = gaussian_loglik(mean, target.y, target.mask, std)  # [T, S]
    return torch.logsumexp(ll, -1) - math.log(mean.shape[1])


def mse(mean, target: Batch) -> torch.Tensor:
    """Per-task mean squared error of the mixture mean over the real target points [T]."""
    err = (mean.mean(1) - target.y).square().mean(-1)  # [T, M]
    return (err * target.mask).sum(-1) / target.counts.clamp(min=1)


# -----------------------------------------------------------------------------
# meta-training

def train_loop(params, loss_fn: Callable[[int], torch.Tensor], iters: int, lr: float, clip: float,
               log_every: int = 100, name: str = "train") -> list:
    """Adam on loss_fn(iteration) with gradient-norm clipping; returns the loss history.

    Raises FloatingPointError naming the iteration when a loss or gradient turns NaN/inf;
    prints a one-line progress report on stderr every log_every iterations."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    history, t0 = [], time.perf_counter()
    for it in range(iters):
        loss = loss_fn(it)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: loss is {loss.item()} at iteration {it}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
        if not torch.isfinite(gnorm):
            raise FloatingPointError(f"{name}: gradient norm is {gnorm.item()} at iteration {it}")
        opt.step()
        history.append(loss.detach())
        if log_every and ((it + 1) % log_every == 0 or it + 1 == iters):
            el = time.perf_counter() - t0
            recent = torch.stack(history[-log_every:]).mean().item()
            print(f"[{name}] it {it + 1}/{iters}  loss {recent:.3f}  {el / (it + 1) * 1e3:.1f} ms/it  "
                  f"eta {el / (it + 1) * (iters - it - 1):.0f}s", file=sys.stderr, flush=True)
    return [h.item() for h in history]


def task_minibatch(data: Batch, T: int, gen: torch.Generator) -> Batch:
    """T meta-training tasks drawn without replacement (all of them if there are fewer)."""
    idx = torch.randperm(data.x.shape[0], generator=gen, device=data.x.device)[:T]
    return Batch(data.x[idx], data.y[idx], data.mask[idx])


def meta_train(model: LDVIMeta, data: Batch, gen: torch.Generator, iters: int | None = None) -> list:
    """Maximize the mean ELBO over random context subsets of the meta-training tasks."""
    model.check(data, "data")
    cfg = model.cfg
    iters = cfg.iters if iters is None else iters
    return train_loop(model.parameters(),
                      lambda it: model.loss(task_minibatch(data, cfg.tasks_per_batch, gen), gen),
                      iters, cfg.lr, cfg.clip, cfg.log_every, name=f"ldvi-{cfg.kernel}-K{cfg.K}")
