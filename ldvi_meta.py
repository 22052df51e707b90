"""
Amortized Langevin-diffusion variational inference (LDVI) for Bayesian meta-learning.

Every task tau has its own weights theta of a small Bayesian neural net f_theta; a
meta-learned prior ties the tasks together. For a context set C the task posterior is
approximated by one model that serves all tasks:

  1. the prior has a low-dimensional task latent z ~ N(0, I_r). Where it acts is the
     config's `structure`:
       "all":  on every weight [8], theta = B z + theta_res with theta_res ~ N(mu, diag
               sigma^2), so theta ~ N(mu, B B^T + diag sigma^2) (r = 0: a diagonal prior);
               the sampler's state is v = (z, theta_res) with a diagonal prior;
       "last": on the last layer only, whose prior is then Gaussian, N(M, B B^T + diag s^2),
               or a mixture of such Gaussians (`components`). The hidden layers move along
               r_h learned directions, theta_h = mu_h + B_h z_h with z_h ~ N(0, I) (the
               default, r_h = 4: features that change from task to task), optionally with a
               task-level length-scale per input; or, with r_h = 0, their weights have a
               diagonal prior with one std per layer. Given the hidden layers the last layer
               is conjugate [9, 10], so it is integrated out exactly (Rao-Blackwellization
               [12]): the sampler's state v is z_h (or the hidden weights), its target has
               the last layer's closed-form evidence as its likelihood, and each particle's
               last layer is drawn from its exact conditional [11];
  2. a DeepSets encoder [5] maps C to a diagonal Gaussian q0(v | C) = N(m, diag s^2)
     (an empty context skips 2-3: the posterior is the prior, drawn exactly, log w = 0),
  3. K learned Langevin-diffusion steps, run in the whitened coordinates
     u = (v - m) / s, move the q0 samples towards the posterior p(v | C),
  4. every particle carries a log importance weight log w whose mean is the augmented
     ELBO  E[log w] <= log p_psi(C), trained end to end for psi = (mu, sigma, B), the
     encoder and the kernel parameters (by default with the score held constant in the
     gradient: differentiating through the chain's drift explodes [3]);
  5. what the training objective cannot choose, the input scale and the training length, is
     chosen on held-out meta-training tasks by their predictive score (select_design).

Two kernels integrate the Gaussian part of the dynamics exactly, so that if q0 already
is the posterior every log w equals log Z (tested to 1e-8):
  overdamped  (exponential-integrator ULA, MCD family [1, 2])
  underdamped (exact rotation + half kicks + partial momentum refresh, UHA/LDVI [1, 3]).
MATH.md writes out the model, both kernels, their weights and why they are exact.
(gold.py has the benchmark's gold standard: a Metropolis-corrected HMC on the same target.)

All particle tensors are batched [T, P, D] = [tasks, particles, parameters]; data are
padded [T, N, dx] / [T, N, dy] tensors with a boolean mask [T, N] (empty sets allowed).
The machinery that is not the method (argument checks, building and validating task
batches, model files, the training loop) comes last in this file, under its own banner: a
reader of the method may skip it. The file imports nothing but torch, so it can be copied
alone into another project.

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
  [8] O. Papaspiliopoulos, G. Roberts, M. Skold. A general framework for the
      parametrization of hierarchical models. Statistical Science, 2007 (non-centred).
  [9] J. Harrison, A. Sharma, M. Pavone. Meta-learning priors for efficient online Bayesian
      regression. WAFR 2018 (ALPaCA: a Gaussian last layer on meta-learned features).
  [10] C. Rasmussen, C. Williams. Gaussian processes for machine learning. MIT Press, 2006.
  [11] J. Wilson, V. Borovitskiy, A. Terenin, P. Mostowsky, M. Deisenroth. Efficiently
      sampling functions from Gaussian process posteriors. ICML 2020 (pathwise conditioning).
  [12] G. Casella, C. Robert. Rao-Blackwellisation of sampling schemes. Biometrika, 1996.
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable, Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)
KERNELS = ("underdamped", "overdamped")
STRUCTURES = ("all", "last")  # where the prior's task latent acts: every weight, or the last layer
DEVICE_TYPES = ("cpu", "cuda")  # where data may live
MIN_SIGMA_Y = 1e-6              # the smallest observation noise std the models accept


def default_device() -> torch.device:
    """CUDA when present, else CPU. Called once, at an entry point."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -----------------------------------------------------------------------------
# configuration

@dataclass
class LDVIConfig:
    """The defaults are the settings of the benchmark's LDVI-overdamped row (bench.py uses them):
    the last-layer prior, hidden layers that move along r_h = 4 learned directions, K = 5
    overdamped steps trained without the gradient through the drift. bench.py then chooses the
    input scale and the training length on held-out meta-training tasks (select_design).
    Set sigma_y to your data's noise level."""
    dx: int = 1                       # input dimension of the BNN
    dy: int = 1                       # output dimension of the BNN
    hidden: tuple = (40, 40)          # hidden widths of the BNN (ReLU); (40, 40) -> D = 1761
    latent: int = 8                   # r, dimension of the task latent z in the prior (0: diagonal prior)
    latent_init: float = 1e-3         # B starts at latent_init * N(0, 1) entries
    structure: str = "last"           # "last": the latent acts on the last layer only, which is then Gaussian
                                      # given the hidden layers and integrated out exactly; "all": every weight
    hidden_latent: int = 4            # "last": r_h > 0 makes the hidden layers mu_h + B_h z_h, z_h ~ N(0, I_rh): the
                                      # sampler's state is then z_h alone (features that move from task to task);
                                      # 0: the hidden layers' weights themselves, with a fixed diagonal prior
    hidden_std: float = 1e-3          # "last" with hidden_latent = 0: prior std of the hidden-layer weights (fixed)
    hidden_latent_init: float = 0.1   # B_h starts at this times N(0, 1) times each layer's init scale 1/sqrt(fan_in)
    input_scale: float = 0.0          # with r_h > 0: > 0 adds a task-level log length-scale per input, z_s ~ N(0, I),
                                      # the first layer's weights of input i times about exp(tau_i z_s,i); tau_i
                                      # is learned and starts here (0: none; select_design chooses it)
    learn_input_scale: bool = True    # False: tau_i stays at input_scale (a fixed hyperparameter, e.g. one that
                                      # select_config chose on held-out meta-training tasks)
    drift_grad: bool = False          # False: meta-training differentiates log w as if the sampler's score were
                                      # a constant at each point (a stop-gradient): the same bound, a biased
                                      # gradient without the chain's exploding Jacobian [3] and without a
                                      # second-order pass. True: the full gradient through the chain (better
                                      # with hidden_latent = 0, whose 1720-d state needs it; unstable with r_h > 0)
    components: int = 2               # "last": Gaussian components of the last layer's prior (a mixture if > 1)
    kernel: str = "overdamped"        # "overdamped" or "underdamped" diffusion kernel
    K: int = 5                        # number of diffusion steps (0 = amortized mean-field VI)
    step_init: float = 0.05           # initial step size h_k (small: training starts near mean-field VI)
    refresh_init: float = 0.8         # initial momentum refresh factor c_k (underdamped)
    prior_std_init: float = 1e-3      # initial std sigma of the residual weights in the prior ("last": of the
                                      # last layer's diagonal part s)
    sigma_y: float = 0.25             # observation noise std (fixed): SET IT to your data's
    enc_hidden: int = 128             # width of the set-encoder MLPs
    enc_dim: int = 64                 # dimension of the set representation r
    particles: int = 16               # particles per task during meta-training
    tasks_per_batch: int = 16         # tasks per meta-training minibatch
    min_context: int = 0              # context sizes are drawn uniformly in [min_context, N]
    iters: int = 1800                 # meta-training iterations (longer overfits 64 meta-training tasks)
    lr: float = 3e-3                  # Adam learning rate
    lr_final: float = 0.1             # cosine decay of the learning rate to lr * lr_final (1: constant)
    clip: float = 10.0                # gradient-norm clipping threshold
    log_every: int = 100              # progress line on stderr every this many iterations (0: never)

    def _require_default(self, name: str, why: str) -> None:
        """A field that would do nothing in this configuration is refused unless left at its default."""
        default = type(self).__dataclass_fields__[name].default
        _require(getattr(self, name) == default, name, f"its default {default!r} {why}", getattr(self, name))

    def __post_init__(self):
        _require(self.kernel in KERNELS, "kernel", f"one of {KERNELS}", self.kernel)
        _require(isinstance(self.drift_grad, bool), "drift_grad", "True or False", self.drift_grad)
        if self.K == 0:
            self._require_default("drift_grad", "with K = 0 (there is no drift)")
        _require_fields(self, ("hidden",), *WIDTHS)
        self.hidden = tuple(self.hidden)
        _require_fields(self, ("dx", "dy", "enc_hidden", "enc_dim", "particles", "tasks_per_batch"), *INT_GE1)
        _require_fields(self, ("K", "latent", "min_context", "iters", "log_every"), *INT_GE0)
        _require_fields(self, ("step_init", "prior_std_init", "sigma_y", "lr", "clip", "latent_init"), *POSITIVE)
        _require(_is_real(self.refresh_init) and 0 <= self.refresh_init < 1, "refresh_init", "a number in [0, 1)",
                 self.refresh_init)
        _require(_is_real(self.lr_final) and 0 < self.lr_final <= 1, "lr_final", "a number in (0, 1]", self.lr_final)
        _require(self.structure in STRUCTURES, "structure", f"one of {STRUCTURES}", self.structure)
        _require_fields(self, ("components",), *INT_GE1)
        _require_fields(self, ("hidden_std",), *POSITIVE)
        _require_fields(self, ("hidden_latent",), *INT_GE0)
        _require_fields(self, ("hidden_latent_init",), *POSITIVE)
        _require(_is_real(self.input_scale) and 0 <= self.input_scale < math.inf, "input_scale",
                 "a finite number >= 0 (0: no input scales)", self.input_scale)
        _require(isinstance(self.learn_input_scale, bool), "learn_input_scale", "True or False",
                 self.learn_input_scale)
        if not self.input_scale:
            self._require_default("learn_input_scale", "with input_scale = 0 (there is no scale to learn or fix)")
        if self.structure == "last":
            _require(len(self.hidden) >= 1, "hidden", "at least one hidden layer with structure = 'last'", self.hidden)
        else:  # the fields of the last-layer prior do nothing here: refused unless left at their defaults
            _require(self.components == 1, "components", "1 with structure = 'all' (mixtures need 'last')",
                     self.components)
            _require(self.hidden_latent == 0, "hidden_latent", "0 with structure = 'all' (a hidden latent is part of "
                     "the last-layer prior of structure = 'last')", self.hidden_latent)
            for name in ("hidden_std", "hidden_latent_init", "input_scale"):
                self._require_default(name, "with structure = 'all' (it sets the last-layer prior of structure = "
                                      "'last' and does nothing here)")
        if self.hidden_latent:  # the hidden layers are mu_h + B_h z_h exactly: no per-layer std to set
            self._require_default("hidden_std", "with hidden_latent > 0 (the hidden layers are then mu_h + B_h z_h, "
                                  "with no per-layer std)")
        else:
            self._require_default("hidden_latent_init", "with hidden_latent = 0 (there is no B_h to initialize)")
            self._require_default("input_scale", "with hidden_latent = 0 (input scales are part of the hidden "
                                  "latent's state)")
        _require(self.sigma_y >= MIN_SIGMA_Y, "sigma_y", f"a noise std >= {MIN_SIGMA_Y:g} (a smaller one is below "
                 "what the float64 evidence can resolve; rescale the data instead)", self.sigma_y)


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
        """Outputs [T, P, N, dy], the layers and the input of every layer (kept for the gradient)."""
        self._check(theta, x)
        layers = list(self.unflatten(theta))
        h = x.unsqueeze(1)  # [T, 1, N, dx]
        acts = [h]
        for l, (W, b) in enumerate(layers):
            h = _affine(h, W, b)  # [T, P, N, dout]
            if l < len(layers) - 1:
                h = h.relu_()     # in place on a fresh tensor (no product's backward needs its output)
                acts.append(h)
        return h, layers, acts

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._forward(theta, x)[0]  # [T, P, N, dy]

    def loglik_and_grad(self, theta: torch.Tensor, data: "Batch", sigma):
        """sum_n log N(y_n; f_theta(x_n), sigma^2) [T, P] and its gradient in theta [T, P, D].

        Backpropagation written out with ordinary (differentiable) tensor ops, so that
        autograd differentiates the score with a first-order pass: much cheaper than
        autograd.grad(create_graph=True). Tested against autograd."""
        f, backprop = self.forward_and_backprop(theta, data.x)
        mask = data.mask.unsqueeze(1).unsqueeze(-1).to(f.dtype)   # [T, 1, N, 1]
        r = (data.y.unsqueeze(1) - f) / sigma                      # [T, P, N, dy]
        ll = ((-0.5 * r.square() - torch.log(sigma) - 0.5 * LOG_2PI) * mask).sum((-1, -2))  # [T, P]
        return ll, backprop(r / sigma * mask)  # d ll / d f = r / sigma: [T, P], [T, P, D]

    def forward_and_backprop(self, theta: torch.Tensor, x: torch.Tensor):
        """(f [T, P, N, dout], backprop): backprop(delta) maps delta = d L / d f [T, P, N, dout] to
        d L / d theta [T, P, D], a reverse pass written out with ordinary differentiable tensor
        ops that reuses the forward pass's layer inputs (tested against autograd)."""
        f, layers, acts = self._forward(theta, x)

        def backprop(delta):
            grads = []
            for l in range(len(layers) - 1, -1, -1):
                W, _ = layers[l]
                grads.append(delta.sum(-2))                                       # d/db  [T, P, dout]
                grads.append(_matmul(acts[l].transpose(-1, -2), delta).flatten(-2))  # d/dW  [T, P, din*dout]
                if l > 0:  # through W, then through the ReLU: zero where its output is 0
                    delta = _matmul(delta, W.transpose(-1, -2)).masked_fill_(acts[l] <= 0, 0.0)  # [T, P, N, din]
            T, P = f.shape[:2]
            return torch.cat([g.expand(T, P, -1) for g in grads[::-1]], -1)      # [T, P, D]
        return f, backprop

    def init(self, gen: torch.Generator, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """A flat weight vector with PyTorch's nn.Linear default: U(-1/sqrt(fan_in), +)."""
        parts = []
        for a, b in self.shapes:
            bound = 1 / math.sqrt(a)
            parts.append((2 * torch.rand(a * b + b, generator=gen, dtype=dtype, device=device) - 1) * bound)
        return torch.cat(parts)  # [D]


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for batched [..., n, k] x [..., k, m]. A product of width 1 (k = 1, m = 1 or n = 1:
    the first and last layers when dx = dy = 1) is done as a broadcast product and sum, which
    is 3-16x faster on a CPU than a batched GEMM of width 1 (measured on [256, 8, 40] blocks)."""
    if a.shape[-1] == 1:
        return a * b                                           # outer product  [..., n, m]
    if b.shape[-1] == 1 or a.shape[-2] == 1:
        return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)     # [..., n, k, m] summed over k
    return torch.matmul(a, b)


def _affine(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h @ W + b for a layer's inputs h [T, 1 or P, N, din], weights W [T, P, din, dout] and biases
    b [T, P, dout], in one pass where a fused op exists: addcmul for din = 1 (the outer product of
    the first layer when dx = 1) and baddbmm for the particles' own inputs: in isolation 1.8x and
    1.2x faster on a CPU than a product followed by a separate bias pass (a few % of a whole
    predictive); tested against h @ W + b."""
    if h.shape[-1] == 1:
        return torch.addcmul(b.unsqueeze(-2), h, W)                               # [T, P, N, dout]
    if W.shape[-1] > 1 and h.shape[:-2] == W.shape[:-2]:
        T, P, N, k = h.shape
        return torch.baddbmm(b.reshape(T * P, 1, -1), h.reshape(T * P, N, k), W.reshape(T * P, k, -1)).view(T, P, N, -1)
    return _matmul(h, W).add_(b.unsqueeze(-2))                                   # [T, P, N, dout]


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
# Gaussian conditioning on padded point sets (the conjugate pieces: the Gaussian last layer of
# the "last" prior structure, and the Gaussian baselines of baselines.py)

def noisy_gram(K: torch.Tensor, mask: torch.Tensor, noise_var) -> torch.Tensor:
    """A = K + noise_var I on the real points and the identity on padded rows and columns, so
    that padding changes no determinant, solve or quadratic form: K [..., N, N], mask [..., N]."""
    N = K.shape[-1]
    eye = torch.eye(N, dtype=K.dtype, device=K.device)                  # [N, N]
    real = mask.unsqueeze(-1) & mask.unsqueeze(-2)                      # [..., N, N]
    return torch.where(real, K + noise_var * eye, eye)                  # [..., N, N]


def safe_cholesky(A: torch.Tensor, jitter: float = 0.0, what: str = "covariance") -> torch.Tensor:
    """Lower Cholesky factor of A [..., N, N]. With jitter > 0, jitter times the mean diagonal is
    added first, ten times more on each of three retries if a factor fails (a rank-deficient
    posterior covariance, e.g. at 64 targets under a rank-4 kernel). FloatingPointError naming
    `what` if no factor is found: never a NaN answer. One host sync per call: not for sampler
    loops."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)         # [N, N]
    scale = A.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp(min=1e-300)[..., None, None]  # [..., 1, 1]
    for k in range(4 if jitter > 0 else 1):
        L, info = torch.linalg.cholesky_ex(A + (jitter * 10 ** k) * scale * eye if jitter > 0 else A)
        if bool((info == 0).all() & torch.isfinite(L).all()):
            return L
    raise FloatingPointError(f"{what}: not positive definite (Cholesky failed"
                             f"{f' with jitter up to {jitter * 1e3:g} x its mean diagonal' if jitter > 0 else ''})")


def gaussian_log_evidence(L: torch.Tensor, r: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """sum over the columns of r of log N(r[:, j]; 0, A), A = L L^T [..., N, N] from noisy_gram
    (identity on padding), r [..., N, dy] zero on padding, counts [...] real points -> [...]."""
    return _log_evidence(L, r, torch.cholesky_solve(r, L), counts)


def _log_evidence(L, r, alpha, counts):
    """gaussian_log_evidence given alpha = A^-1 r as well."""
    logdet = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)             # log det A  [...]
    return -0.5 * (r * alpha).sum((-1, -2)) - 0.5 * r.shape[-1] * (logdet + counts * LOG_2PI)


class LastLayerPrior(NamedTuple):
    """The Gaussian (mixture) prior of the last layer W [H1, dy] (H1 = last hidden width + 1 for the
    bias): component j has weight pi_j and independent columns W[:, k] ~ N(mean_j[:, k], Sigma_j),
    Sigma_j = B_j B_j^T + diag exp(2 log_std_j): a rank-r part that couples the weights (the task
    latent z integrated out: W = mean + B z + residual) and a diagonal part."""
    mean: torch.Tensor      # [M, H1, dy]
    basis: torch.Tensor     # B [M, H1, r] (r = 0: no low-rank part)
    log_std: torch.Tensor   # [M, H1]
    log_mix: torch.Tensor   # log pi [M], normalized


def last_layer_evidence(Phi: torch.Tensor, ctx: Batch, prior: LastLayerPrior, noise_var, grad: bool = True):
    """The last layer integrated out exactly, given the hidden layers' outputs: y = Phi W + noise.

    Phi [T, P, N, H1] holds the last hidden layer's outputs and a 1 per point (zero on padded
    points). Per prior component, y[:, k] ~ N(Phi mean_j[:, k], A_j), A_j = Phi Sigma_j Phi^T +
    sigma_y^2 I (conjugacy [9, 10]); the mixture's evidence is a logsumexp over components.
    Returns (log p(C | hidden layers) [T, P], its gradient in Phi [T, P, N, H1], and the pieces
    that last_layer_draw reuses); grad=False returns None for the gradient and skips its products
    (a last-layer draw or a value alone needs none of them: the same numbers otherwise).
    Computed in float64 (the N x N factors are small); gradient per component, with alpha = A^-1 r and G = Phi Sigma:  alpha (mean^T + alpha^T G) - dy A^-1 G
    (tested against autograd), weighted by the components' posterior responsibilities.

    Written for speed: the particles are one batch TP = T * P, every product is one GEMM over
    all components (points outermost in G, so that no [TP, M, N, H1] tensor is ever permuted),
    and A_j^-1 is formed once (N is small) instead of solving for H1 right-hand sides. The value
    is tested against a loop over tasks, particles and components, the gradient against autograd."""
    _require(isinstance(grad, bool), "grad", "True or False", grad)
    T, P, N, H1 = Phi.shape
    M, dy = prior.mean.shape[0], prior.mean.shape[-1]
    Phi = Phi.double().reshape(T * P, N, H1)                                     # [TP, N, H1]
    mask = ctx.mask.repeat_interleave(P, 0)                                      # [TP, N]
    mean, basis = prior.mean.double(), prior.basis.double()                      # [M, H1, dy], [M, H1, r]
    Sigma = basis @ basis.transpose(-1, -2) + torch.diag_embed((2 * prior.log_std.double()).exp())  # [M, H1, H1]
    G = (Phi.reshape(-1, H1) @ Sigma.permute(1, 0, 2).reshape(H1, M * H1)).view(T * P, N * M, H1)  # Phi Sigma_j
    K = (G @ Phi.transpose(-1, -2)).view(T * P, N, M, N).transpose(1, 2)         # Phi Sigma_j Phi^T  [TP, M, N, N]
    L, _ = torch.linalg.cholesky_ex(noisy_gram(K, mask[:, None], torch.as_tensor(noise_var).double()))  # [TP, M, N, N]
    Linv = torch.linalg.solve_triangular(L, torch.eye(N, dtype=L.dtype, device=L.device), upper=False)  # [TP, M, N, N]
    Ainv = Linv.transpose(-1, -2) @ Linv                                         # A_j^-1  [TP, M, N, N]
    fit = (Phi.reshape(-1, H1) @ mean.permute(1, 0, 2).reshape(H1, M * dy)).view(T * P, N, M, dy)  # Phi mean_j
    res = (ctx.y.double().repeat_interleave(P, 0).unsqueeze(2) - fit) * mask[:, :, None, None]  # r_j  [TP, N, M, dy]
    alpha = Ainv @ res.transpose(1, 2)                                           # A_j^-1 r_j  [TP, M, N, dy]
    counts = mask.sum(-1, keepdim=True).double()                                 # [TP, 1]
    log_pj = prior.log_mix.double() + _log_evidence(L, res.transpose(1, 2), alpha, counts)  # [TP, M]
    resp = torch.softmax(log_pj, -1)                                             # [TP, M]
    pieces = (Ainv.view(T, P, M, N, N), G.view(T, P, N, M, H1).transpose(2, 3), resp.view(T, P, M))
    value = torch.logsumexp(log_pj, -1).view(T, P)                               # [T, P]
    if not grad:
        return value, None, pieces
    # the gradient, sum_j resp_j [alpha_j (mean_j^T + (Phi^T alpha_j)^T Sigma_j) - dy A_j^-1 G_j]
    u = Phi.transpose(-1, -2) @ alpha.transpose(1, 2).reshape(T * P, N, M * dy)  # Phi^T alpha_j  [TP, H1, M dy]
    uS = u.view(T * P, H1, M, dy).permute(2, 0, 3, 1).reshape(M, T * P * dy, H1) @ Sigma  # [M, TP dy, H1]
    C = mean.transpose(-1, -2) + uS.view(M, T * P, dy, H1).transpose(0, 1)     # [TP, M, dy, H1]
    ra = (resp[:, :, None, None] * alpha).permute(0, 2, 1, 3).reshape(T * P, N, M * dy)  # [TP, N, M dy]
    RA = (-dy * resp[:, :, None, None] * Ainv).permute(0, 2, 3, 1).reshape(T * P, N, N * M)  # [TP, N, N M]
    dPhi = torch.baddbmm(ra @ C.reshape(T * P, M * dy, H1), RA, G)              # [TP, N, H1]
    return value, dPhi.view(T, P, N, H1), pieces


def last_layer_draw(Phi: torch.Tensor, ctx: Batch, prior: LastLayerPrior, noise_var, pieces, gen: torch.Generator):
    """Exact posterior draws of the last layer given the hidden layers' outputs Phi [T, P, N, H1]
    and last_layer_evidence's pieces: a component j drawn by its posterior responsibility, a
    prior draw W0 of that component, and then Matheron's rule (pathwise conditioning [11]):
        W = W0 + Sigma_j Phi^T A_j^-1 (y - Phi W0 - eps),  eps ~ N(0, sigma_y^2 I),
    which has exactly the conditional Gaussian's mean and covariance. -> W [T, P, H1, dy] (float64)."""
    Ainv, G, resp = pieces
    T, P, M, N, H1 = G.shape
    if not bool(torch.isfinite(resp).all()):  # one host sync per draw, outside the sampler's loop
        raise FloatingPointError(f"last layer: its posterior is not finite at sigma_y = {float(noise_var) ** 0.5:g} "
                                 "(sigma_y too small for the data, or the model has diverged)")
    r, dy = prior.basis.shape[-1], prior.mean.shape[-1]
    dev = Phi.device
    j = torch.multinomial(resp.view(T * P, M), 1, generator=gen).view(T, P) if M > 1 else \
        torch.zeros(T, P, dtype=torch.long, device=dev)                         # [T, P]
    pick = lambda t: t[torch.arange(T, device=dev)[:, None], torch.arange(P, device=dev), j]  # noqa: E731
    z = randn((T, P, r + H1 + N, dy), gen, torch.float64, dev)                  # [T, P, r + H1 + N, dy]
    mean, basis, std = prior.mean.double()[j], prior.basis.double()[j], prior.log_std.double().exp()[j]
    W0 = mean + basis @ z[:, :, :r] + std.unsqueeze(-1) * z[:, :, r:r + H1]       # [T, P, H1, dy]
    eps = torch.as_tensor(noise_var).double().sqrt() * z[:, :, r + H1:]          # [T, P, N, dy]
    resid = (ctx.y.double().unsqueeze(1) - Phi.double() @ W0 - eps) * ctx.mask[:, None, :, None]  # [T, P, N, dy]
    return W0 + pick(G).transpose(-1, -2) @ (pick(Ainv) @ resid)                  # [T, P, H1, dy]


def skip_last_layer_draw(T: int, P: int, N: int, prior: LastLayerPrior, gen: torch.Generator) -> None:
    """Advance gen exactly as last_layer_draw would for [T, P] particles and N points, drawing nothing
    that is kept: its multinomial takes one exponential per probability whatever their values, then
    z is one float64 normal block (tested against the draw's own generator state)."""
    M, r, dy = prior.basis.shape[0], prior.basis.shape[-1], prior.mean.shape[-1]
    if M > 1:
        torch.multinomial(torch.ones(T * P, M, dtype=torch.float64, device=gen.device), 1, generator=gen)
    randn((T, P, r + prior.mean.shape[1] + N, dy), gen, torch.float64, gen.device)


# -----------------------------------------------------------------------------
# standard-normal draws for the large particle tensors

RNG_BLOCK = 1 << 18    # numbers per independently seeded block of a large CPU draw
LOG_SCALE_MAX = 3.0   # input scales stay within [e^-3, e^3] (a bound on the sampler's excursions)
SAMPLE_BLOCK = 256     # particles per block when a baseline (the NP) decodes many samples
PREDICT_BLOCK = 4096   # tasks x particles per block when LDVI predicts with many samples
_rng_pool: ThreadPoolExecutor | None = None


def randn(shape, gen: torch.Generator, dtype=torch.float32, device=None) -> torch.Tensor:
    """N(0, 1) draws of the given shape from gen, on gen's device (device, if given, must match).

    torch's CPU generator is one sequential stream: a [1024, 1761] draw takes longer than
    the BNN gradient. So a large CPU draw is cut into fixed blocks of RNG_BLOCK numbers,
    each filled from its own generator seeded from gen, on a pool of torch's intra-op
    thread count. The numbers depend on gen alone, never on the number of threads."""
    global _rng_pool
    if device is not None and torch.device(device).type != gen.device.type:
        raise ValueError(f"gen: expected a generator on {device}, got one on {gen.device}")
    n = math.prod(shape)
    if gen.device.type != "cpu" or n < 2 * RNG_BLOCK:
        return torch.randn(shape, generator=gen, dtype=dtype, device=gen.device)
    out = torch.empty(shape, dtype=dtype)
    blocks = out.view(-1).split(RNG_BLOCK)
    seeds = torch.randint(0, 2 ** 62, (len(blocks),), generator=gen).tolist()
    if _rng_pool is None:
        _rng_pool = ThreadPoolExecutor(max(1, torch.get_num_threads()))
    fill = lambda b, s: b.normal_(generator=torch.Generator().manual_seed(s))  # noqa: E731
    list(_rng_pool.map(fill, blocks, seeds))
    return out


# -----------------------------------------------------------------------------
# the Gaussian-exact Langevin kernels, in whitened coordinates u = (v - m) / s

def autograd_target(log_gamma: Callable) -> Callable:
    """Turn a log density v [T, P, D] -> [T, P] into a target returning (value, grad).

    The gradient is differentiable (create_graph) when grad mode is on, so the diffusion
    can be trained through it; under torch.no_grad() everything is detached."""
    def target(v):
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            th = v if (create_graph and v.requires_grad) else v.detach().requires_grad_(True)
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
    Gaussian exactness holds because there grad l = 0.

    Differentiated by hand (_Tame): autograd's own backward of the quotient takes about 12
    passes over the [T, P, D] state, the hand-written one 5 (tested against autograd)."""
    return _Tame.apply(score, torch.as_tensor(h, dtype=score.dtype, device=score.device))


class _Tame(torch.autograd.Function):
    """t = g q with q = 1 / (1 + h |g|):  dt/dg = q^2,  dt/dh = -g |g| q^2 = -t |t|."""

    @staticmethod
    def forward(ctx, g, h):
        q = torch.addcmul(torch.ones((), dtype=g.dtype, device=g.device), h, g.abs()).reciprocal_()  # [..]
        t = g * q                                                                              # [..]
        ctx.save_for_backward(q, t, h)
        return t

    @staticmethod
    def backward(ctx, grad):
        q, t, h = ctx.saved_tensors
        grad_g = grad * q * q if ctx.needs_input_grad[0] else None
        grad_h = (-(grad * t * t.abs())).sum_to_size(h.shape) if ctx.needs_input_grad[1] else None
        return grad_g, grad_h


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
    (value, grad l) pair there, which the next step reuses. score_fn = None ends a chain whose
    weight is not wanted: the second half kick changes only p, so it is skipped (value and
    score are then None)."""
    # (torch.addcmul(a, b, c) = a + b * c: one pass over the [T, P, D] state instead of two)
    kick, cos, sin = 0.5 * h * beta, torch.cos(h), torch.sin(h)   # scalars
    p_ref = torch.addcmul(c * p, torch.sqrt(1 - c * c), xi)        # p' = c p + sqrt(1 - c^2) xi
    p = torch.addcmul(p_ref, kick, field(score, h))                # half kick
    u, p = torch.addcmul(cos * u, sin, p), torch.addcmul(cos * p, -sin, u)  # exact rotation
    if score_fn is None:
        return u, p, p_ref, None, None
    value, score = score_fn(u)
    p = torch.addcmul(p, kick, field(score, h))                    # half kick
    return u, p, p_ref, value, score


def noise_count(kernel: str, K: int) -> int:
    """How many [T, P, D] standard-normal draws a diffusion of K steps uses after u0: one per
    step, plus the initial momentum for the underdamped kernel (none at K = 0)."""
    return K + (kernel == "underdamped" and K > 0)


def draw_noise(kernel: str, K: int, shape, gen: torch.Generator, dtype=torch.float32, device=None):
    """(u0 [T, P, D], noise [noise_count, T, P, D]) in one draw (the CPU draw is then large
    enough to be threaded, see randn)."""
    eps = randn((1 + noise_count(kernel, K), *shape), gen, dtype, device)  # [1 + n, T, P, D]
    return eps[0], eps[1:]


def diffusion(target: Callable, m, log_s, u0, steps, refresh, betas, noise, kernel: str = "underdamped",
              tamed: bool = True, weights: bool = True, drift_grad: bool = True):
    """Run the q0-preconditioned diffusion and return (v_K [T, P, D], log w [T, P]).

    target: v [T, P, D] -> (log gamma(v) [T, P], grad_v log gamma [T, P, D]),
            e.g. autograd_target(log_gamma). Gradients flow through the whole chain when
            grad mode is on (reparameterized noise); wrap in torch.no_grad() to sample only.
    m, log_s:  [T, D] mean and log std of q0;   u0: [T, P, D] standard-normal draws;
    steps h, refresh c, betas: [K] tensors (the overdamped kernel has no momentum and
                               ignores refresh, but its shape is still checked);
    noise: [noise_count(kernel, K), T, P, D] standard-normal draws, the sampler's only randomness
           (draw_noise makes u0 and noise): for the overdamped kernel one per step; for the
           underdamped one the initial momentum, then one refresh per step;
    tamed: drive the steps with tame(grad l, h_k) instead of grad l (see tame);
    weights: False returns (v_K, None): the same positions without the weight arithmetic and
             without the target evaluation at v_K, which only the weight needs (prediction);
    drift_grad: False detaches the score grad l wherever a step or a backward kernel uses it (its
                taming by h_k stays differentiable): v_K and log w are the same numbers, and their
                gradient treats each score as a constant (no product of the chain's Jacobians).

    log w = log gamma(v_K) - log q0(v_0) + (kernel correction), see MATH.md.
    A particle whose weight comes out NaN has diverged: it gets log w = -inf (zero weight).
    """
    _require(kernel in KERNELS, "kernel", f"one of {KERNELS}", kernel)
    for name, flag in (("tamed", tamed), ("weights", weights), ("drift_grad", drift_grad)):
        _require(isinstance(flag, bool), name, "True or False", flag)
    _require(u0.dim() == 3 and m.shape == log_s.shape == (u0.shape[0], u0.shape[2]),
             "u0/m/log_s", "u0 [T, P, D] with m and log_s [T, D]", (u0.shape, m.shape, log_s.shape))
    T, P, D = u0.shape
    K = steps.shape[0] if steps.dim() == 1 else -1
    _require(K >= 0 and betas.shape == (K,) and refresh.shape == (K,), "steps/refresh/betas",
             "three 1-d tensors of one length K", (tuple(steps.shape), tuple(refresh.shape), tuple(betas.shape)))
    _require(noise.shape == (noise_count(kernel, K), T, P, D), "noise",
             f"a tensor of shape [noise_count(kernel, K), T, P, D] = {[noise_count(kernel, K), T, P, D]}",
             tuple(noise.shape))
    if K:  # one check per call, not per step
        h_ok = (steps > 0).all() if kernel == "overdamped" else (steps >= 0).all()
        _require(bool(h_ok & torch.isfinite(steps).all()), "steps",
                 "finite step sizes, > 0 (overdamped) or >= 0 (underdamped)", steps.tolist())
        _require(bool(((refresh >= 0) & (refresh < 1)).all()), "refresh", "factors in [0, 1)", refresh.tolist())
        _require(bool(((betas > 0) & (betas <= 1 + 1e-6)).all()), "betas", "values in (0, 1]", betas.tolist())
    s = torch.exp(log_s).unsqueeze(1)  # [T, 1, D]

    def score_fn(u):  # log gamma(m + s u) [T, P] and grad_u l(u) = s * grad_v log gamma + u
        value, grad = target(torch.addcmul(m.unsqueeze(1), s, u))
        return value, torch.addcmul(u, s, grad)

    drift = tame if tamed else untamed
    field = drift if drift_grad else (lambda score, h: drift(score.detach(), h))  # noqa: E731
    value, score = score_fn(u0) if (K or weights) else (None, None)
    u = u0
    log_w = 0.5 * _sq(u0) + 0.5 * D * LOG_2PI + log_s.sum(-1, keepdim=True) if weights else None  # -log q0 [T, P]
    if kernel == "overdamped":
        for k in range(K):
            eps = noise[k]  # [T, P, D]
            a = torch.exp(-steps[k])
            u_new = overdamped_step(u, field(score, steps[k]), betas[k], steps[k], eps)
            if weights or k < K - 1:
                value, score = score_fn(u_new)
            if weights:
                back_mean = a * u_new + (1 - a) * betas[k] * field(score, steps[k])       # [T, P, D]
                # log B_k(u | u') - log F_k(u' | u); the Gaussian normalizers cancel
                log_w = log_w - _sq(u - back_mean) / (2 * (1 - a * a)) + 0.5 * _sq(eps)
            u = u_new
    elif K:  # underdamped (at K = 0 no momentum is drawn: both kernels are then one method)
        p = noise[0]  # [T, P, D]
        for k in range(K):
            last = not weights and k == K - 1  # no target evaluation at the end of an unweighted chain
            u, p, p_ref, value, score = underdamped_step(u, p, score, betas[k], steps[k], refresh[k], noise[k + 1],
                                                         None if last else score_fn, field)
            if weights:
                log_w = log_w - 0.5 * (_sq(p) - _sq(p_ref))
    v = torch.addcmul(m.unsqueeze(1), s, u)  # [T, P, D]
    if not weights:
        return v, None
    log_w = log_w + value
    return v, torch.where(torch.isnan(log_w), -torch.inf, log_w)  # [T, P, D], [T, P]


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
# model files: save(path) and cls.load(path) (the functions are in the machinery at the end)

class SaveLoad:
    """save(path) / cls.load(path) for a module with a dataclass `cfg` and a Config class: one file per
    model with its config, read back with torch.load(weights_only=True) (save_model, load_model)."""

    def save(self, path: str, **meta: float) -> None:
        """Write {method, config, state_dict, meta} whole or not at all (meta: e.g. train_s=...)."""
        save_model(self, path, **meta)

    @classmethod
    def load(cls, path: str, device="cpu"):
        return load_model(cls, path, device)

    read = staticmethod(lambda path: read_model_file(path))  # the saved dict, for tools that inspect files


# -----------------------------------------------------------------------------
# the model: meta-learned prior, likelihood, amortized q0 and learned diffusion

class LDVIMeta(SaveLoad, nn.Module):
    """Amortized LDVI for a BNN whose meta-learned prior has an r-dimensional task latent."""
    Config = LDVIConfig

    def __init__(self, cfg: LDVIConfig, gen: torch.Generator):
        super().__init__()
        _require(isinstance(cfg, LDVIConfig), "cfg", "an LDVIConfig", cfg)
        check_generator(gen)
        self.cfg = cfg
        self.bnn = BNN(cfg.dx, cfg.dy, cfg.hidden)
        D, K, r = self.bnn.n_params, cfg.K, cfg.latent
        if cfg.structure == "last":
            self._init_last_layer_prior(gen)
            D, r = self.n_latent or self.feature_bnn.n_params, 0  # the state: (z_h, z_s), or the hidden layers' weights
        else:
            self.prior_mean = nn.Parameter(self.bnn.init(gen))                            # mu [D]
            self.prior_log_std = nn.Parameter(torch.full((D,), math.log(cfg.prior_std_init)))  # log sigma [D]
        if r:
            self.basis = nn.Parameter(cfg.latent_init * torch.randn(D, r, generator=gen))  # B [D, r]
        self.register_buffer("log_sigma_y", torch.tensor(math.log(cfg.sigma_y)))  # fixed: set it to the data's
        self.encoder = SetEncoder(cfg.dx, cfg.dy, r + D, gen, cfg.enc_hidden, cfg.enc_dim)
        inv_softplus = lambda v: math.log(math.expm1(v))  # noqa: E731
        self.raw_steps = nn.Parameter(torch.full((K,), inv_softplus(cfg.step_init)))
        self.raw_refresh = nn.Parameter(torch.full((K,), math.log(cfg.refresh_init / (1 - cfg.refresh_init))
                                                   if cfg.refresh_init > 0 else -20.0))
        self.raw_betas = nn.Parameter(torch.zeros(K))  # equal increments: beta_k = k / K

    def _init_last_layer_prior(self, gen):
        """structure = "last": the hidden layers' weights theta_h ~ N(mu_h, diag sigma_l^2), one sigma_l
        per layer, and a Gaussian (mixture) prior over the last layer (LastLayerPrior). Component 0
        starts at the network's own initial last layer, the others at other draws of it."""
        cfg = self.cfg
        H1, M = cfg.hidden[-1] + 1, cfg.components
        self.feature_bnn = BNN(cfg.dx, cfg.hidden[-1], cfg.hidden[:-1])           # the hidden layers alone
        Dh = self.feature_bnn.n_params
        inits = [self.bnn.init(gen) for _ in range(M)]                           # [D] each
        self.prior_mean = nn.Parameter(inits[0][:Dh])                            # mu_h [Dh]
        sizes = [a * b + b for a, b in self.feature_bnn.shapes]                   # weights per hidden layer
        if cfg.hidden_latent:  # B_h [Dh, r_h], each layer's rows at that layer's init scale 1/sqrt(fan_in)
            scale = torch.cat([torch.full((n,), 1 / math.sqrt(a)) for n, (a, _) in zip(sizes, self.feature_bnn.shapes)])
            self.hidden_basis = nn.Parameter(cfg.hidden_latent_init * scale[:, None]
                                             * torch.randn(Dh, cfg.hidden_latent, generator=gen))  # [Dh, r_h]
            if cfg.input_scale:  # log tau_i, the prior std of input i's log length-scale: learned, or fixed
                log_tau = torch.full((cfg.dx,), math.log(cfg.input_scale))              # [dx]
                if cfg.learn_input_scale:
                    self.input_log_scale = nn.Parameter(log_tau)
                else:
                    self.register_buffer("input_log_scale", log_tau)
        else:
            log_h = torch.full((len(cfg.hidden),), math.log(cfg.hidden_std))    # log sigma_l per hidden layer
            self.register_buffer("hidden_log_std", log_h)
            self.register_buffer("layer_sizes", torch.tensor(sizes), persistent=False)
        self.last_mean = nn.Parameter(torch.stack([self.last_matrix(w[Dh:]) for w in inits]))  # [M, H1, dy]
        self.last_log_std = nn.Parameter(torch.full((M, H1), math.log(cfg.prior_std_init)))    # [M, H1]
        self.last_basis = nn.Parameter(cfg.latent_init * torch.randn(M, H1, cfg.latent, generator=gen))  # [M, H1, r]
        logits = torch.zeros(M)                                                  # log pi up to a constant
        self.mix_logits = nn.Parameter(logits)

    def last_matrix(self, w: torch.Tensor) -> torch.Tensor:
        """The last layer's flat weights [..., H dy + dy] (the BNN's layout: W, then b) as [..., H + 1, dy]."""
        H, dy = self.cfg.hidden[-1], self.cfg.dy
        return torch.cat([w[..., :H * dy].unflatten(-1, (H, dy)), w[..., H * dy:].unsqueeze(-2)], -2)

    def last_prior(self) -> LastLayerPrior:
        return LastLayerPrior(self.last_mean, self.last_basis, self.last_log_std, F.log_softmax(self.mix_logits, 0))

    def _design(self, pre: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Phi [T, P, N, H + 1]: the last hidden layer's outputs relu(pre) and a 1, zero on padding."""
        ones = torch.ones_like(pre[..., :1])                                     # [T, P, N, 1]
        return torch.cat([F.relu(pre), ones], -1) * mask[:, None, :, None]      # [T, P, N, H + 1]

    @property
    def n_latent(self) -> int:
        """Dimension of the hidden latent's state (z_h, z_s): r_h, plus dx with input scales (0: none)."""
        cfg = self.cfg
        return cfg.hidden_latent + (cfg.dx if cfg.input_scale else 0)

    def _input_scales(self, v: torch.Tensor):
        """The task's scale of each input's first-layer weights, exp(c tanh(tau_i z_s,i / c)) [T, P, dx, 1]
        (about exp(tau_i z_s,i), but never beyond e^+-c, c = LOG_SCALE_MAX: a sampler's excursion cannot
        overflow the features), and the derivative of its log in z_s [T, P, dx]."""
        tau = self.input_log_scale.exp()                                         # [dx]
        t = torch.tanh(v[..., self.cfg.hidden_latent:] * (tau / LOG_SCALE_MAX))  # [T, P, dx]
        scale = torch.exp(LOG_SCALE_MAX * t)                                     # [T, P, dx]
        return scale.unsqueeze(-1), tau * (1 - t * t)

    def hidden_weights(self, v: torch.Tensor) -> torch.Tensor:
        """The hidden layers' weights theta_h [T, P, Dh] of states v [T, P, .]: v itself, or with a hidden
        latent (r_h > 0) mu_h + B_h z_h, whose first-layer weights of input i are then scaled by
        _input_scales if there are input scales (a task-level length-scale per input: the
        network's function of x becomes its function of x * scale)."""
        cfg = self.cfg
        if not cfg.hidden_latent:
            return v
        T, P, r = *v.shape[:2], cfg.hidden_latent
        z_h = v[..., :r].reshape(T * P, r)                                       # [TP, r_h]
        theta = torch.addmm(self.prior_mean, z_h, self.hidden_basis.T).view(T, P, -1)  # [T, P, Dh]
        if not cfg.input_scale:
            return theta
        n1 = cfg.dx * cfg.hidden[0]                                              # first-layer weights W_1 [dx, H_1]
        W1 = theta[..., :n1].unflatten(-1, (cfg.dx, cfg.hidden[0])) * self._input_scales(v)[0]  # [T, P, dx, H_1]
        return torch.cat([W1.flatten(-2), theta[..., n1:]], -1)                  # [T, P, Dh]

    def _hidden_latent_grad(self, v: torch.Tensor, theta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The gradient in the state (z_h, z_s) [T, P, r_h (+ dx)] from g = d L / d theta_h [T, P, Dh], with
        theta = hidden_weights(v): B_h^T (g, with W_1's part times the scales), and for z_s,i
        d log s_i / d z_s,i * sum_j g_W1[i, j] W1[i, j] (W1 scaled)."""
        cfg = self.cfg
        if not cfg.input_scale:
            # (B_h^T laid out contiguously: this skinny product is then 3-5x faster on a CPU)
            return g @ self.hidden_basis.T.contiguous().T                        # B_h^T g  [T, P, r_h]
        n1, shape = cfg.dx * cfg.hidden[0], (cfg.dx, cfg.hidden[0])
        scale, dlog = self._input_scales(v)                                      # [T, P, dx, 1], [T, P, dx]
        gW1 = g[..., :n1].unflatten(-1, shape)                                   # [T, P, dx, H_1]
        g_s = (gW1 * theta[..., :n1].unflatten(-1, shape)).sum(-1) * dlog        # [T, P, dx]
        g0 = torch.cat([(gW1 * scale).flatten(-2), g[..., n1:]], -1)             # d L / d (mu_h + B_h z_h)
        return torch.cat([g0 @ self.hidden_basis.T.contiguous().T, g_s], -1)   # [T, P, r_h + dx]

    def _collapsed(self, v: torch.Tensor, ctx: Batch):
        """structure = "last": log p(C | theta_h) with the last layer integrated out [T, P], its
        gradient in theta_h [T, P, Dh] (the BNN's written-out backprop from the design's gradient),
        and what last_layer_draw needs (Phi and the factors)."""
        theta = self.hidden_weights(v)                                           # [T, P, Dh]
        pre, backprop = self.feature_bnn.forward_and_backprop(theta, ctx.x)     # [T, P, N, H]
        Phi = self._design(pre, ctx.mask)                                        # [T, P, N, H + 1]
        ll, dPhi, pieces = last_layer_evidence(Phi, ctx, self.last_prior(), self.sigma_y ** 2)
        g = backprop(dPhi[..., :-1].to(pre.dtype).masked_fill(pre <= 0, 0.0))  # through the ReLU: [T, P, Dh]
        if self.cfg.hidden_latent:
            g = self._hidden_latent_grad(v, theta, g)                            # [T, P, r_h (+ dx)]
        return ll.to(v.dtype), g, (Phi, pieces)

    def context_loglik(self, v: torch.Tensor, ctx: Batch) -> torch.Tensor:
        """log p(C | v) [T, P] for states v: the BNN's likelihood ("all"), or the evidence with the
        last layer integrated out ("last")."""
        if self.cfg.structure == "last":
            pre = self.feature_bnn(self.hidden_weights(v), ctx.x)                # [T, P, N, H]
            return last_layer_evidence(self._design(pre, ctx.mask), ctx, self.last_prior(),
                                       self.sigma_y ** 2, grad=False)[0].to(v.dtype)
        return gaussian_loglik(self.bnn(self.theta(v), ctx.x), ctx.y, ctx.mask, self.sigma_y)

    def weights(self, v: torch.Tensor, ctx: Batch, gen: torch.Generator) -> torch.Tensor:
        """The BNN weights theta [T, P, D] of states v [T, P, .] given the context: theta(v) ("all"), or
        the hidden layers v with a last layer drawn from its exact conditional posterior ("last")."""
        if self.cfg.structure != "last":
            return self.theta(v)
        v = self.hidden_weights(v)                                               # [T, P, Dh]
        pre = self.feature_bnn(v, ctx.x)                                         # [T, P, N, H]
        Phi = self._design(pre, ctx.mask)                                        # [T, P, N, H + 1]
        prior, noise_var = self.last_prior(), self.sigma_y ** 2
        pieces = last_layer_evidence(Phi, ctx, prior, noise_var, grad=False)[2]
        W = last_layer_draw(Phi, ctx, prior, noise_var, pieces, gen).to(v.dtype)  # [T, P, H + 1, dy]
        H = self.cfg.hidden[-1]
        return torch.cat([v, W[..., :H, :].flatten(-2), W[..., H, :]], -1)      # [T, P, D]

    def prior_weights(self, T: int, P: int, gen: torch.Generator) -> torch.Tensor:
        """P BNN weight vectors theta [T, P, D] per task drawn from the meta-learned prior."""
        x = self.prior_mean.new_zeros(T, 1, self.cfg.dx)
        empty = Batch(x, x.new_zeros(T, 1, self.cfg.dy), torch.zeros(T, 1, dtype=torch.bool, device=x.device))
        return self.weights(self.sample_prior(T, P, gen), empty, gen)

    # --- the learned kernel parameters
    def schedule(self):
        """(steps h_k > 0, refresh c_k in (0, 1), betas 0 < beta_1 <= ... <= beta_K = 1)."""
        inc = F.softplus(self.raw_betas)  # [K]
        return F.softplus(self.raw_steps), torch.sigmoid(self.raw_refresh), inc.cumsum(0) / inc.sum()

    @property
    def sigma_y(self) -> torch.Tensor:
        return self.log_sigma_y.exp()

    # --- the prior over the state v = (z, theta_res) and the map v -> theta = B z + theta_res
    def state_prior(self):
        """Mean and log std [r + D] of the diagonal prior over v: N(0, I_r) x N(mu, diag sigma^2);
        structure = "last": over the hidden layers' weights, N(mu_h, diag sigma_l^2) [Dh]."""
        if self.cfg.structure == "last":
            if self.cfg.hidden_latent:
                zeros = self.prior_mean.new_zeros(self.n_latent)                 # (z_h, z_s) ~ N(0, I)
                return zeros, zeros
            return self.prior_mean, self.hidden_log_std.repeat_interleave(self.layer_sizes)
        zeros = self.prior_mean.new_zeros(self.cfg.latent)
        return torch.cat([zeros, self.prior_mean]), torch.cat([zeros, self.prior_log_std])

    def theta(self, v: torch.Tensor, basis_t: torch.Tensor | None = None) -> torch.Tensor:
        """BNN weights theta = B z + theta_res [..., D] from states v [..., r + D].

        basis_t: B^T as a contiguous [r, D] tensor, if the caller has made it already. (One
        fused addmm with a contiguous B^T is 1.8x faster, backward included, than
        theta_res + phi @ B.T on a [256, 8] x [8, 1761] product: skinny GEMMs are slow.)"""
        r = self.cfg.latent
        if r == 0:
            return v
        basis_t = self.basis.T.contiguous() if basis_t is None else basis_t      # [r, D]
        D = basis_t.shape[1]
        return torch.addmm(v[..., r:].reshape(-1, D), v[..., :r].reshape(-1, r), basis_t).view(*v.shape[:-1], D)

    def sample_prior(self, T: int, P: int, gen: torch.Generator):
        """P states per task from the prior: v [T, P, r + D] (with the linear map of z, theta(v) has
        covariance B B^T + diag sigma^2)."""
        mean, log_std = self.state_prior()
        return mean + log_std.exp() * randn((T, P, mean.shape[0]), gen, mean.dtype, mean.device)  # [T, P, r + D]

    # --- the target gamma(v) = p(v) p(C | theta(v)) with its analytic score
    def log_joint(self, v: torch.Tensor, ctx: Batch) -> torch.Tensor:
        """log p(v) + log p(C | theta(v)) [T, P], written plainly (the reference for target)."""
        mean, log_std = self.state_prior()
        return diag_normal_logpdf(v, mean, log_std) + self.context_loglik(v, ctx)

    def target(self, ctx: Batch) -> Callable:
        """v -> (log gamma(v), grad_v log gamma). The likelihood's gradient in theta is the BNN's
        written-out backprop g, and J^T g = (B^T g, g): no extra backward pass for the latent."""
        last = self.cfg.structure == "last"
        r = 0 if last else self.cfg.latent
        mean, log_std = self.state_prior()                          # [r + D]
        log_norm = -log_std.sum() - 0.5 * mean.shape[0] * LOG_2PI
        prec = torch.exp(-2 * log_std)                              # [r + D]

        basis_t = self.basis.T.contiguous() if r else None                 # B^T [r, D], made once

        def value_and_grad(v):
            if last:  # the last layer integrated out: a likelihood of the hidden layers alone
                ll, g, _ = self._collapsed(v, ctx)                               # [T, P], [T, P, Dh]
            else:
                ll, g = self.bnn.loglik_and_grad(self.theta(v, basis_t), ctx, self.sigma_y)  # [T, P], [T, P, D]
            if r:
                g = torch.cat([g @ basis_t.T, g], -1)                            # J^T g = (B^T g, g)  [T, P, r + D]
            d = v - mean                                                         # [T, P, r + D]
            d_prec = d * prec                                                    # = -grad log prior
            log_prior = log_norm - 0.5 * torch.linalg.vecdot(d, d_prec)          # [T, P]
            return log_prior + ll, g - d_prec
        return value_and_grad

    def q0(self, ctx: Batch):
        """Mean m [T, r + D] and log std [T, r + D] of the amortized initial distribution."""
        dm, dlogs = self.encoder(ctx)
        mean, log_std = self.state_prior()
        return mean + dm, log_std + dlogs

    def check(self, batch, name: str = "context") -> Batch:
        return check_compatible(batch, self.cfg.dx, self.cfg.dy, self.prior_mean, name)

    def fit(self, data: Batch, gen: torch.Generator) -> list:
        """Meta-train (the interface shared with the baselines)."""
        return meta_train(self, data, check_generator(gen, self.prior_mean))

    # --- sampling, bounds and prediction
    def sample(self, ctx: Batch, P: int, gen: torch.Generator):
        """P particles per task from the diffusion started at q0(. | C): (theta [T, P, D], log w [T, P]).

        Differentiable end to end in grad mode; call under torch.no_grad() to sample only."""
        ctx = self.check(ctx)
        P, gen = check_samples(P, "P"), check_generator(gen, self.prior_mean)
        return self._sample(ctx, P, gen)

    def _sample(self, ctx: Batch, P: int, gen: torch.Generator, weights: bool = True):
        """(theta [T, P, D], log w [T, P] or None): _states, then each particle's weights."""
        v, log_w = self._states(ctx, P, gen, weights)
        return self.weights(v, ctx, gen), log_w

    def _states(self, ctx: Batch, P: int, gen: torch.Generator, weights: bool = True):
        """(states v [T, P, Dv], log w [T, P] or None). A task without context points gets exact draws
        from the prior and log w = 0 (= log p(empty set)): no encoder, no diffusion."""
        prior_m, prior_ls = self.state_prior()                                   # [Dv]
        T, Dv = ctx.x.shape[0], prior_m.shape[0]
        empty = ctx.counts == 0                                                  # [T]
        if bool(empty.all()):  # nothing to condition on (one host sync per call, not per step)
            v = self.sample_prior(T, P, gen)                                     # [T, P, Dv]
            return v, v.new_zeros(T, P) if weights else None
        m, log_s = self.q0(ctx)                                                  # [T, Dv]
        m, log_s = torch.where(empty[:, None], prior_m, m), torch.where(empty[:, None], prior_ls, log_s)
        u0, noise = draw_noise(self.cfg.kernel, self.cfg.K, (T, P, Dv), gen, m.dtype, m.device)  # [T, P, Dv]
        steps, refresh, betas = self.schedule()
        v, log_w = diffusion(self.target(ctx), m, log_s, u0, steps, refresh, betas, noise, self.cfg.kernel,
                             tamed=True, weights=weights, drift_grad=self.cfg.drift_grad)
        e = empty[:, None, None]                                                 # [T, 1, 1]
        v = torch.where(e, torch.addcmul(m.unsqueeze(1), log_s.exp().unsqueeze(1), u0), v)  # the prior's own draw
        if weights:
            log_w = torch.where(e[..., 0], 0.0, log_w)
        return v, log_w

    def predictive(self, ctx: Batch, x_target: torch.Tensor, S: int, gen: torch.Generator):
        """Predictive mixture for the targets: means [T, S, M, dy] and the noise std.

        The S particles are independent, so they are drawn in blocks of PREDICT_BLOCK // T per
        task (at least one), which bounds the memory of a call with many tasks. One task's
        1024 particles are then one block: 1.34x faster than four blocks of 256 in the
        benchmark's evaluation (2 workers, every context size; each op of a 256-particle
        block is small enough that its fixed cost shows)."""
        ctx = self.check(ctx)
        x_target, S = check_inputs(x_target, ctx, self.cfg.dx), check_samples(S)
        check_generator(gen, self.prior_mean)
        block = max(1, PREDICT_BLOCK // ctx.x.shape[0])                           # particles per block
        with torch.no_grad():
            mean = torch.cat([self.bnn(self._sample(ctx, min(block, S - s), gen, weights=False)[0], x_target)
                              for s in range(0, S, block)], 1)                       # [T, S, M, dy]
            return finite(mean, "LDVI predictive"), self.sigma_y

    def loss(self, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        """Negative mean ELBO (or IW bound) over a random context subset of each task."""
        ctx = random_subset(batch, gen, self.cfg.min_context)
        _, log_w = self._states(ctx, self.cfg.particles, gen)                   # [T, P]
        if self.cfg.structure == "last":  # the bound needs no last-layer draws (3.8% of training time), but
            # the generator moves as if they were made: the committed results stay reproducible bit for bit
            T, N = ctx.mask.shape
            skip_last_layer_draw(T, self.cfg.particles, N, self.last_prior(), gen)
        return -elbo(log_w).mean()


# -----------------------------------------------------------------------------
# evaluation: the same two numbers for every method

def _check_prediction(mean, target: Batch):
    target = check_batch(target, "target")
    T, M, dy = target.y.shape
    if not isinstance(mean, torch.Tensor) or mean.dim() != 4 or mean.shape[0] != T or mean.shape[2:] != (M, dy):
        got = tuple(mean.shape) if isinstance(mean, torch.Tensor) else type(mean).__name__
        raise ValueError(f"mean: expected a tensor of shape [T, S, M, dy] = [{T}, S, {M}, {dy}], got {got}")
    if not torch.isfinite(mean).all():
        raise ValueError("mean: NaN or inf in the predictive means")
    return target


def log_predictive(mean, std, target: Batch) -> torch.Tensor:
    """Per-task log marginal predictive likelihood of an equal-weight mixture [T]:
    logsumexp_s sum_n log N(y_n; mean_s(x_n), std_s^2) - log S, mean [T, S, M, dy]."""
    target = _check_prediction(mean, target)
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    if not (torch.isfinite(std).all() and (std > 0).all()):
        raise ValueError("std: expected finite predictive standard deviations > 0")
    ll = gaussian_loglik(mean, target.y, target.mask, std)  # [T, S]
    return torch.logsumexp(ll, -1) - math.log(mean.shape[1])


def mse(mean, target: Batch) -> torch.Tensor:
    """Per-task mean squared error of the mixture mean over the real target points [T]."""
    target = _check_prediction(mean, target)
    err = (mean.mean(1) - target.y).square().mean(-1)  # [T, M]
    return (err * target.mask).sum(-1) / target.counts.clamp(min=1)


# -----------------------------------------------------------------------------
# meta-training

def meta_train(model: LDVIMeta, data: Batch, gen: torch.Generator, iters: int | None = None,
               name: str | None = None) -> list:
    """Maximize the mean ELBO over random context subsets of the meta-training tasks. `name` heads
    the progress lines (default: the kernel, K and r)."""
    cfg = model.cfg
    _require(name is None or isinstance(name, str), "name", "None or a str", name)
    _require(iters is None or (_is_int(iters) and iters >= 0), "iters", "None (the config's) or an integer >= 0", iters)
    data = check_training_data(data, cfg.dx, cfg.dy, model.prior_mean, cfg.min_context)
    iters = cfg.iters if iters is None else iters
    model.skipped_updates = []  # iterations whose update train_loop skipped (non-finite gradient)
    return train_loop(model.parameters(),
                      lambda it: model.loss(task_minibatch(data, cfg.tasks_per_batch, gen), gen),
                      iters, cfg.lr, cfg.clip, cfg.log_every, name or f"ldvi-{cfg.kernel}-K{cfg.K}-r{cfg.latent}",
                      cfg.lr_final, model.skipped_updates)


def select_config(configs, data: Batch, gen: torch.Generator, holdout: float = 0.25, contexts=(1, 2, 4, 8),
                  S: int = 256, workers: int | None = None):
    """Model selection on held-out meta-training tasks: (index of the best config, scores [len(configs)]).

    A random `holdout` share of the tasks is set aside; each config is meta-trained on the rest
    (the same initialization and training seeds for every config) and scored by the mean over the
    held-out tasks and n in `contexts` of the log predictive of all the task's points given its
    first n (the benchmark's estimator with S draws). Unlike the training objective, this asks
    what a config does on tasks it has not seen: on 64 tasks the ELBO prefers no input scale even
    for a family whose frequency varies, where the held-out predictive prefers one.

    The configs are trained side by side on `workers` threads (default: torch's thread count)
    with one intra-op thread each (parallel_map): the scores do not depend on `workers`."""
    _require(isinstance(configs, (list, tuple)) and len(configs) >= 1
             and all(isinstance(c, LDVIConfig) for c in configs), "configs", "a non-empty list of LDVIConfig", configs)
    _require(_is_real(holdout) and 0 < holdout < 1, "holdout", "a number in (0, 1)", holdout)
    _require(isinstance(contexts, (list, tuple)) and len(contexts) >= 1 and all(_is_int(n) and n >= 0 for n in contexts),
             "contexts", "a non-empty list of integers >= 0", contexts)
    _require(workers is None or (_is_int(workers) and workers >= 1), "workers", "None or an integer >= 1", workers)
    S, gen = check_samples(S), check_generator(gen)
    like = torch.zeros((), device=check_batch(data, "data").x.device)           # the models are float32
    for cfg in configs:
        data = check_training_data(data, cfg.dx, cfg.dy, like, cfg.min_context)
    T = data.x.shape[0]
    n_hold = max(1, round(holdout * T))
    _require(T - n_hold >= 1, "data", f"at least 2 tasks to hold {holdout:g} of them out", T)
    _require(max(contexts) <= int(data.counts.min()), "contexts",
             f"context sizes <= the fewest points of a task ({int(data.counts.min())})", contexts)
    order = torch.randperm(T, generator=gen, device=gen.device).to(data.x.device)  # [T]
    train, held = (Batch(*(t[idx] for t in data)) for idx in (order[n_hold:], order[:n_hold]))
    seeds = torch.randint(2 ** 62, (3,), generator=gen, device=gen.device).tolist()  # init, training, evaluation
    dev = data.x.device

    def score(i):
        cfg = configs[i]
        model = LDVIMeta(cfg, torch.Generator().manual_seed(seeds[0])).to(dev)
        meta_train(model, train, torch.Generator(device=dev).manual_seed(seeds[1]),
                   name=f"select_config {i + 1}/{len(configs)}")                # its progress lines say which
        g_eval = torch.Generator(device=dev).manual_seed(seeds[2])
        lp = [log_predictive(*model.predictive(first_n(held, n), held.x, S, g_eval), held) for n in contexts]  # [T_hold]
        return torch.stack(lp).mean().item()
    scores = list(parallel_map(score, range(len(configs)), workers or torch.get_num_threads(), dev))
    return max(range(len(configs)), key=scores.__getitem__), scores


def design_candidates(cfg: LDVIConfig, scale: float = 0.5, long_iters: int | None = None) -> dict:
    """The four designs that select_design chooses between, by name: {no input scale, input scales
    fixed at `scale`} x {cfg.iters, long_iters (default 2 cfg.iters)} iterations, all with K = 0."""
    _require(isinstance(cfg, LDVIConfig), "cfg", "an LDVIConfig", cfg)
    _require(cfg.structure == "last" and cfg.hidden_latent > 0, "cfg",
             "a config with structure = 'last' and hidden_latent > 0 (input scales act on the hidden latent)",
             f"structure={cfg.structure!r}, hidden_latent={cfg.hidden_latent}")
    _require(_is_real(scale) and 0 < scale < math.inf, "scale", "a finite number > 0 (the fixed tau)", scale)
    long_iters = 2 * cfg.iters if long_iters is None else long_iters
    _require(_is_int(long_iters) and long_iters >= 1 and long_iters != cfg.iters, "long_iters",
             f"an integer >= 1 other than cfg.iters = {cfg.iters}", long_iters)
    fast = dict(K=0, drift_grad=LDVIConfig.drift_grad)   # the choice is made at K = 0: a third of the cost
    out = {}
    for iters in (cfg.iters, long_iters):
        out[f"no scale, {iters} iters"] = replace(cfg, **fast, input_scale=0.0, learn_input_scale=True, iters=iters)
        out[f"scale {scale:g}, {iters} iters"] = replace(cfg, **fast, input_scale=float(scale),
                                                         learn_input_scale=False, iters=iters)
    return out


def select_design(cfg: LDVIConfig, data: Batch, gen: torch.Generator, scale: float = 0.5,
                  long_iters: int | None = None, contexts=(1, 2, 4, 8)) -> tuple:
    """cfg with its input scale and training length chosen on held-out meta-training tasks:
    (the chosen config, {"chosen": name, "scores": {name: held-out score}}).

    The held-out predictive (select_config, at the given context sizes) of the four
    design_candidates decides; they are trained at K = 0, and the winner's input_scale,
    learn_input_scale and iters are set in cfg, whose K and kernel are kept. Why: on 64 meta-training tasks the training objective
    itself never asks for an input scale (it prefers hidden-layer directions that cover the
    training tasks), while tasks it has not seen tell whether the features must stretch from
    task to task; and how long to train before overfitting is a property of the data set too."""
    candidates = design_candidates(cfg, scale, long_iters)
    chosen, scores = select_config(list(candidates.values()), data, gen, contexts=contexts)
    name = list(candidates)[chosen]
    pick = candidates[name]
    out = replace(cfg, input_scale=pick.input_scale, learn_input_scale=pick.learn_input_scale, iters=pick.iters)
    return out, dict(chosen=name, scores=dict(zip(candidates, scores)))


# =============================================================================
# THE MACHINERY. Everything below is what the method and the benchmark's baselines share and a
# reader of the method can skip:
#   - argument checks: every error names the argument and says what was expected;
#   - task batches: padded [T, N, dx] / [T, N, dy] tensors with a boolean mask [T, N], their
#     validation (make_batch), and context subsets (first_n, random_subset);
#   - model files: save / load with the config, written whole or not at all;
#   - the training loop: Adam with gradient clipping, a cosine learning-rate decay, NaN
#     detection, and minibatches of meta-training tasks.
# =============================================================================

# -----------------------------------------------------------------------------
# argument checks: every error names the argument and says what was expected

def _require(ok: bool, name: str, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {got!r}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


# (predicate, what it expects) pairs for _require_fields
INT_GE0 = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
INT_GE1 = (lambda v: _is_int(v) and v >= 1, "an integer >= 1")
POSITIVE = (lambda v: _is_real(v) and v > 0, "a finite number > 0")
BOOL = (lambda v: isinstance(v, bool), "True or False")
WIDTHS = (lambda v: isinstance(v, (tuple, list)) and all(_is_int(w) and w >= 1 for w in v),
          "a tuple of integer widths >= 1, e.g. (40, 40)")


def check_generator(gen, like: torch.Tensor | None = None, name: str = "gen") -> torch.Generator:
    """gen itself, or ValueError unless it is a torch.Generator (on like's device type, if given)."""
    if not isinstance(gen, torch.Generator):
        raise ValueError(f"{name}: expected a torch.Generator, e.g. torch.Generator().manual_seed(0), "
                         f"got {type(gen).__name__}")
    if like is not None and gen.device.type != like.device.type:
        raise ValueError(f"{name}: expected a generator on {like.device.type}, got one on {gen.device}")
    return gen


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
    or NaN / inf in the real (unmasked) points. Every public function that takes a
    Batch passes it through here, so a Batch(...) built by hand is checked too."""
    for arg, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}.{arg}: expected a tensor of shape [T, N, d{arg}], got {shape}")
        if t.device.type not in DEVICE_TYPES:
            raise ValueError(f"{name}.{arg}: expected a tensor on one of {', '.join(DEVICE_TYPES)}, got one on "
                             f"{t.device} (other devices are not supported)")
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


def check_batch(batch, name: str) -> Batch:
    """make_batch(*batch) for anything passed where a Batch belongs; ValueError naming the argument
    if it is not a Batch(x, y, mask) at all (a bare tensor, say)."""
    if isinstance(batch, torch.Tensor) or not isinstance(batch, tuple) or len(batch) != 3:
        raise ValueError(f"{name}: expected a Batch(x, y, mask) (see make_batch), got {type(batch).__name__}")
    return make_batch(*batch, name=name)


def check_compatible(batch, dx: int, dy: int, like: torch.Tensor, name: str = "context") -> Batch:
    """make_batch's checks plus the model's dx, dy, dtype and device (those of `like`)."""
    batch = check_batch(batch, name)
    if batch.x.shape[-1] != dx or batch.y.shape[-1] != dy:
        raise ValueError(f"{name}: expected dx = {dx}, dy = {dy}, got x {tuple(batch.x.shape)}, y {tuple(batch.y.shape)}")
    if batch.x.dtype != like.dtype or batch.x.device != like.device:
        raise ValueError(f"{name}: data are {batch.x.dtype} on {batch.x.device}, the model is {like.dtype} on {like.device}")
    return batch


def check_inputs(x_target, ctx: Batch, dx: int, name: str = "x_target") -> torch.Tensor:
    """Raise ValueError unless x_target is a finite [T, M, dx] tensor matching the context."""
    T = ctx.x.shape[0]
    if not isinstance(x_target, torch.Tensor) or x_target.dim() != 3 or x_target.shape[0] != T \
            or x_target.shape[-1] != dx:
        got = tuple(x_target.shape) if isinstance(x_target, torch.Tensor) else type(x_target).__name__
        raise ValueError(f"{name}: expected a tensor of shape [T, M, dx] = [{T}, M, {dx}], got {got}")
    if x_target.dtype != ctx.x.dtype or x_target.device != ctx.x.device:
        raise ValueError(f"{name}: expected {ctx.x.dtype} on {ctx.x.device} like the context, "
                         f"got {x_target.dtype} on {x_target.device}")
    if not torch.isfinite(x_target).all():
        raise ValueError(f"{name}: NaN or inf in the target inputs")
    return x_target


def check_samples(S, name: str = "S") -> int:
    _require(_is_int(S) and S >= 1, name, "an integer >= 1", S)
    return int(S)


def first_n(batch: Batch, n) -> Batch:
    """Context made of the first n[t] points of each task (n an int or an integer [T] tensor)."""
    batch = check_batch(batch, "batch")
    T, N = batch.mask.shape
    if isinstance(n, torch.Tensor):
        _require(not n.is_floating_point() and n.dtype != torch.bool and n.dim() <= 1, "n",
                 "an integer or an integer tensor of shape [T]", n)
        _require(n.dim() == 0 or n.shape[0] == T, "n", f"an integer or an integer tensor of shape [T] = [{T}]",
                 f"a tensor of shape {list(n.shape)}")
    else:
        _require(_is_int(n), "n", "an integer or an integer tensor of shape [T]", n)
    n = torch.as_tensor(n, device=batch.mask.device).expand(T)  # [T]
    if (n < 0).any() or (n > batch.counts).any():
        raise ValueError(f"n: expected context sizes in [0, points per task], got {n.tolist()} "
                         f"for tasks with {batch.counts.tolist()} points")
    keep = torch.arange(N, device=n.device) < n.unsqueeze(-1)  # [T, N]
    L = max(int(n.max()), 1) if T else 0  # trim the padding: the BNN never sees points past L
    return Batch(batch.x[:, :L], batch.y[:, :L], (batch.mask & keep)[:, :L])


def random_subset(batch: Batch, gen: torch.Generator, min_size: int = 0) -> Batch:
    """A random context subset per task, size uniform in [min_size, #points]."""
    check_generator(gen, batch.mask)
    T, N = batch.mask.shape
    counts = batch.counts  # [T]
    if (counts < min_size).any():
        raise ValueError(f"min_size: tasks have only {counts.min().item()} points, need >= {min_size}")
    dev = batch.mask.device
    size = min_size + (torch.rand(T, generator=gen, device=dev) * (counts - min_size + 1)).floor()  # [T]
    keys = torch.rand(T, N, generator=gen, device=dev).masked_fill(~batch.mask, 2.0)  # padding ranks last
    rank = keys.argsort(-1).argsort(-1)  # [T, N], random rank of each real point
    return Batch(batch.x, batch.y, batch.mask & (rank < size.unsqueeze(-1)))


# -----------------------------------------------------------------------------
# saving and loading: one file per model with its config (torch.load(weights_only=True))

def write_atomic(path: str, write: Callable, mode: str = "w", name: str = "path") -> None:
    """write(file handle) into a temporary file in path's folder (same suffix), then rename:
    the file is written whole or not at all, and an interruption (Ctrl-C included) removes
    the temporary file. ValueError naming the argument `name` if the folder does not exist."""
    _require(isinstance(path, (str, os.PathLike)) and str(path) != "", name, "a file path", path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{name}: the folder {folder} of {path} does not exist (create it first)")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(model, path: str, **meta: float) -> None:
    """Write {method, config, state_dict, meta} of a module with a dataclass `cfg` whole or not at all
    (meta: e.g. train_s=...)."""
    plain = lambda v: (int(v) if _is_int(v) else float(v) if isinstance(v, numbers.Real) and  # noqa: E731
                       not isinstance(v, bool) else v)   # numpy scalars -> Python: weights_only can read them
    config = {k: type(v)(plain(x) for x in v) if isinstance(v, (tuple, list)) else plain(v)
              for k, v in asdict(model.cfg).items()}
    obj = dict(method=type(model).__name__, config=config, meta={k: plain(v) for k, v in meta.items()},
               state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()})
    write_atomic(path, lambda fh: torch.save(obj, fh), mode="wb", name="path")


def read_model_file(path: str) -> dict:
    """The saved {method, config, state_dict, meta} of path, or ValueError naming the file."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- truncated, not a torch file, unreadable: all say the same
        raise ValueError(f"path: {path} is not a readable model file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not {"method", "config", "state_dict"} <= obj.keys():
        raise ValueError(f"path: {path} is not a model file written by save()")
    return obj


def load_model(cls, path: str, device="cpu"):
    """A cls (with a Config dataclass) rebuilt from the file that save_model wrote."""
    obj = read_model_file(path)
    if obj["method"] != cls.__name__:
        raise ValueError(f"path: expected a saved {cls.__name__}, {path} holds {obj['method']!r}")
    try:
        model = cls(cls.Config(**obj["config"]), torch.Generator().manual_seed(0))
        model.load_state_dict(obj["state_dict"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"path: {path} was saved by another version of this code, whose {cls.__name__} "
                         f"format differs ({str(e).splitlines()[0]}); retrain, or load it with that "
                         "version") from None
    model.saved_meta = obj.get("meta", {})  # what save(path, **meta) recorded
    return model.to(device)


# -----------------------------------------------------------------------------
# numerical health

def finite(t: torch.Tensor, what: str) -> torch.Tensor:
    """t itself, or FloatingPointError naming what produced NaN / inf from finite inputs."""
    if not torch.isfinite(t).all():
        raise FloatingPointError(f"{what}: NaN or inf in the output (the model has diverged)")
    return t


# -----------------------------------------------------------------------------
# the training loop, shared by every method

def train_loop(params, loss_fn: Callable[[int], torch.Tensor], iters: int, lr: float, clip: float,
               log_every: int = 100, name: str = "train", lr_final: float = 1.0, skipped: list | None = None) -> list:
    """Adam on loss_fn(iteration) with gradient-norm clipping and an optional cosine decay of the
    learning rate to lr * lr_final; returns the loss history.

    A step whose loss is finite but whose gradient norm is not (an overflow in one minibatch)
    is skipped, reported on stderr and appended to `skipped`, up to max(10, iters // 100)
    times. Raises FloatingPointError naming the method and the iteration when the loss turns
    NaN/inf, or when more gradients than that do; prints a one-line progress report on
    stderr every log_every iterations."""
    _require(_is_int(iters) and iters >= 0, "iters", "an integer >= 0", iters)
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    history, t0, skipped, allowed = [], time.perf_counter(), [] if skipped is None else skipped, max(10, iters // 100)
    for it in range(iters):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(it, iters, lr, lr_final)
        loss = loss_fn(it)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: loss is {loss.item()} at iteration {it} (lower lr or check the data)")
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:  # else the loss depends on no parameter (LDVI: every context of the minibatch
            loss.backward()     # is empty, and log w = log p(empty set) = 0 exactly): nothing to update
            gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
            if not torch.isfinite(gnorm):
                skipped.append(it)
                if len(skipped) > allowed:
                    raise FloatingPointError(f"{name}: gradient norm is {gnorm.item()} at iteration {it}, non-finite "
                                             f"{len(skipped)} times (at most {allowed} updates are skipped)")
                print(f"[{name}] iteration {it}: gradient norm {gnorm.item()}, update skipped ({len(skipped)} so "
                      "far)", file=sys.stderr, flush=True)
                opt.zero_grad(set_to_none=True)
            else:
                opt.step()
        history.append(loss.detach())
        if log_every and ((it + 1) % log_every == 0 or it + 1 == iters):
            el = time.perf_counter() - t0
            recent = torch.stack(history[-log_every:]).mean().item()
            print(f"[{name}] it {it + 1}/{iters}  loss {recent:.3f}  {el / (it + 1) * 1e3:.1f} ms/it  "
                  f"eta {el / (it + 1) * (iters - it - 1):.0f}s", file=sys.stderr, flush=True)
    return [h.item() for h in history]


def parallel_map(fn: Callable, items, workers: int, device="cpu") -> Iterator:
    """fn(item) for every item, yielded in order. On a CPU the items run on `workers` threads with one
    intra-op thread each: the batched ops of one small model are small, and two such jobs use two
    cores better than one job on two threads (1.4-1.5x, measured on evaluation and on K = 0
    training; not on K = 5 training, whose memory-bound steps then contend for the caches).
    torch's thread count is 1 throughout whatever `workers` is, so the numbers do not depend on
    it; it is restored after. A failure (or an early exit of the caller) drops the jobs not yet
    started. On other devices the items run one after another."""
    _require(callable(fn), "fn", "a callable", fn)
    _require(_is_int(workers) and workers >= 1, "workers", "an integer >= 1", workers)
    _require(isinstance(items, Iterable), "items", "an iterable of the jobs' arguments", items)
    items = list(items)
    if torch.device(device).type != "cpu":
        yield from map(fn, items)
        return
    threads, pool = torch.get_num_threads(), ThreadPoolExecutor(workers)
    try:
        torch.set_num_threads(1)
        yield from pool.map(fn, items)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def cosine_lr(it: int, iters: int, lr: float, lr_final: float) -> float:
    """Learning rate at iteration it: lr at 0, decaying along a half cosine to lr * lr_final."""
    return lr * (lr_final + (1 - lr_final) * 0.5 * (1 + math.cos(math.pi * it / max(iters - 1, 1))))


def check_training_data(data, dx: int, dy: int, like: torch.Tensor, min_points: int) -> Batch:
    """Meta-training tasks: a valid Batch with >= 1 task and >= max(1, min_points) points each."""
    data = check_compatible(data, dx, dy, like, "data")
    if data.x.requires_grad or data.y.requires_grad:
        raise ValueError("data: x or y requires grad; meta-training data must be constants (pass x.detach(), "
                         "y.detach())")
    need = max(1, min_points)
    if data.x.shape[0] == 0 or (data.counts < need).any():
        raise ValueError(f"data: expected at least one task and >= {need} real points per task, got "
                         f"{data.x.shape[0]} tasks with counts {data.counts.tolist()[:8]}")
    return data


def task_minibatch(data: Batch, T: int, gen: torch.Generator) -> Batch:
    """T meta-training tasks drawn without replacement (all of them if there are fewer)."""
    idx = torch.randperm(data.x.shape[0], generator=gen, device=data.x.device)[:T]
    return Batch(data.x[idx], data.y[idx], data.mask[idx])
