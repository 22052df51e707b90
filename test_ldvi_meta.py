"""Property tests for ldvi_meta.py: exactness of the kernels, reduction to mean-field VI,
bounds on a conjugate model, the structured prior (analytic score, prior moments, r = 0 is
the diagonal model), the batched BNN against loops, the encoder's symmetries, the random
draws, the HMC gold standard, seeding and input validation. Exactness is checked in float64."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import gold
import ldvi_meta as lm
from ldvi_meta import KERNELS, Batch, LDVIConfig, LDVIMeta

F64 = torch.float64
FAST = settings(max_examples=15, deadline=None)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def schedule(K, g, h_scale=1.0, zero_steps=False):
    """Random steps, refresh factors and a random monotone schedule ending at 1."""
    steps = torch.zeros(K, dtype=F64) if zero_steps else h_scale * (0.05 + torch.rand(K, generator=g, dtype=F64))
    refresh = 0.99 * torch.rand(K, generator=g, dtype=F64)
    betas = torch.rand(K, generator=g, dtype=F64).sort().values.clamp(min=1e-3)
    if K:
        betas[-1] = 1.0
    return steps, refresh, betas


def random_q0(T, P, D, g):
    """A random q0 (m, log_s [T, D]) and its standard-normal draws u0 [T, P, D], float64."""
    m, log_s = torch.randn(T, D, generator=g, dtype=F64), 0.3 * torch.randn(T, D, generator=g, dtype=F64)
    return m, log_s, torch.randn(T, P, D, generator=g, dtype=F64)


def noise(kernel, K, shape, g):
    """The diffusion's per-step draws, [noise_count, T, P, D] in float64."""
    return torch.randn((lm.noise_count(kernel, K), *shape), generator=g, dtype=F64)


def sinusoid_batch(T, N, g, dtype=torch.float32):
    x = 10 * torch.rand(T, N, 1, generator=g, dtype=dtype) - 5
    amp = 0.1 + 4.9 * torch.rand(T, 1, 1, generator=g, dtype=dtype)
    phase = math.pi * torch.rand(T, 1, 1, generator=g, dtype=dtype)
    y = amp * torch.sin(x + phase) + 0.25 * torch.randn(T, N, 1, generator=g, dtype=dtype)
    return lm.make_batch(x, y)


def small_model(g, **kw):
    cfg = dict(hidden=(8, 8), enc_hidden=16, enc_dim=8, K=3, latent=3, particles=4, tasks_per_batch=4, log_every=0,
               kernel="underdamped", sigma_y=0.5, lr=1e-3, lr_final=1.0, structure="all",
               components=1, hidden_latent=0)
    cfg.update(kw)
    cfg.setdefault("drift_grad", cfg["K"] > 0)  # these tests are of the full gradient (True needs K > 0)
    return LDVIMeta(LDVIConfig(**cfg), g)


# -----------------------------------------------------------------------------
# exactness on Gaussian targets: gamma = Z * q0  =>  log w == log Z for every particle

@FAST
@given(kernel=st.sampled_from(KERNELS), T=st.integers(1, 3), P=st.integers(1, 5), D=st.integers(1, 12),
       K=st.integers(0, 8), seed=st.integers(0, 10_000), h_scale=st.floats(0.01, 3.0), tamed=st.booleans())
def test_gaussian_target_exactness(kernel, T, P, D, K, seed, h_scale, tamed):
    g = gen(seed)
    m = torch.randn(T, D, generator=g, dtype=F64)
    log_s = 0.5 * torch.randn(T, D, generator=g, dtype=F64)
    log_Z = 3 * torch.randn(T, 1, generator=g, dtype=F64)
    target = lm.autograd_target(lambda th: log_Z + lm.diag_normal_logpdf(th, m.unsqueeze(1), log_s.unsqueeze(1)))
    u0 = torch.randn(T, P, D, generator=g, dtype=F64)
    steps, refresh, betas = schedule(K, g, h_scale)
    theta, log_w = lm.diffusion(target, m, log_s, u0, steps, refresh, betas, noise(kernel, K, u0.shape, g), kernel,
                                tamed)
    assert theta.shape == (T, P, D)
    assert torch.allclose(log_w, log_Z.expand(T, P), atol=1e-8, rtol=0)


@FAST
@given(kernel=st.sampled_from(KERNELS), K=st.integers(0, 5), seed=st.integers(0, 10_000), tamed=st.booleans())
def test_unweighted_chain_has_the_same_positions(kernel, K, seed, tamed):
    """weights=False (prediction) skips the weight and the last target evaluation, nothing else."""
    g = gen(seed)
    T, P, D = 2, 3, 4
    m, log_s, u0 = random_q0(T, P, D, g)
    steps, refresh, betas = schedule(K, g)
    eps = noise(kernel, K, u0.shape, g)
    calls = []
    target = lm.autograd_target(banana)
    counted = lambda v: calls.append(1) or target(v)  # noqa: E731
    v, log_w = lm.diffusion(counted, m, log_s, u0, steps, refresh, betas, eps, kernel, tamed)
    n_weighted = len(calls)
    v_fast, none = lm.diffusion(counted, m, log_s, u0, steps, refresh, betas, eps, kernel, tamed, weights=False)
    assert none is None and torch.equal(v_fast, v) and log_w.shape == (T, P)
    assert len(calls) - n_weighted == n_weighted - 1  # one target evaluation fewer


# -----------------------------------------------------------------------------
# reduction to mean-field VI (independent few-line reference)

def mean_field_reference(log_gamma, m, log_s, u0):
    theta0 = m.unsqueeze(1) + torch.exp(log_s).unsqueeze(1) * u0
    log_q0 = torch.distributions.Normal(m.unsqueeze(1), torch.exp(log_s).unsqueeze(1)).log_prob(theta0).sum(-1)
    return theta0, log_gamma(theta0) - log_q0


def banana(th):
    """A non-Gaussian 2-d target (banana), repeated over the other coordinates."""
    a, b = th[..., 0], th[..., 1]
    return -0.5 * a ** 2 - 0.5 * ((b - a ** 2) / 0.5) ** 2 - 0.5 * (th[..., 2:] ** 2).sum(-1)


@FAST
@given(kernel=st.sampled_from(KERNELS), K=st.integers(0, 6), seed=st.integers(0, 10_000), tamed=st.booleans())
def test_reduction_to_mean_field(kernel, K, seed, tamed):
    g = gen(seed)
    T, P, D = 2, 4, 3
    m, log_s, u0 = random_q0(T, P, D, g)
    if kernel == "overdamped":
        K = 0  # the overdamped kernel reduces at K = 0 only
    steps, refresh, betas = schedule(K, g, zero_steps=True)  # h = 0: underdamped stays put at any K
    theta, log_w = lm.diffusion(lm.autograd_target(banana), m, log_s, u0, steps, refresh, betas,
                                noise(kernel, K, u0.shape, g), kernel, tamed)
    theta_ref, log_w_ref = mean_field_reference(banana, m, log_s, u0)
    assert torch.allclose(theta, theta_ref, atol=1e-12)
    assert torch.allclose(log_w, log_w_ref, atol=1e-10)


def test_both_kernels_are_the_same_method_at_K0():
    data = sinusoid_batch(3, 5, gen(1))
    out = {}
    for kernel in KERNELS:
        g = gen(7)
        theta, log_w = small_model(gen(0), K=0, kernel=kernel).sample(data, 6, g)
        out[kernel] = (theta, log_w, torch.rand(3, generator=g))  # the generator is left in the same state
    assert all(torch.equal(a, b) for a, b in zip(*out.values()))


def perturbed(model, seed=5, scale=0.1):
    """Move q0 away from the prior (non-zero encoder heads) and B away from ~0, so tests are not trivial."""
    with torch.no_grad():
        for p in model.encoder.head[-1].parameters():
            p.normal_(0, scale, generator=gen(seed))
        if model.cfg.latent:
            model.basis.normal_(0, 0.3, generator=gen(seed + 1))
    return model


@pytest.mark.parametrize("latent", [0, 3])
def test_model_with_K0_is_mean_field_vi(latent):
    model = perturbed(small_model(gen(0), K=0, latent=latent).double())
    data = sinusoid_batch(3, 5, gen(1), F64)
    _, log_w = model.sample(data, 6, gen(2))
    m, log_s = model.q0(data)
    u0, _ = lm.draw_noise(model.cfg.kernel, 0, (3, 6, latent + model.bnn.n_params), gen(2), F64)  # its draw
    _, ref = mean_field_reference(lambda v: model.log_joint(v, data), m, log_s, u0)
    assert torch.allclose(log_w, ref, atol=1e-9)


@pytest.mark.parametrize("kernel", KERNELS)
def test_structured_model_is_exact_when_q0_is_the_posterior(kernel):
    """Empty context: the target is the prior over v = (z, theta_res), and q0 starts at the
    prior, so every log w must be log Z = 0 with r > 0, for any kernel parameters."""
    model = small_model(gen(0), K=4, latent=3, kernel=kernel).double()
    with torch.no_grad():
        model.raw_steps.uniform_(-1, 1, generator=gen(1))
        model.raw_refresh.uniform_(-2, 2, generator=gen(2))
        model.raw_betas.uniform_(-2, 2, generator=gen(3))
        model.basis.normal_(0, 0.5, generator=gen(4))
    empty = lm.first_n(sinusoid_batch(3, 5, gen(5), F64), 0)
    mean, log_std = model.state_prior()                # sample() would skip the diffusion here: run it directly
    m, log_s = mean.expand(3, -1), log_std.expand(3, -1)
    u0, noise = lm.draw_noise(kernel, 4, (3, 8, m.shape[-1]), gen(6), F64)
    _, log_w = lm.diffusion(model.target(empty), m, log_s, u0, *model.schedule(), noise, kernel)
    assert torch.allclose(log_w, torch.zeros_like(log_w), atol=1e-10)


def test_structured_model_with_zero_steps_is_mean_field_vi():
    """Underdamped, h = 0 at K = 4, r > 0: log w = log gamma(v_0) - log q0(v_0) sample by sample."""
    model = perturbed(small_model(gen(0), K=4, latent=3).double())
    with torch.no_grad():
        model.raw_steps.fill_(-1e4)  # softplus(-1e4) = 0 in float64
    data = sinusoid_batch(2, 6, gen(1), F64)
    theta, log_w = model.sample(data, 5, gen(2))
    m, log_s = model.q0(data)
    u0, _ = lm.draw_noise("underdamped", 4, (2, 5, m.shape[-1]), gen(2), F64)  # the sampler's draws
    v0, ref = mean_field_reference(lambda v: model.log_joint(v, data), m, log_s, u0)
    assert torch.allclose(log_w, ref, atol=1e-9) and torch.allclose(theta, model.theta(v0), atol=1e-12)


def test_structured_target_matches_autograd():
    """The analytic score (BNN backprop and J^T g) against autograd."""
    model = perturbed(small_model(gen(0), latent=3).double())
    g = gen(1)
    data = lm.make_batch(*sinusoid_batch(3, 6, g, F64)[:2], torch.rand(3, 6, generator=g) > 0.4)
    for ctx in (data, lm.first_n(data, 0)):
        v = model.sample_prior(3, 4, g)
        value, grad = model.target(ctx)(v)
        ref_value, ref_grad = lm.autograd_target(lambda v: model.log_joint(v, ctx))(v)
        assert torch.allclose(value, ref_value, atol=1e-10) and torch.allclose(grad, ref_grad, atol=1e-10)


def test_structured_prior_has_the_low_rank_plus_diagonal_covariance():
    model = small_model(gen(0), hidden=(2,), latent=2).double()   # D = 7
    with torch.no_grad():
        model.basis.normal_(0, 0.5, generator=gen(1))
        model.prior_log_std.uniform_(-2, -0.5, generator=gen(2))
    theta = model.theta(model.sample_prior(1, 400_000, gen(3)))[0]       # [P, D]
    B, sigma = model.basis.detach(), model.prior_log_std.detach().exp()
    cov = B @ B.T + torch.diag(sigma ** 2)
    emp = torch.cov(theta.T)
    assert torch.allclose(theta.mean(0), model.prior_mean.detach(), atol=0.01)
    assert (emp - cov).abs().max() < 0.01 * cov.diagonal().max(), (emp - cov).abs().max()


@pytest.mark.parametrize("kernel", KERNELS)
def test_diagonal_prior_r0_is_the_theta_space_model(kernel):
    """r = 0 is the plain model with q0(theta | C) = N(mu + dm, diag (sigma e^dlogs)^2) and the
    target N(theta; mu, diag sigma^2) p(C | theta): written here independently, with autograd."""
    model = perturbed(small_model(gen(0), latent=0, kernel=kernel).double())
    assert not hasattr(model, "basis") and model.encoder.head[-1].out_features == 2 * model.bnn.n_params
    data = sinusoid_batch(3, 5, gen(1), F64)
    theta, log_w = model.sample(data, 6, gen(2))
    dm, dlogs = model.encoder(data)
    mu, log_sigma = model.prior_mean, model.prior_log_std
    target = lm.autograd_target(lambda th: lm.diag_normal_logpdf(th, mu, log_sigma) + lm.gaussian_loglik(
        model.bnn(th, data.x), data.y, data.mask, model.sigma_y))
    u0, eps = lm.draw_noise(kernel, model.cfg.K, (3, 6, model.bnn.n_params), gen(2), F64)  # the sampler's draws
    steps, refresh, betas = model.schedule()
    ref_theta, ref_log_w = lm.diffusion(target, mu + dm, log_sigma + dlogs, u0, steps, refresh, betas, eps, kernel)
    assert torch.allclose(theta, ref_theta, atol=1e-10) and torch.allclose(log_w, ref_log_w, atol=1e-8)


@pytest.mark.parametrize("h_shape, w_shape", [
    ((2, 1, 7, 1), (2, 3, 1, 5)),   # the first layer with dx = 1: one addcmul
    ((2, 3, 7, 4), (2, 3, 4, 5)),   # the particles' own inputs: one baddbmm
    ((2, 1, 7, 4), (2, 3, 4, 5)),   # the first layer with dx > 1: a product, then the bias
    ((2, 3, 7, 4), (2, 3, 4, 1)),   # the last layer with dy = 1: a broadcast product, then the bias
])
def test_fused_affine_layer_is_h_w_plus_b(h_shape, w_shape):
    """_affine against the obvious h @ W + b, in value and (through autograd) in gradient."""
    g = gen(31)
    h, W = torch.randn(h_shape, dtype=F64, generator=g), torch.randn(w_shape, dtype=F64, generator=g)
    b = torch.randn(w_shape[:2] + w_shape[-1:], dtype=F64, generator=g)
    ref = lambda h, W, b: h @ W + b.unsqueeze(-2)  # noqa: E731
    out = lm._affine(h, W, b)
    assert out.shape == ref(h, W, b).shape and torch.allclose(out, ref(h, W, b), atol=1e-12)
    v = torch.randn(out.shape, dtype=F64, generator=g)
    grads = [torch.autograd.grad((f(*ts) * v).sum(), ts)
             for f in (lm._affine, ref) for ts in [[t.clone().requires_grad_(True) for t in (h, W, b)]]]
    assert all(torch.allclose(a, c, atol=1e-12) for a, c in zip(*grads))


def test_parallel_map_keeps_order_restores_threads_and_reports_failures():
    threads = torch.get_num_threads()
    inside = []

    def job(i):
        inside.append(torch.get_num_threads())
        return i * i
    assert list(lm.parallel_map(job, range(7), workers=3)) == [i * i for i in range(7)]
    assert set(inside) == {1} and torch.get_num_threads() == threads  # one intra-op thread per job, then restored

    def bad(i):
        if i == 2:
            raise FloatingPointError("job 2")
        return i
    with pytest.raises(FloatingPointError, match="job 2"):
        list(lm.parallel_map(bad, range(5), workers=2))
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("kwargs, message", [
    (dict(workers=0), "workers: expected an integer >= 1, got 0"),
    (dict(workers=1.5), "workers: expected an integer >= 1, got 1.5"),
    (dict(workers=True), "workers: expected an integer >= 1, got True"),
    (dict(fn=None), "fn: expected a callable, got None"),
    (dict(items=None), "items: expected an iterable of the jobs' arguments, got None"),
    (dict(items=3), "items: expected an iterable of the jobs' arguments, got 3"),
])
def test_parallel_map_bad_inputs(kwargs, message):
    args, threads = {**dict(fn=abs, items=[1, -2], workers=2), **kwargs}, torch.get_num_threads()
    with pytest.raises(ValueError, match=message):
        list(lm.parallel_map(**args))
    assert torch.get_num_threads() == threads  # refused before torch's thread count is touched


def test_meta_train_name_must_be_a_string():
    model = LDVIMeta(LDVIConfig(hidden=(4, 4), enc_hidden=8, enc_dim=4, K=0, latent=1, log_every=0), gen(5))
    data = lm.make_batch(torch.randn(2, 4, 1), torch.randn(2, 4, 1))
    with pytest.raises(ValueError, match="name: expected None or a str, got 3"):
        lm.meta_train(model, data, gen(6), iters=1, name=3)


@pytest.mark.parametrize("iters", [-1, 1.5, True, "10"])
def test_meta_train_and_train_loop_refuse_a_bad_iteration_count(iters):
    model = LDVIMeta(LDVIConfig(hidden=(4, 4), enc_hidden=8, enc_dim=4, K=0, latent=1, log_every=0), gen(5))
    data = lm.make_batch(torch.randn(2, 4, 1), torch.randn(2, 4, 1))
    with pytest.raises(ValueError, match=r"iters: expected None \(the config's\) or an integer >= 0"):
        lm.meta_train(model, data, gen(6), iters=iters)
    with pytest.raises(ValueError, match="iters: expected an integer >= 0"):
        lm.train_loop(model.parameters(), lambda it: model.loss(data, gen(7)), iters, 1e-3, 10.0)


@pytest.mark.parametrize("dx, dy", [(2, 3), (1, 1)])
def test_analytic_bnn_gradient_matches_autograd(dx, dy):
    g = gen(3)
    bnn = lm.BNN(dx, dy, (7, 5))
    data = lm.make_batch(torch.randn(2, 6, dx, dtype=F64, generator=g), torch.randn(2, 6, dy, dtype=F64, generator=g),
                         torch.rand(2, 6, generator=g) > 0.3)
    theta = torch.randn(2, 4, bnn.n_params, dtype=F64, generator=g)
    sigma = torch.tensor(0.7, dtype=F64)
    ll, grad = bnn.loglik_and_grad(theta, data, sigma)
    ref_ll, ref_grad = lm.autograd_target(lambda th: lm.gaussian_loglik(bnn(th, data.x), data.y, data.mask, sigma))(theta)
    assert torch.allclose(ll, ref_ll, atol=1e-10) and torch.allclose(grad, ref_grad, atol=1e-10)
    # and its derivative (what meta-training differentiates) matches double backprop
    v = torch.randn(theta.shape, dtype=F64, generator=g)
    th = theta.clone().requires_grad_(True)
    d_analytic, = torch.autograd.grad((bnn.loglik_and_grad(th, data, sigma)[1] * v).sum(), th)
    with torch.enable_grad():
        _, gr = lm.autograd_target(lambda t: lm.gaussian_loglik(bnn(t, data.x), data.y, data.mask, sigma))(th)
    d_autograd, = torch.autograd.grad((gr * v).sum(), th)
    assert torch.allclose(d_analytic, d_autograd, atol=1e-9)


# -----------------------------------------------------------------------------
# bounds on Bayesian linear regression (closed-form log Z)

def blr_problem(g, N, D, sigma_y):
    x = torch.rand(N, generator=g, dtype=F64) * 4 - 2
    phi = torch.stack([x ** k for k in range(D)], -1)                      # [N, D]
    mu0, s0 = torch.randn(D, generator=g, dtype=F64), 0.5 + torch.rand(D, generator=g, dtype=F64)
    y = phi @ (mu0 + s0 * torch.randn(D, generator=g, dtype=F64)) + sigma_y * torch.randn(N, generator=g, dtype=F64)
    cov = phi @ torch.diag(s0 ** 2) @ phi.T + sigma_y ** 2 * torch.eye(N, dtype=F64)
    log_Z = torch.distributions.MultivariateNormal(phi @ mu0, cov).log_prob(y) if N else torch.zeros((), dtype=F64)

    def log_gamma(th):  # [T, P, D] -> [T, P]
        lik = torch.distributions.Normal(th @ phi.T, sigma_y).log_prob(y).sum(-1)
        return lm.diag_normal_logpdf(th, mu0, torch.log(s0)) + lik
    return log_gamma, mu0, torch.log(s0), log_Z


@FAST
@given(kernel=st.sampled_from(KERNELS), K=st.integers(0, 6), N=st.integers(0, 8), D=st.integers(1, 3),
       seed=st.integers(0, 10_000), tamed=st.booleans())
def test_bounds_on_bayesian_linear_regression(kernel, K, N, D, seed, tamed):
    g = gen(seed)
    log_gamma, mu0, log_s0, log_Z = blr_problem(g, N, D, sigma_y=0.5)
    R, P = 64, 32  # R independent replicates in the task dimension, P particles each
    m = (mu0 + 0.3 * torch.randn(D, generator=g, dtype=F64)).expand(R, D)
    log_s = (log_s0 - 1.0 + 0.5 * torch.rand(D, generator=g, dtype=F64)).expand(R, D)
    steps, refresh, betas = schedule(K, g, h_scale=0.3)
    u0 = torch.randn(R, P, D, generator=g, dtype=F64)
    with torch.no_grad():
        _, log_w = lm.diffusion(lm.autograd_target(log_gamma), m, log_s, u0, steps, refresh, betas,
                                noise(kernel, K, u0.shape, g), kernel, tamed)
    el, iw = lm.elbo(log_w), lm.iw_bound(log_w)
    assert torch.isfinite(log_w).all()
    assert (el <= iw + 1e-12).all()  # Jensen, holds replicate by replicate
    for est in (el, iw):  # E[est] <= log Z, within 4 standard errors
        assert est.mean() <= log_Z + 4 * est.std() / math.sqrt(R) + 1e-9


def test_tame_is_the_identity_for_small_steps_and_bounded_by_one_over_h():
    g = torch.tensor([-1e6, -3.0, 0.0, 1e-3, 2.0, 1e6], dtype=F64)
    h = torch.tensor(0.1, dtype=F64)
    assert torch.allclose(lm.tame(g, torch.tensor(1e-12, dtype=F64)), g, rtol=1e-5)  # h |g| <= 1e-6
    tg = lm.tame(g, h)
    assert (tg.abs() < 1 / h).all() and torch.equal(tg.sign(), g.sign())
    assert torch.allclose(tg, g / (1 + h * g.abs()))


@pytest.mark.parametrize("h_shape", [(), (4, 1)])
def test_tame_hand_written_gradient_matches_autograd(h_shape):
    """The hand-written backward of tame against autograd of the plain quotient (float64)."""
    g = gen(0)
    score = (3 * torch.randn(3, 4, 5, generator=g, dtype=F64)).requires_grad_(True)
    h = (0.05 + torch.rand(h_shape, generator=g, dtype=F64)).requires_grad_(True)
    upstream = torch.randn(3, 4, 5, generator=g, dtype=F64)
    fast = torch.autograd.grad((lm.tame(score, h) * upstream).sum(), (score, h))
    slow = torch.autograd.grad((score / (1 + h * score.abs()) * upstream).sum(), (score, h))
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(fast, slow))
    assert torch.autograd.gradcheck(lm.tame, (score, h))


@pytest.mark.parametrize("kernel", KERNELS)
def test_taming_keeps_a_steep_target_finite(kernel):
    """q0 = N(0, I) against a target 1e-3 wide at distance 5: the plain drift overshoots by
    about 1e6 per step and the chain explodes; the tamed one moves about one unit per step."""
    g = gen(3)
    T, P, D, K = 2, 8, 3, 6
    log_gamma = lambda th: lm.diag_normal_logpdf(th, torch.tensor(5.0, dtype=F64), torch.tensor(math.log(1e-3), dtype=F64))
    m, log_s = torch.zeros(T, D, dtype=F64), torch.zeros(T, D, dtype=F64)
    steps, refresh, betas = torch.full((K,), 0.5, dtype=F64), torch.full((K,), 0.5, dtype=F64), torch.ones(K, dtype=F64)
    u0 = torch.randn(T, P, D, generator=g, dtype=F64)
    runs = {tamed: lm.diffusion(lm.autograd_target(log_gamma), m, log_s, u0, steps, refresh, betas,
                                noise(kernel, K, u0.shape, gen(4)), kernel, tamed) for tamed in (False, True)}
    assert runs[False][0].abs().max() > 1e6  # the untamed chain has blown up
    theta, log_w = runs[True]
    assert torch.isfinite(log_w).all() and theta.abs().max() < (u0.abs().max() + 2 * K * 1 / 0.5)


# -----------------------------------------------------------------------------
# the diffusion earns its keep: a trained K = 8 beats a trained K = 0 on a curved target

def plain_frozen_drift_chain(target, m, log_s, u0, steps, refresh, betas, noise, kernel, tamed):
    """The diffusion written out step by step, with every score detached: the reference for
    diffusion(..., drift_grad=False). log w as in MATH.md; returns (v_K, log w)."""
    s, T, P, D = log_s.exp().unsqueeze(1), *u0.shape

    def drift(u, h):  # the u-space score u + s grad log gamma(m + s u) as a constant, then tamed or not
        g = (u + s * target(m.unsqueeze(1) + s * u)[1]).detach()
        return lm.tame(g, h) if tamed else g

    u, log_w = u0, 0.5 * (u0 ** 2).sum(-1) + 0.5 * D * math.log(2 * math.pi) + log_s.sum(-1, keepdim=True)
    if kernel == "overdamped":
        for k in range(len(steps)):
            a, h, b, eps = torch.exp(-steps[k]), steps[k], betas[k], noise[k]
            u_new = a * u + (1 - a) * b * drift(u, h) + torch.sqrt(1 - a ** 2) * eps
            back = a * u_new + (1 - a) * b * drift(u_new, h)
            log_w = log_w - ((u - back) ** 2).sum(-1) / (2 * (1 - a ** 2)) + 0.5 * (eps ** 2).sum(-1)
            u = u_new
    elif len(steps):
        p = noise[0]
        for k in range(len(steps)):
            h, c, kick = steps[k], refresh[k], 0.5 * steps[k] * betas[k]
            p_ref = c * p + torch.sqrt(1 - c ** 2) * noise[k + 1]
            p = p_ref + kick * drift(u, h)
            u, p = torch.cos(h) * u + torch.sin(h) * p, torch.cos(h) * p - torch.sin(h) * u
            p = p + kick * drift(u, h)
            log_w = log_w - 0.5 * ((p ** 2).sum(-1) - (p_ref ** 2).sum(-1))
    v = m.unsqueeze(1) + s * u
    return v, log_w + target(v)[0]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("tamed", [True, False])
def test_detached_drift_matches_the_plain_chain_and_keeps_the_bound(kernel, tamed):
    """drift_grad=False: the same v_K and log w as the full chain, and the gradient (in q0, the steps,
    the refresh factors and the schedule) of a plain step-by-step chain whose drifts are constants;
    that gradient is not the full one (the option changes what training follows, not the bound)."""
    g = gen(7)
    T, P, D, K = 2, 5, 3, 4
    m, log_s, u0 = random_q0(T, P, D, g)
    steps, refresh, betas = schedule(K, g, h_scale=3.0)
    eps = noise(kernel, K, u0.shape, g)
    target = lm.autograd_target(banana)
    params = [t.requires_grad_(True) for t in (m, log_s, steps, refresh, betas)]
    grads = {}
    for name, run in [("detached", lambda: lm.diffusion(target, m, log_s, u0, steps, refresh, betas, eps, kernel,
                                                        tamed, drift_grad=False)),
                      ("reference", lambda: plain_frozen_drift_chain(target, m, log_s, u0, steps, refresh, betas,
                                                                     eps, kernel, tamed)),
                      ("full", lambda: lm.diffusion(target, m, log_s, u0, steps, refresh, betas, eps, kernel, tamed))]:
        v, log_w = run()
        grads[name] = (v.detach(), log_w.detach(), torch.autograd.grad(log_w.sum() + v.sum(), params,
                                                                       allow_unused=True))
    (v, log_w, g_det), (v_ref, log_w_ref, g_ref), (v_full, log_w_full, g_full) = (grads[k] for k in
                                                                                  ("detached", "reference", "full"))
    assert torch.allclose(v, v_ref, atol=1e-12) and torch.allclose(log_w, log_w_ref, atol=1e-10)
    assert torch.allclose(v, v_full, atol=1e-12) and torch.allclose(log_w, log_w_full, atol=1e-10)
    for a, b in zip(g_det, g_ref):
        assert (a is None and (b is None or not b.any())) or torch.allclose(a, b, atol=1e-10)
    assert not torch.allclose(g_det[1], g_full[1], atol=1e-6)  # the drift's own derivative is left out


def test_detached_drift_trains_the_model_on_the_same_bound():
    """LDVIConfig(drift_grad=False): the same loss on the same draws, a different gradient, and
    Gaussian exactness untouched (q0 = the prior at an empty context: log w = 0 either way)."""
    data = sinusoid_batch(3, 6, gen(8), F64)
    losses, grads = [], []
    for drift_grad in (True, False):
        model = perturbed(small_model(gen(9), drift_grad=drift_grad).double())
        loss = model.loss(data, gen(10))
        grads.append(torch.autograd.grad(loss, model.raw_steps)[0])
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-10)
    assert not torch.allclose(grads[0], grads[1])


def warped(th):
    """A curved, non-Gaussian 2-d target with a Lipschitz gradient; Z = 2 pi 0.3."""
    a, b = th[..., 0], th[..., 1]
    return -0.5 * a ** 2 - 0.5 * ((b - 2 * torch.sin(a)) / 0.3) ** 2


def train_free_diffusion(kernel, K, iters=300, seed=0):
    """Fit q0 and the kernel parameters by maximizing the ELBO; return a 4096-particle ELBO."""
    g = gen(seed)
    D, P = 2, 64
    m = torch.zeros(1, D, dtype=F64, requires_grad=True)
    log_s = torch.zeros(1, D, dtype=F64, requires_grad=True)
    raw = torch.zeros(3, K, dtype=F64, requires_grad=True)  # steps, refresh, betas (unconstrained)

    def run(P, g):  # small initial steps (about 0.04): the chain starts close to mean-field VI
        steps, refresh = 0.3 * torch.nn.functional.softplus(raw[0] - 2), 0.5 * torch.sigmoid(raw[1]) + 0.45
        inc = torch.nn.functional.softplus(raw[2])
        u0 = torch.randn(1, P, D, generator=g, dtype=F64)
        return lm.diffusion(lm.autograd_target(warped), m, log_s, u0, steps, refresh, inc.cumsum(0) / inc.sum(),
                            noise(kernel, K, u0.shape, g), kernel)[1]

    opt = torch.optim.Adam([m, log_s, raw], lr=0.03)
    for _ in range(iters):
        loss = -lm.elbo(run(P, g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return lm.elbo(run(4096, gen(seed + 1))).item()


@pytest.mark.parametrize("kernel", KERNELS)
def test_trained_diffusion_beats_mean_field(kernel):
    log_Z = math.log(2 * math.pi * 0.3)
    mf, diff = train_free_diffusion(kernel, 0), train_free_diffusion(kernel, 8)
    assert mf < log_Z and diff < log_Z + 0.02
    assert diff > mf + 0.3, (mf, diff, log_Z)  # measured: +0.5 (underdamped), +1.2 (overdamped)


# -----------------------------------------------------------------------------
# the batched BNN, the encoder, the model

@pytest.mark.parametrize("dx, dy", [(2, 3), (1, 1)])  # (1, 1): the first and last layers' width-1 paths
def test_batched_bnn_equals_loop(dx, dy):
    g = gen(4)
    bnn = lm.BNN(dx, dy, (5, 6))
    theta = torch.randn(3, 4, bnn.n_params, generator=g, dtype=F64)
    x = torch.randn(3, 7, dx, generator=g, dtype=F64)
    out = bnn(theta, x)
    assert out.shape == (3, 4, 7, dy)
    for t in range(3):
        for p in range(4):
            h, i = x[t], 0
            for l, (a, b) in enumerate(bnn.shapes):
                W = theta[t, p, i:i + a * b].reshape(a, b); i += a * b
                h = h @ W + theta[t, p, i:i + b]; i += b
                h = torch.relu(h) if l < len(bnn.shapes) - 1 else h
            assert torch.allclose(out[t, p], h, atol=1e-12)
    assert lm.BNN().n_params == 1761


def test_encoder_permutation_invariant_and_ignores_padding():
    g = gen(5)
    model = small_model(g).double()
    for p in model.encoder.head[-1].parameters():  # non-zero heads, else q0 is trivially the prior
        torch.nn.init.normal_(p, 0, 0.1, generator=g)
    data = sinusoid_batch(3, 6, g, F64)
    m, log_s = model.q0(data)
    perm = torch.randperm(6, generator=g)
    m2, log_s2 = model.q0(Batch(data.x[:, perm], data.y[:, perm], data.mask[:, perm]))
    assert torch.allclose(m, m2, atol=1e-12) and torch.allclose(log_s, log_s2, atol=1e-12)
    # padding: extra garbage points with mask False change nothing
    pad_x = torch.cat([data.x, torch.full((3, 4, 1), 1e6, dtype=F64)], 1)
    pad_y = torch.cat([data.y, torch.full((3, 4, 1), float("nan"), dtype=F64)], 1)
    pad_mask = torch.cat([data.mask, torch.zeros(3, 4, dtype=torch.bool)], 1)
    m3, log_s3 = model.q0(lm.make_batch(pad_x, pad_y, pad_mask))
    assert torch.allclose(m, m3, atol=1e-12) and torch.allclose(log_s, log_s3, atol=1e-12)
    # empty contexts: the learned empty-set vector, finite, and the same for every empty task
    empty = lm.first_n(data, 0)
    m0, log_s0 = model.q0(empty)
    assert torch.isfinite(m0).all() and torch.allclose(m0[0], m0[1])
    _, log_w = model.sample(empty, 5, g)
    assert torch.isfinite(log_w).all()


def test_q0_starts_at_the_prior_and_empty_context_targets_the_prior():
    model = small_model(gen(6))
    data = sinusoid_batch(2, 5, gen(7))
    m, log_s = model.q0(data)
    mean, log_std = model.state_prior()
    assert torch.equal(m, mean.expand_as(m)) and torch.equal(log_s, log_std.expand_as(m))
    assert torch.equal(mean[:3], torch.zeros(3)) and torch.equal(log_std[:3], torch.zeros(3))  # z ~ N(0, I)
    # empty context and K = 0: q0 = prior = target, so every log w is exactly 0 = log Z
    _, log_w = small_model(gen(6), K=0).sample(lm.first_n(data, 0), 4, gen(8))
    assert torch.allclose(log_w, torch.zeros_like(log_w), atol=1e-4)


def test_mixed_context_sizes_in_one_batch_match_separate_batches():
    model = small_model(gen(9)).double()
    data = sinusoid_batch(3, 6, gen(10), F64)
    ctx = lm.first_n(data, torch.tensor([0, 2, 6]))
    m, log_s = model.q0(ctx)
    for t, n in enumerate([0, 2, 6]):
        one = lm.first_n(Batch(data.x[t:t + 1, :max(n, 1)], data.y[t:t + 1, :max(n, 1)],
                               data.mask[t:t + 1, :max(n, 1)]), n)
        m1, _ = model.q0(one)
        assert torch.allclose(m[t], m1[0], atol=1e-12)


def test_meta_training_improves_the_elbo_and_is_seeded():
    data = sinusoid_batch(16, 8, gen(11))

    def run():
        g = gen(12)
        model = small_model(g, kernel="overdamped", lr=3e-3, min_context=8)
        return model, lm.meta_train(model, data, g, iters=60)
    model, hist = run()
    assert sum(hist[-10:]) / 10 < sum(hist[:10]) / 10  # loss = -ELBO goes down
    model2, hist2 = run()
    assert hist == hist2  # same seed, same numbers
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_predictive_and_metrics_shapes():
    g = gen(13)
    model = small_model(g)
    data = sinusoid_batch(3, 10, g)
    mean, std = model.predictive(lm.first_n(data, 4), data.x, 7, g)
    assert mean.shape == (3, 7, 10, 1) and not mean.requires_grad
    lp, err = lm.log_predictive(mean, std, data), lm.mse(mean, data)
    assert lp.shape == err.shape == (3,) and torch.isfinite(lp).all() and (err >= 0).all()
    # equal-weight mixture of identical components = that component's log likelihood
    one = lm.log_predictive(mean[:, :1].expand(-1, 5, -1, -1), std, data)
    assert torch.allclose(one, lm.gaussian_loglik(mean[:, :1], data.y, data.mask, std)[:, 0], atol=1e-4)


def test_random_subset_sizes_and_membership():
    g = gen(14)
    data = lm.make_batch(torch.randn(500, 6, 1, generator=g), torch.randn(500, 6, 1, generator=g),
                         torch.arange(6).expand(500, 6) < 4)  # 4 real points per task
    sub = lm.random_subset(data, g, min_size=1)
    sizes = sub.counts
    assert sizes.min() == 1 and sizes.max() == 4
    assert not (sub.mask & ~data.mask).any()
    assert set(sizes.tolist()) == {1, 2, 3, 4}


# -----------------------------------------------------------------------------
# errors: clear messages naming the argument

def test_nan_during_training_is_reported_with_the_iteration():
    w = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(FloatingPointError, match="iteration 3"):
        lm.train_loop([w], lambda it: (w * (float("nan") if it == 3 else 1.0)).sum(), 10, 0.1, 1.0, 0)


def test_a_non_finite_gradient_skips_the_update_and_too_many_are_an_error():
    """sqrt at 0: a finite loss with an infinite gradient."""
    w = torch.nn.Parameter(torch.ones(1))
    loss = lambda it, bad=(2, 5): ((w - w.detach()).sqrt().sum() if it in bad else 0) + (w - 3).square().sum()  # noqa: E731
    skipped = []
    history = lm.train_loop([w], loss, 20, 0.1, 1.0, 0, skipped=skipped)
    assert skipped == [2, 5] and len(history) == 20 and torch.isfinite(w).all() and w.item() > 1
    always = lambda it: (w - w.detach()).sqrt().sum() + w.sum()  # noqa: E731
    with pytest.raises(FloatingPointError, match="non-finite 11 times"):
        lm.train_loop([w], always, 20, 0.1, 1.0, 0)


@pytest.mark.parametrize("kwargs, name", [
    (dict(K=-1), "K"), (dict(kernel="leapfrog"), "kernel"), (dict(step_init=0.0), "step_init"),
    (dict(refresh_init=1.0), "refresh_init"), (dict(particles=0), "particles"), (dict(lr=float("nan")), "lr"),
    (dict(hidden=(40, 0)), "hidden"), (dict(K=2.5), "K: expected an integer"), (dict(K="5"), "K: expected an integer"),
    (dict(hidden=40), "hidden: expected a tuple"), (dict(dx=1.5), "dx"), (dict(latent=-1), "latent"),
    (dict(lr_final=0.0), "lr_final"), (dict(K=True), "K"),
    (dict(drift_grad="no"), "drift_grad: expected True or False"), (dict(drift_grad=0), "drift_grad"),
    (dict(K=0, drift_grad=True), "drift_grad: expected its default False with K = 0"),
])
def test_bad_config_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LDVIConfig(**kwargs)


def test_bad_batches():
    x, y = torch.zeros(2, 3, 1), torch.zeros(2, 3, 1)
    with pytest.raises(ValueError, match=r"context.x: expected a tensor of shape \[T, N, dx\]"):
        lm.make_batch(torch.zeros(2, 3), y)
    with pytest.raises(ValueError, match="x is"):
        lm.make_batch(x, torch.zeros(3, 3, 1))  # mismatched T
    with pytest.raises(ValueError, match="x is"):
        lm.make_batch(x, torch.zeros(2, 4, 1))  # mismatched N
    with pytest.raises(ValueError, match="mask"):
        lm.make_batch(x, y, torch.ones(2, 3))  # not bool
    for bad in (float("nan"), float("inf")):
        y_bad = y.clone()
        y_bad[1, 2, 0] = bad
        with pytest.raises(ValueError, match="y: NaN or inf"):
            lm.make_batch(x, y_bad)
        lm.make_batch(x, y_bad, torch.tensor([[True] * 3, [True, True, False]]))  # padded: fine
    with pytest.raises(ValueError, match="n: expected context sizes"):
        lm.first_n(lm.make_batch(x, y), 4)  # more context than points
    model = small_model(gen(0))
    with pytest.raises(ValueError, match="dx = 1"):
        model.sample(lm.make_batch(torch.zeros(2, 3, 2), y), 4, gen(0))
    with pytest.raises(ValueError, match="float64"):
        model.sample(lm.make_batch(x.double(), y.double()), 4, gen(0))
    with pytest.raises(ValueError, match="P"):
        model.sample(lm.make_batch(x, y), 0, gen(0))
    with pytest.raises(ValueError, match="theta"):
        model.bnn(torch.zeros(2, 3, 5), x)


def test_bad_diffusion_parameters():
    g = gen(0)
    m, log_s, u0 = torch.zeros(1, 2), torch.zeros(1, 2), torch.randn(1, 3, 2, generator=g)
    tgt = lm.autograd_target(banana)
    ok = torch.full((2,), 0.5)
    for kernel, steps, refresh, betas, name in [
        ("overdamped", torch.tensor([0.0, 0.1]), ok, ok, "steps"),
        ("underdamped", torch.tensor([-0.1, 0.1]), ok, ok, "steps"),
        ("underdamped", ok, torch.tensor([0.5, 1.0]), ok, "refresh"),
        ("underdamped", ok, ok, torch.tensor([0.0, 1.0]), "betas"),
        ("underdamped", ok, ok, torch.ones(3), "steps/refresh/betas"),
        ("euler", ok, ok, ok, "kernel"),
    ]:
        with pytest.raises(ValueError, match=name):
            lm.diffusion(tgt, m, log_s, u0, steps, refresh, betas, torch.zeros(lm.noise_count(kernel, 2), 1, 3, 2), kernel)
    with pytest.raises(ValueError, match="u0/m/log_s"):
        lm.diffusion(tgt, m, log_s, torch.zeros(1, 3, 4), ok, ok, ok, torch.zeros(3, 1, 3, 4))
    with pytest.raises(ValueError, match="noise"):
        lm.diffusion(tgt, m, log_s, u0, ok, ok, ok, torch.zeros(2, 1, 3, 2))  # underdamped K = 2 needs 3
    for flag in ("tamed", "weights", "drift_grad"):  # a truthy string must not silently mean True
        with pytest.raises(ValueError, match=f"{flag}: expected True or False"):
            lm.diffusion(tgt, m, log_s, u0, ok, ok, ok, torch.zeros(3, 1, 3, 2), **{flag: "no"})


# -----------------------------------------------------------------------------
# the threaded random draws, the learning-rate schedule, the HMC gold standard

def test_large_draws_depend_on_the_generator_only(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor
    shape = (2, 3, lm.RNG_BLOCK)                     # 6 blocks
    draws = []
    for threads in (1, 3):
        monkeypatch.setattr(lm, "_rng_pool", ThreadPoolExecutor(threads))
        draws.append(lm.randn(shape, gen(7)))
    assert torch.equal(*draws)                       # same numbers for any thread count
    x = draws[0].view(6, -1)
    assert not torch.equal(x[0], x[1])               # every block has its own stream
    assert abs(x.mean()) < 0.005 and abs(x.std() - 1) < 0.005
    assert not torch.equal(lm.randn(shape, gen(8)), draws[0])
    with pytest.raises(ValueError, match="gen: expected a generator on cuda"):
        lm.randn((2, 2), gen(0), device="cuda")


def test_cosine_learning_rate_reaches_lr_final():
    lrs = [lm.cosine_lr(it, 50, 0.1, 0.1) for it in range(50)]
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert all(lm.cosine_lr(it, 50, 0.1, 1.0) == pytest.approx(0.1) for it in range(50))


def gaussian_target(mean, cov):
    prec = torch.linalg.inv(cov)

    def target(v):  # v [T, C, D]
        d = v - mean.unsqueeze(1)                                     # [T, C, D]
        g = -d @ prec                                                 # prec is symmetric
        return 0.5 * (d * g).sum(-1), g
    return target


@pytest.mark.parametrize("correlated", [False, True])
def test_hmc_recovers_gaussian_moments(correlated):
    g = gen(11)
    T, C, D = 2, 256, 3
    mean = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], dtype=F64)
    A = torch.randn(D, D, generator=g, dtype=F64) if correlated else torch.diag(torch.tensor([0.5, 2.0, 1.0], dtype=F64))
    cov = A @ A.T + 0.1 * torch.eye(D, dtype=F64)
    v0 = 3 * torch.randn(T, C, D, generator=g, dtype=F64)            # overdispersed starts
    inv_mass = cov.diagonal().expand(T, 1, D)                       # a diagonal mass matrix
    draws, values, acc = gold.hmc(gaussian_target(mean, cov), v0, inv_mass, g, warmup=200, draws=200, n_leapfrog=8)
    x = draws.reshape(T, -1, D)                                     # [T, C * draws, D]
    for t in range(T):
        assert torch.allclose(x[t].mean(0), mean[t], atol=0.1 * cov.diagonal().max().sqrt())
        assert (torch.cov(x[t].T) - cov).abs().max() < 0.1 * cov.diagonal().max()
    assert ((acc > 0.6) & (acc < 0.95)).all(), acc                 # adapted towards 0.75 (dual averaging ends a bit above)
    assert (gold.split_rhat(values) < 1.05).all()


def test_split_rhat_flags_chains_that_disagree():
    g = gen(12)
    mixed = torch.randn(1, 8, 200, generator=g, dtype=F64)
    stuck = mixed + torch.arange(8, dtype=F64).view(1, 8, 1)       # every chain in its own place
    drift = mixed + torch.linspace(0, 10, 200, dtype=F64)           # not stationary within chains
    rhat = gold.split_rhat(torch.cat([mixed, stuck, drift]))
    assert rhat[0] < 1.02 and rhat[1] > 1.5 and rhat[2] > 1.5


def test_blocked_prediction_equals_one_sampler_call_per_block(monkeypatch):
    """predictive draws its S particles in blocks of PREDICT_BLOCK // T per task; the obvious reference
    is one sample() call per block with the same generator, then the network on the targets."""
    model = perturbed(small_model(gen(0), latent=3))
    data = sinusoid_batch(2, 6, gen(1))
    ctx = lm.first_n(data, 4)
    monkeypatch.setattr(lm, "PREDICT_BLOCK", 7)                                 # 2 tasks: blocks of 3
    mean, _ = model.predictive(ctx, data.x, 7, gen(2))
    g = gen(2)
    ref = torch.cat([model.bnn(model.sample(ctx, P, g)[0], data.x) for P in (3, 3, 1)], 1).detach()
    assert mean.shape == (2, 7, 6, 1) and torch.equal(mean, ref)
    monkeypatch.setattr(lm, "PREDICT_BLOCK", 1)                                 # fewer than T: one particle a block
    mean, _ = model.predictive(ctx, data.x, 3, gen(2))
    g = gen(2)
    assert torch.equal(mean, torch.cat([model.bnn(model.sample(ctx, 1, g)[0], data.x) for _ in range(3)], 1).detach())
