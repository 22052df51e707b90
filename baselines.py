"""
Baselines for amortized LDVI, on the same padded task batches and the same functional BNN:

  MAML   point estimate adapted by inner SGD on the context [1]
  BMAML  M SVGD particles per task, meta-trained with the chaser loss [2, 3]
  NP     latent neural process with mean aggregation [4]
  GaussianModel  meta-learned Gaussian models with exact inference: Bayesian linear regression
         on learned features (ALPaCA [6], kernel="linear") and a deep-kernel GP [7, 8] (kernel="rbf")

Every method shares this part of ldvi_meta.LDVIMeta's interface, so the benchmark treats
all alike:
  fit(data, gen)                         meta-train on a Batch of meta-training tasks
  predictive(ctx, x_target, S, gen)      -> (mean [T, S', M, dy], std broadcastable to it),
                                            an equal-weight mixture of S' Gaussians per point
  save(path), cls.load(path)             one file with the config and the weights
S' = S for the NP and the Gaussian models (S joint draws of f at the targets); MAML predicts with its one adapted network (S' = 1) and BMAML with its
M particles (S' = M), whatever S. sample, elbo and iw_bound exist for ours only.
Empty context sets work for every method (MAML: no adaptation; BMAML: the initial
particles; NP: the learned empty-set representation).

References
  [1] C. Finn, P. Abbeel, S. Levine. Model-agnostic meta-learning for fast adaptation of
      deep networks. ICML 2017.
  [2] T. Kim, J. Yoon, O. Dia, S. Kim, Y. Bengio, S. Ahn. Bayesian model-agnostic
      meta-learning. NeurIPS 2018 (Algorithm 3: chaser loss).
  [3] Q. Liu, D. Wang. Stein variational gradient descent: a general purpose Bayesian
      inference algorithm. NeurIPS 2016.
  [4] M. Garnelo, J. Schwarz, D. Rosenbaum, F. Viola, D. Rezende, S. M. A. Eslami,
      Y. W. Teh. Neural processes. ICML 2018 workshop, arXiv:1807.01622.
  [5] S. Amari. Natural gradient works efficiently in learning. Neural Computation, 1998.
  [6] J. Harrison, A. Sharma, M. Pavone. Meta-learning priors for efficient online Bayesian
      regression. WAFR 2018 (ALPaCA).
  [7] M. Patacchiola, J. Turner, E. Crowley, M. O'Boyle, A. Storkey. Bayesian meta-learning for
      the few-shot setting via deep kernels. NeurIPS 2020 (deep kernel transfer).
  [8] V. Fortuin, H. Strathmann, G. Raetsch. Meta-learning mean functions for Gaussian
      processes. arXiv:1901.08098, 2019; J. Rothfuss, V. Fortuin, M. Josifoski, A. Krause.
      PACOH: Bayes-optimal meta-learning with PAC-guarantees. ICML 2021.
  [9] C. Rasmussen, C. Williams. Gaussian processes for machine learning. MIT Press, 2006
      (Algorithm 2.1: the evidence and predictive through one Cholesky factor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldvi_meta import (BOOL, INT_GE0, INT_GE1, MIN_SIGMA_Y, POSITIVE, WIDTHS, Batch, SaveLoad, _is_real, _require,
                       _require_fields, check_batch, check_compatible, check_generator, check_inputs, check_samples,
                       check_training_data, finite, make_batch, random_subset, task_minibatch, train_loop)
from ldvi_meta import (BNN, LOG_2PI, SAMPLE_BLOCK, SetEncoder, gaussian_log_evidence, gaussian_loglik, mlp, noisy_gram,
                       randn, safe_cholesky)


@dataclass
class TrainConfig:
    """What every baseline's meta-training loop shares."""
    iters: int = 2000                 # meta-training iterations
    lr: float = 1e-3                  # Adam learning rate (outer loop)
    lr_final: float = 1.0             # cosine decay of the learning rate to lr * lr_final (1: constant)
    tasks_per_batch: int = 16         # tasks per meta-training minibatch
    min_context: int = 1              # context sizes drawn uniformly in [min_context, N]
    clip: float = 10.0                # gradient-norm clipping threshold
    log_every: int = 100              # progress line on stderr every this many iterations (0: never)

    def __post_init__(self):
        _require_fields(self, ("iters", "min_context", "log_every"), *INT_GE0)
        _require_fields(self, ("tasks_per_batch",), *INT_GE1)
        _require_fields(self, ("lr", "clip"), *POSITIVE)
        _require(_is_real(self.lr_final) and 0 < self.lr_final <= 1, "lr_final", "a number in (0, 1]", self.lr_final)


def _fit(method, data: Batch, gen: torch.Generator, name: str) -> list:
    """Shared outer loop: random task minibatch, random context subset, targets = all points."""
    cfg = method.cfg
    data = check_training_data(data, cfg.dx, cfg.dy, method.dtype_ref, cfg.min_context)
    check_generator(gen, method.dtype_ref)

    def loss(it):
        batch = task_minibatch(data, cfg.tasks_per_batch, gen)
        return method.loss(random_subset(batch, gen, cfg.min_context), batch, gen)
    method.skipped_updates = []  # iterations whose update train_loop skipped (non-finite gradient)
    return train_loop(method.parameters(), loss, cfg.iters, cfg.lr, cfg.clip, cfg.log_every, name, cfg.lr_final,
                      method.skipped_updates)


@dataclass
class BNNTrainConfig(TrainConfig):
    """TrainConfig plus the shape of the shared BNN (MAML and BMAML)."""
    dx: int = 1                       # input dimension
    dy: int = 1                       # output dimension
    hidden: tuple = (40, 40)          # hidden widths of the network (ReLU)

    def __post_init__(self):
        super().__post_init__()
        _require_fields(self, ("hidden",), *WIDTHS)
        self.hidden = tuple(self.hidden)
        _require_fields(self, ("dx", "dy"), *INT_GE1)


# -----------------------------------------------------------------------------
# MAML (Finn et al. 2017): one meta-learned initialization, inner SGD on the context

@dataclass
class MAMLConfig(BNNTrainConfig):
    inner_lr: float = 0.01            # inner SGD step size
    adapt_steps: int = 5              # inner SGD steps (training and prediction)
    first_order: bool = False         # drop second-order terms of the meta-gradient
    sigma_y: float = 0.5              # predictive noise std (initial value when learned)
    learn_sigma_y: bool = True        # meta-learn sigma_y on the target log-likelihood

    def __post_init__(self):
        super().__post_init__()
        _require_fields(self, ("adapt_steps",), *INT_GE0)
        _require_fields(self, ("inner_lr", "sigma_y"), *POSITIVE)
        _require_fields(self, ("first_order", "learn_sigma_y"), *BOOL)


class MAML(SaveLoad, nn.Module):
    Config = MAMLConfig

    def __init__(self, cfg: MAMLConfig, gen: torch.Generator):
        super().__init__()
        _require(isinstance(cfg, MAMLConfig), "cfg", "a MAMLConfig", cfg)
        self.cfg = cfg
        self.bnn = BNN(cfg.dx, cfg.dy, cfg.hidden)
        self.theta0 = nn.Parameter(self.bnn.init(gen))  # [D]
        log_sy = torch.tensor(math.log(cfg.sigma_y))
        self.log_sigma_y = nn.Parameter(log_sy) if cfg.learn_sigma_y else nn.Buffer(log_sy)

    @property
    def dtype_ref(self):
        return self.theta0

    def adapt(self, ctx: Batch, steps: int | None = None) -> torch.Tensor:
        """All tasks at once: theta <- theta - inner_lr * grad(mean squared error on C).

        The inner gradient is the BNN's written-out backpropagation (BNN.loglik_and_grad with
        sigma = 1: grad MSE_t = -2 / (dy n_t) grad loglik_t), an ordinary differentiable
        expression, so the second-order meta-gradient needs one backward pass through it
        instead of autograd.grad(create_graph=True). Tested against autograd and vmap."""
        ctx = check_compatible(ctx, self.cfg.dx, self.cfg.dy, self.theta0)
        T = ctx.x.shape[0]
        theta = self.theta0.expand(T, 1, -1)  # [T, 1, D]
        one = torch.ones((), dtype=theta.dtype, device=theta.device)
        scale = (-2.0 / (self.cfg.dy * ctx.counts.clamp(min=1))).to(theta.dtype).view(T, 1, 1)  # [T, 1, 1]
        second_order = torch.is_grad_enabled() and not self.cfg.first_order
        for _ in range(self.cfg.adapt_steps if steps is None else steps):
            with torch.set_grad_enabled(second_order):
                _, g = self.bnn.loglik_and_grad(theta, ctx, one)  # [T, 1, D]
            theta = theta - self.cfg.inner_lr * scale * g
        return theta  # [T, 1, D]; an empty context has zero gradient: no adaptation

    def loss(self, ctx: Batch, target: Batch, gen=None) -> torch.Tensor:
        f = self.bnn(self.adapt(ctx), target.x)  # [T, 1, N, dy]
        ll = gaussian_loglik(f, target.y, target.mask, self.log_sigma_y.exp())[:, 0]  # [T]
        return -(ll / target.counts.clamp(min=1)).mean()

    def fit(self, data: Batch, gen: torch.Generator) -> list:
        return _fit(self, data, gen, "maml")

    def predictive(self, ctx: Batch, x_target, S: int = 1, gen=None):
        """A point estimate: one component, whatever S (S is checked, for the shared interface)."""
        ctx = check_compatible(ctx, self.cfg.dx, self.cfg.dy, self.theta0)
        x_target, _ = check_inputs(x_target, ctx, self.cfg.dx), check_samples(S)
        with torch.no_grad():
            theta = self.adapt(ctx)
            return finite(self.bnn(theta, x_target), "MAML predictive"), self.log_sigma_y.exp()  # [T, 1, M, dy]


# -----------------------------------------------------------------------------
# BMAML (Kim et al. 2018, Algorithm 3): SVGD particles and the chaser loss

def rbf_kernel(theta: torch.Tensor):
    """RBF kernel k_ij = exp(-|theta_i - theta_j|^2 / h) between particles [T, M, D] -> [T, M, M].

    Bandwidth by the median heuristic of Liu & Wang (2016) [3] in the form of their reference
    code: h = med / log(M + 1), med the median of the M x M squared distances of each task.
    h is treated as a constant (no gradient through the median)."""
    T, M, D = theta.shape
    sq = torch.cdist(theta, theta).square()                                   # [T, M, M]
    h = sq.detach().flatten(1).median(-1).values / math.log(M + 1)             # [T]
    h = h.clamp(min=1e-12).view(T, 1, 1)
    return torch.exp(-sq / h), h


def svgd_direction(theta: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """phi(theta_i) = 1/M sum_j [k_ji score_j + grad_{theta_j} k_ji]  [3], all tasks at once.

    With k = exp(-|a - b|^2 / h): grad_{theta_j} k_ji = (2 / h) k_ji (theta_i - theta_j)."""
    M = theta.shape[1]
    k, h = rbf_kernel(theta)                                                  # [T, M, M]
    drive = k @ score                                                         # [T, M, D]
    repulse = (2 / h) * (k.sum(-1, keepdim=True) * theta - k @ theta)         # [T, M, D]
    return (drive + repulse) / M


@dataclass
class BMAMLConfig(BNNTrainConfig):
    particles: int = 10               # M particles per task
    svgd_lr: float = 0.016            # SVGD step alpha in units of sigma_y^2: step = alpha sigma_y^2 phi
    chaser_steps: int = 5             # n SVGD steps on the context (also at prediction)
    leader_steps: int = 1             # s further SVGD steps on context + target
    sigma_y: float = 0.25             # fixed likelihood noise std of the SVGD target
    prior_std: float = 1.0            # std of the isotropic N(0, prior_std^2) weight prior of the target

    def __post_init__(self):
        super().__post_init__()
        _require_fields(self, ("particles", "chaser_steps"), *INT_GE1)
        _require_fields(self, ("leader_steps",), *INT_GE0)
        _require_fields(self, ("svgd_lr", "sigma_y", "prior_std"), *POSITIVE)


class BMAML(SaveLoad, nn.Module):
    Config = BMAMLConfig

    def __init__(self, cfg: BMAMLConfig, gen: torch.Generator):
        super().__init__()
        _require(isinstance(cfg, BMAMLConfig), "cfg", "a BMAMLConfig", cfg)
        self.cfg = cfg
        self.bnn = BNN(cfg.dx, cfg.dy, cfg.hidden)
        self.theta0 = nn.Parameter(torch.stack([self.bnn.init(gen) for _ in range(cfg.particles)]))  # [M, D]

    @property
    def dtype_ref(self):
        return self.theta0

    def score(self, theta: torch.Tensor, data: Batch) -> torch.Tensor:
        """grad_theta [log p(D | theta) + log N(theta; 0, prior_std^2 I)]  [T, M, D]."""
        sy = torch.tensor(self.cfg.sigma_y, dtype=theta.dtype, device=theta.device)
        _, g = self.bnn.loglik_and_grad(theta, data, sy)
        return g - theta / self.cfg.prior_std ** 2

    def svgd(self, theta: torch.Tensor, data: Batch, steps: int) -> torch.Tensor:
        """steps SVGD updates theta <- theta + alpha sigma_y^2 phi(theta); tasks with an empty data
        set stay put. The score grows like 1 / sigma_y^2 (the Fisher information of a Gaussian
        likelihood), so a step proportional to sigma_y^2 -- the scale a natural-gradient step
        would take [5] -- moves particles alike at every noise level; a fixed step diverged at
        sigma_y = 0.1. At sigma_y = 0.25 the default alpha gives the published 1e-3."""
        move = (data.counts > 0).to(theta.dtype).view(-1, 1, 1)  # [T, 1, 1]
        step = self.cfg.svgd_lr * self.cfg.sigma_y ** 2
        for _ in range(steps):
            theta = theta + step * move * svgd_direction(theta, self.score(theta, data))
        return theta

    def initial(self, T: int) -> torch.Tensor:
        return self.theta0.expand(T, -1, -1)  # [T, M, D]

    def loss(self, ctx: Batch, target: Batch, gen=None) -> torch.Tensor:
        """Chaser loss: sum_m |chaser_m - stopgrad(leader_m)|^2, averaged over tasks."""
        ctx = check_compatible(ctx, self.cfg.dx, self.cfg.dy, self.theta0)
        chaser = self.svgd(self.initial(ctx.x.shape[0]), ctx, self.cfg.chaser_steps)  # [T, M, D]
        with torch.no_grad():
            leader = self.svgd(chaser.detach(), target, self.cfg.leader_steps)
        return (chaser - leader).square().sum((-1, -2)).mean()

    def fit(self, data: Batch, gen: torch.Generator) -> list:
        return _fit(self, data, gen, "bmaml")

    def predictive(self, ctx: Batch, x_target, S: int = 1, gen=None):
        """Equal-weight mixture over the M adapted particles (S is checked, M is used)."""
        ctx = check_compatible(ctx, self.cfg.dx, self.cfg.dy, self.theta0)
        x_target, _ = check_inputs(x_target, ctx, self.cfg.dx), check_samples(S)
        with torch.no_grad():
            theta = self.svgd(self.initial(ctx.x.shape[0]), ctx, self.cfg.chaser_steps)
            sy = torch.tensor(self.cfg.sigma_y, dtype=theta.dtype, device=theta.device)
            return finite(self.bnn(theta, x_target), "BMAML predictive"), sy  # [T, M, M_target, dy]


# -----------------------------------------------------------------------------
# the latent Neural Process (Garnelo et al. 2018) with mean aggregation

@dataclass
class NPConfig(TrainConfig):
    dx: int = 1                       # input dimension
    dy: int = 1                       # output dimension
    z_dim: int = 32                   # latent dimension
    hidden: int = 128                 # width of encoder and decoder MLPs
    r_dim: int = 64                   # dimension of the aggregated representation
    min_std: float = 0.01             # floor on the decoder's output std

    def __post_init__(self):
        super().__post_init__()
        _require_fields(self, ("z_dim", "hidden", "r_dim"), *INT_GE1)
        _require_fields(self, ("min_std",), *POSITIVE)


class NeuralProcess(SaveLoad, nn.Module):
    """q(z | C) = N(mu(r), sigma(r)^2), r the masked mean of per-point features (the same
    DeepSets encoder as ours, with its learned empty-set vector); decoder p(y | x, z)."""

    Config = NPConfig

    def __init__(self, cfg: NPConfig, gen: torch.Generator):
        super().__init__()
        _require(isinstance(cfg, NPConfig), "cfg", "an NPConfig", cfg)
        check_generator(gen)
        self.cfg = cfg
        self.encoder = SetEncoder(cfg.dx, cfg.dy, cfg.z_dim, gen, cfg.hidden, cfg.r_dim)
        self.decoder = mlp([cfg.dx + cfg.z_dim, cfg.hidden, cfg.hidden, cfg.hidden, 2 * cfg.dy], gen)

    @property
    def dtype_ref(self):
        return self.encoder.empty

    def posterior(self, ctx: Batch):
        mu, log_std = self.encoder(ctx)  # [T, z], [T, z]
        return mu, log_std

    def decode(self, z: torch.Tensor, x: torch.Tensor):
        """z [T, S, z_dim], x [T, M, dx] -> mean, std [T, S, M, dy]."""
        T, S, _ = z.shape
        M = x.shape[1]
        inp = torch.cat([x.unsqueeze(1).expand(T, S, M, -1), z.unsqueeze(2).expand(T, S, M, -1)], -1)
        mean, raw = self.decoder(inp).chunk(2, -1)                     # [T, S, M, dy] each
        return mean, self.cfg.min_std + F.softplus(raw)

    def _sample_z(self, mu, log_std, S, gen):
        eps = torch.randn(mu.shape[0], S, mu.shape[1], generator=gen, dtype=mu.dtype, device=mu.device)
        return mu.unsqueeze(1) + log_std.exp().unsqueeze(1) * eps   # [T, S, z]

    def loss(self, ctx: Batch, target: Batch, gen: torch.Generator) -> torch.Tensor:
        """-[E_{q(z|T)} log p(y_T | x_T, z) - KL(q(z | T) || q(z | C))], per target point.

        The target set contains the context (the protocol's targets are all points)."""
        ctx = check_compatible(ctx, self.cfg.dx, self.cfg.dy, self.dtype_ref)
        mu_t, ls_t = self.posterior(target)
        mu_c, ls_c = self.posterior(ctx)
        z = self._sample_z(mu_t, ls_t, 1, gen)                           # [T, 1, z]
        mean, std = self.decode(z, target.x)
        ll = gaussian_loglik(mean, target.y, target.mask, std)[:, 0]     # [T]
        kl = (ls_c - ls_t + ((ls_t.exp()) ** 2 + (mu_t - mu_c) ** 2) / (2 * (2 * ls_c).exp()) - 0.5).sum(-1)  # [T]
        return -((ll - kl) / target.counts.clamp(min=1)).mean()

    def fit(self, data: Batch, gen: torch.Generator) -> list:
        return _fit(self, data, gen, "np")

    def predictive(self, ctx: Batch, x_target, S: int, gen: torch.Generator):
        ctx = check_compatible(ctx, self.cfg.dx, self.cfg.dy, self.dtype_ref)
        x_target, S = check_inputs(x_target, ctx, self.cfg.dx), check_samples(S)
        check_generator(gen, self.dtype_ref)
        with torch.no_grad():
            mu, log_std = self.posterior(ctx)
            z = self._sample_z(mu, log_std, S, gen)                             # [T, S, z_dim]
            # decoded in blocks of SAMPLE_BLOCK particles: [T, block, M, hidden] stays in cache
            mean, std = (torch.cat(parts, 1) for parts in zip(*(self.decode(z[:, s:s + SAMPLE_BLOCK], x_target)
                                                                 for s in range(0, S, SAMPLE_BLOCK))))
            return finite(mean, "NP predictive"), finite(std, "NP predictive std")


# -----------------------------------------------------------------------------
# meta-learned Gaussian models: exact evidence, exact posterior, no sampler [6, 7, 8]
#
# Per task, y(x) = m(x) + f(x) + N(0, sigma_y^2) with f ~ GP(0, k) and, shared by all tasks,
# an MLP mean m and an MLP feature map phi:
#   linear (ALPaCA [6]):  k(x, x') = phi(x)^T Sigma phi(x'),  i.e. f(x) = phi(x)^T w, w ~ N(0, Sigma)
#   rbf (deep kernel [7]): k(x, x') = s^2 exp(-|phi(x) - phi(x')|^2 / 2)
# Meta-training maximizes the exact log evidence of whole meta-training tasks; prediction
# conditions the GP on the context exactly. All linear algebra is float64.

GP_KERNELS = ("linear", "rbf")


@dataclass
class GaussianConfig:
    """The defaults are the benchmark's settings (chosen on validation tasks: results/README.md).
    Set sigma_y to your data's noise level."""
    dx: int = 1                       # input dimension
    dy: int = 1                       # output dimension (outputs are independent given the shared kernel)
    kernel: str = "linear"            # "linear": Bayesian linear regression on phi (ALPaCA); "rbf": deep-kernel GP
    features: int = 4                 # d, the number of learned features phi(x)
    width: int = 40                   # hidden width of the feature and the mean MLP (ReLU)
    depth: int = 2                    # hidden layers of the feature and the mean MLP
    sigma_y: float = 0.25             # observation noise std: SET IT to your data's (initial value when learned)
    learn_sigma_y: bool = False       # meta-learn sigma_y on the evidence
    jitter: float = 1e-6              # x mean diagonal, added before factoring a posterior covariance of draws
    iters: int = 10000                # meta-training iterations (Adam steps)
    lr: float = 1e-3                  # Adam learning rate
    lr_final: float = 1.0             # cosine decay of the learning rate to lr * lr_final (1: constant)
    tasks_per_batch: int = 16         # tasks per meta-training minibatch
    clip: float = 10.0                # gradient-norm clipping threshold
    log_every: int = 1000             # progress line on stderr every this many iterations (0: never)

    def __post_init__(self):
        _require(self.kernel in GP_KERNELS, "kernel", f"one of {GP_KERNELS}", self.kernel)
        _require_fields(self, ("dx", "dy", "features", "width", "tasks_per_batch"), *INT_GE1)
        _require_fields(self, ("depth", "iters", "log_every"), *INT_GE0)
        _require_fields(self, ("sigma_y", "jitter", "lr", "clip"), *POSITIVE)
        _require_fields(self, ("learn_sigma_y",), *BOOL)
        _require(_is_real(self.lr_final) and 0 < self.lr_final <= 1, "lr_final", "a number in (0, 1]", self.lr_final)
        _require(self.sigma_y >= MIN_SIGMA_Y, "sigma_y", f"a noise std >= {MIN_SIGMA_Y:g} (K + sigma_y^2 I must "
                 "stay positive definite in float64 when inputs repeat; rescale the data instead)", self.sigma_y)


def noise_cholesky(A: torch.Tensor, noise_var: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of A = K + sigma_y^2 I, or FloatingPointError naming sigma_y (a learned
    sigma_y that has shrunk, or inputs that repeat, can leave A singular in float64)."""
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        raise FloatingPointError(f"sigma_y: K + sigma_y^2 I is not positive definite at sigma_y = "
                                 f"{float(noise_var) ** 0.5:.3g} (repeated or nearly repeated inputs need a larger "
                                 "sigma_y)")
    return L


class GaussianModel(SaveLoad, nn.Module):
    """A meta-learned Gaussian process per task, exact in everything (see the section comment).

    predictive() returns S joint draws of m + f at the targets (mean [T, S, M, dy]) and sigma_y,
    so the benchmark scores it like every other method; exact_predictive() gives the Gaussian
    itself, whose log density at the targets is the S = infinity value of that score."""

    Config = GaussianConfig

    def __init__(self, cfg: GaussianConfig, gen: torch.Generator):
        super().__init__()
        _require(isinstance(cfg, GaussianConfig), "cfg", "a GaussianConfig", cfg)
        check_generator(gen)
        self.cfg = cfg
        hidden = [cfg.width] * cfg.depth
        self.mean_net = mlp([cfg.dx, *hidden, cfg.dy], gen)
        self.feature_net = mlp([cfg.dx, *hidden, cfg.features], gen)
        if cfg.kernel == "linear":  # Sigma = L L^T, L lower triangular with a positive diagonal; starts at I
            self.prior_factor = nn.Parameter(torch.zeros(cfg.features, cfg.features))
        else:
            self.log_scale = nn.Parameter(torch.zeros(()))  # log s
        log_sy = torch.tensor(math.log(cfg.sigma_y))
        self.log_sigma_y = nn.Parameter(log_sy) if cfg.learn_sigma_y else nn.Buffer(log_sy)

    @property
    def dtype_ref(self):
        return self.log_sigma_y

    # --- the pieces, in float64
    def noise_var(self) -> torch.Tensor:
        return (2 * self.log_sigma_y.double()).exp()

    def prior_chol(self) -> torch.Tensor:
        """L [d, d] with Sigma = L L^T (linear kernel)."""
        raw = self.prior_factor.double()
        return torch.tril(raw, -1) + torch.diag_embed(raw.diagonal().exp())

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_net(x).double()                                    # [T, N, d]

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.mean_net(x).double()                                       # [T, N, dy]

    def kernel(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """k(x1, x2) [T, N1, N2] (float64)."""
        a, b = self.phi(x1), self.phi(x2)                                      # [T, N1, d], [T, N2, d]
        if self.cfg.kernel == "linear":
            L = self.prior_chol()
            return (a @ L) @ (b @ L).transpose(-1, -2)                         # [T, N1, N2]
        sq = (a.unsqueeze(-2) - b.unsqueeze(-3)).square().sum(-1)              # [T, N1, N2]
        return (2 * self.log_scale.double()).exp() * torch.exp(-0.5 * sq)

    def residual(self, data: Batch) -> torch.Tensor:
        """y - m(x) on the real points, 0 on padding: [T, N, dy] (float64)."""
        return (data.y.double() - self.mean(data.x)) * data.mask.unsqueeze(-1)

    def _weight_posterior(self, ctx: Batch):
        """Linear kernel, weight space [6]: with P = Phi L (padded rows 0) and M = I + P^T P / sigma^2,
        w | C ~ N(L M^-1 b, L M^-1 L^T), b = P^T r / sigma^2. Returns (L [d, d], chol M [T, d, d],
        M^-1 b [T, d, dy]) and the Woodbury pieces of the evidence."""
        L, s2 = self.prior_chol(), self.noise_var()
        r = self.residual(ctx)                                                 # [T, N, dy]
        P = (self.phi(ctx.x) * ctx.mask.unsqueeze(-1)) @ L                     # [T, N, d]
        eye = torch.eye(L.shape[0], dtype=P.dtype, device=P.device)            # [d, d]
        R = noise_cholesky(eye + P.transpose(-1, -2) @ P / s2, s2)          # chol M  [T, d, d]
        b = P.transpose(-1, -2) @ r / s2                                       # [T, d, dy]
        return L, R, torch.cholesky_solve(b, R), b, r

    # --- exact evidence, the meta-training objective
    def log_evidence(self, data: Batch) -> torch.Tensor:
        """log p(y | x) of every task [T] (float64): the d x d Woodbury form for the linear kernel
        (O(N d^2)), one N x N Cholesky factor for the RBF kernel [9]."""
        n = data.counts.double()                                               # [T]
        s2, dy = self.noise_var(), self.cfg.dy
        if self.cfg.kernel == "linear":  # r^T A^-1 r = |r|^2 / s2 - b^T M^-1 b, log det A = n log s2 + log det M
            _, R, Minv_b, b, r = self._weight_posterior(data)
            quad = r.square().sum((-1, -2)) / s2 - (b * Minv_b).sum((-1, -2))  # [T]
            logdet = n * s2.log() + 2 * R.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # [T]
            return -0.5 * quad - 0.5 * dy * (logdet + n * LOG_2PI)
        A = noisy_gram(self.kernel(data.x, data.x), data.mask, s2)             # [T, N, N]
        return gaussian_log_evidence(noise_cholesky(A, s2), self.residual(data), n)

    def loss(self, batch: Batch, gen=None) -> torch.Tensor:
        """Negative log evidence per point, averaged over the tasks of the minibatch."""
        return -(self.log_evidence(batch) / batch.counts.clamp(min=1)).mean()

    def fit(self, data: Batch, gen: torch.Generator) -> list:
        """Meta-train on whole tasks (minibatches of tasks drawn with gen)."""
        cfg = self.cfg
        data = check_training_data(data, cfg.dx, cfg.dy, self.dtype_ref, 1)
        check_generator(gen, self.dtype_ref)
        self.skipped_updates = []
        return train_loop(self.parameters(), lambda it: self.loss(task_minibatch(data, cfg.tasks_per_batch, gen)),
                          cfg.iters, cfg.lr, cfg.clip, cfg.log_every, f"gp-{cfg.kernel}", cfg.lr_final,
                          self.skipped_updates)

    # --- exact posterior at the targets, and draws from it
    def _checked(self, ctx, x_target):
        ctx = check_compatible(ctx, self.cfg.dx, self.cfg.dy, self.dtype_ref)
        return ctx, check_inputs(x_target, ctx, self.cfg.dx)

    def exact_predictive(self, ctx: Batch, x_target: torch.Tensor):
        """The Gaussian posterior of m + f at the targets given the context: mean [T, M, dy] and
        covariance [T, M, M] (float64; add sigma_y^2 I for y). At an empty context, the prior."""
        ctx, x_target = self._checked(ctx, x_target)
        with torch.no_grad():
            A = noisy_gram(self.kernel(ctx.x, ctx.x), ctx.mask, self.noise_var())      # [T, N, N]
            Lc = noise_cholesky(A, self.noise_var())                                   # [T, N, N]
            Ktc = self.kernel(x_target, ctx.x) * ctx.mask.unsqueeze(-2)                # [T, M, N]
            mean = self.mean(x_target) + Ktc @ torch.cholesky_solve(self.residual(ctx), Lc)  # [T, M, dy]
            W = torch.linalg.solve_triangular(Lc, Ktc.transpose(-1, -2), upper=False)   # Lc^-1 Kct  [T, N, M]
            cov = self.kernel(x_target, x_target) - W.transpose(-1, -2) @ W             # [T, M, M]
            return mean, cov

    def exact_log_predictive(self, ctx: Batch, target: Batch) -> torch.Tensor:
        """log N(y_target; mean, cov + sigma_y^2 I) per task [T]: the S = infinity value of the
        benchmark's LMLHD for this model (the joint density of all real targets)."""
        target = check_batch(target, "target")
        mean, cov = self.exact_predictive(ctx, target.x)
        with torch.no_grad():
            A = noisy_gram(cov, target.mask, self.noise_var())                        # [T, M, M]
            r = (target.y.double() - mean) * target.mask.unsqueeze(-1)                 # [T, M, dy]
            L = noise_cholesky(A, self.noise_var())                                    # [T, M, M]
            return gaussian_log_evidence(L, r, target.counts.double()).to(target.y.dtype)

    def predictive(self, ctx: Batch, x_target, S: int, gen: torch.Generator):
        """S joint draws of m + f at the targets, mean [T, S, M, dy], and sigma_y. Linear kernel:
        draws of the weights w (exact, rank d); RBF: a Cholesky factor of the posterior covariance
        at the targets (with jitter)."""
        ctx, x_target = self._checked(ctx, x_target)
        S = check_samples(S)
        check_generator(gen, self.dtype_ref)
        T, M, dy = x_target.shape[0], x_target.shape[1], self.cfg.dy
        with torch.no_grad():
            if self.cfg.kernel == "linear":
                L, R, Minv_b, _, _ = self._weight_posterior(ctx)
                d = L.shape[0]
                eps = randn((T, S, d, dy), gen, torch.float64, x_target.device)              # [T, S, d, dy]
                z = torch.linalg.solve_triangular(R.transpose(-1, -2).unsqueeze(1), eps, upper=True)  # R^-T eps
                w = (L @ Minv_b).unsqueeze(1) + L @ z                                        # [T, S, d, dy]
                f = self.mean(x_target).unsqueeze(1) + self.phi(x_target).unsqueeze(1) @ w  # [T, S, M, dy]
            else:
                mean, cov = self.exact_predictive(ctx, x_target)
                Lt = safe_cholesky(cov, self.cfg.jitter, "GP posterior covariance at the targets")  # [T, M, M]
                eps = randn((T, S, M, dy), gen, torch.float64, x_target.device)              # [T, S, M, dy]
                f = mean.unsqueeze(1) + Lt.unsqueeze(1) @ eps                                # [T, S, M, dy]
            return finite(f.to(x_target.dtype), "Gaussian-model predictive"), self.log_sigma_y.exp()
