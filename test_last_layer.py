"""Tests of the "last" prior structure of ldvi_meta: the last layer integrated out exactly given
the hidden layers. Its evidence against torch's MultivariateNormal, its gradient and the model's
score against autograd (and the training gradient through the chain, which differentiates that
score), its posterior draws against the conditional Gaussian, exactness when the
hidden layers are fixed, unbiased weights against plain prior Monte Carlo, exact prior draws at
n = 0, K = 0 as mean-field VI, the mixture prior, save/load and the HMC gold standard on it.
Exactness is checked in float64."""
import dataclasses
import math

import pytest
import torch
from torch.distributions import MultivariateNormal

import gold
import ldvi_meta as lm
from ldvi_meta import KERNELS, LDVIConfig, LDVIMeta
from test_ldvi_meta import F64, gen, mean_field_reference, sinusoid_batch


def last_model(g, **kw):
    cfg = dict(structure="last", hidden=(8, 6), enc_hidden=16, enc_dim=8, K=3, latent=2, particles=4,
               tasks_per_batch=4, log_every=0, kernel="overdamped", sigma_y=0.3, hidden_std=0.2, components=1)
    cfg.update(kw)
    if not cfg.get("hidden_latent"):  # the hidden layers' weights as the state (hidden_latent = 0)
        cfg["hidden_latent"] = 0
    cfg.setdefault("drift_grad", cfg["K"] > 0)  # these tests are of the full gradient (True needs K > 0)
    return LDVIMeta(LDVIConfig(**cfg), g)


def randomized(model, seed=1):
    """A non-trivial prior: spread-out components, a sizeable low-rank part, unequal weights."""
    with torch.no_grad():
        model.last_mean.normal_(0, 1.0, generator=gen(seed))
        model.last_basis.normal_(0, 0.7, generator=gen(seed + 1))
        model.last_log_std.uniform_(-2, 0, generator=gen(seed + 2))
        model.mix_logits.normal_(0, 1.0, generator=gen(seed + 3))
    return model


def reference_evidence(Phi, ctx, prior, noise_var):
    """log sum_j pi_j prod_k N(y[:, k]; Phi mean_j[:, k], Phi Sigma_j Phi^T + s2 I) over the real points,
    one task and one particle at a time."""
    T, P = Phi.shape[:2]
    out = torch.zeros(T, P, dtype=F64)
    for t in range(T):
        keep = ctx.mask[t]
        for p in range(P):
            X = Phi[t, p, keep].double()                                      # [n, H1]
            terms = []
            for j in range(prior.mean.shape[0]):
                B, s = prior.basis[j].double(), prior.log_std[j].double().exp()
                cov = X @ (B @ B.T + torch.diag(s ** 2)) @ X.T + noise_var * torch.eye(X.shape[0], dtype=F64)
                lp = sum(MultivariateNormal(X @ prior.mean[j, :, k].double(), cov).log_prob(ctx.y[t, keep, k].double())
                         for k in range(ctx.y.shape[-1])) if X.shape[0] else torch.zeros((), dtype=F64)
                terms.append(prior.log_mix[j].double() + lp)
            out[t, p] = torch.logsumexp(torch.stack(terms), 0)
    return out


def design(g, T, P, N, H1, mask):
    Phi = torch.randn(T, P, N, H1, generator=g, dtype=F64)
    Phi[..., -1] = 1.0
    return Phi * mask[:, None, :, None]


@pytest.mark.parametrize("M, r, dy", [(1, 2, 1), (3, 2, 1), (2, 0, 2)])
def test_last_layer_evidence_equals_the_multivariate_normal(M, r, dy):
    g = gen(M + r + dy)
    T, P, N, H1 = 3, 2, 5, 4
    mask = torch.arange(N) < torch.tensor([0, 2, 5]).unsqueeze(-1)
    ctx = lm.Batch(torch.zeros(T, N, 1, dtype=F64), torch.randn(T, N, dy, generator=g, dtype=F64) * mask[..., None],
                   mask)
    prior = lm.LastLayerPrior(torch.randn(M, H1, dy, generator=g, dtype=F64), torch.randn(M, H1, r, generator=g,
                              dtype=F64), -torch.rand(M, H1, generator=g, dtype=F64),
                              torch.log_softmax(torch.randn(M, generator=g, dtype=F64), 0))
    Phi = design(g, T, P, N, H1, mask)
    ll, grad, _ = lm.last_layer_evidence(Phi, ctx, prior, 0.09)
    assert torch.allclose(ll, reference_evidence(Phi, ctx, prior, 0.09), atol=1e-9)
    assert torch.equal(ll[0], torch.zeros(P, dtype=F64))  # no points: evidence 1
    # the hand-written gradient in Phi (over the real points) against autograd
    X = Phi.clone().requires_grad_(True)
    ref, = torch.autograd.grad(lm.last_layer_evidence(X, ctx, prior, 0.09)[0].sum(), X)
    assert torch.allclose(grad, ref, atol=1e-9)
    # grad=False (a draw or a value alone): no gradient, and bit for bit the same value and pieces
    ll_only, none, pieces_only = lm.last_layer_evidence(Phi, ctx, prior, 0.09, grad=False)
    pieces = lm.last_layer_evidence(Phi, ctx, prior, 0.09)[2]
    assert none is None and torch.equal(ll_only, ll)
    assert all(torch.equal(a, b) for a, b in zip(pieces_only, pieces))


@pytest.mark.parametrize("bad", [1, 0, None, "no"])
def test_last_layer_evidence_refuses_a_grad_flag_that_is_not_a_bool(bad):
    mask = torch.ones(1, 2, dtype=torch.bool)
    ctx = lm.Batch(torch.zeros(1, 2, 1, dtype=F64), torch.zeros(1, 2, 1, dtype=F64), mask)
    prior = lm.LastLayerPrior(torch.zeros(1, 3, 1, dtype=F64), torch.zeros(1, 3, 0, dtype=F64),
                              torch.zeros(1, 3, dtype=F64), torch.zeros(1, dtype=F64))
    with pytest.raises(ValueError, match="grad"):
        lm.last_layer_evidence(design(gen(9), 1, 1, 2, 3, mask), ctx, prior, 0.09, grad=bad)


def test_the_collapsed_target_matches_autograd_and_ignores_padding():
    model = randomized(last_model(gen(0), components=2).double())
    g = gen(2)
    data = sinusoid_batch(3, 6, g, F64)
    data = lm.Batch(data.x, data.y, torch.arange(6) < torch.tensor([1, 4, 6]).unsqueeze(-1))
    v = model.sample_prior(3, 4, g)
    value, grad = model.target(data)(v)
    ref_value, ref_grad = lm.autograd_target(lambda v: model.log_joint(v, data))(v)
    assert torch.allclose(value, ref_value, atol=1e-10) and torch.allclose(grad, ref_grad, atol=1e-9)
    # the same tasks with padding of random content appended: the same numbers
    pad = lm.Batch(torch.cat([data.x, 9 * torch.randn(3, 2, 1, generator=g, dtype=F64)], 1),
                   torch.cat([data.y, 9 * torch.randn(3, 2, 1, generator=g, dtype=F64)], 1),
                   torch.cat([data.mask, torch.zeros(3, 2, dtype=torch.bool)], 1))
    v2, g2 = model.target(pad)(v)
    assert torch.allclose(v2, value, atol=1e-10) and torch.allclose(g2, grad, atol=1e-10)
    # and the evidence itself against the slow reference, through the model's own design
    pre = model.feature_bnn(v, data.x)
    ll = model.context_loglik(v, data)
    assert torch.allclose(ll, reference_evidence(model._design(pre, data.mask), data, model.last_prior(),
                                                 model.sigma_y.item() ** 2), atol=1e-9)


def conditional_moments(X, y, prior, s2, j=0):
    """The last layer's conditional posterior (one column, one component): mean [H1], cov [H1, H1]."""
    B, s = prior.basis[j].double(), prior.log_std[j].double().exp()
    Sigma = B @ B.T + torch.diag(s ** 2)
    prec = torch.linalg.inv(Sigma) + X.T @ X / s2
    cov = torch.linalg.inv(prec)
    mean = cov @ (torch.linalg.solve(Sigma, prior.mean[j, :, 0].double()) + X.T @ y / s2)
    return mean, cov


def test_last_layer_draws_have_the_conditional_posterior_mean_and_covariance():
    """40000 draws (Matheron's rule) against the closed-form Gaussian; tolerances about 5 standard errors."""
    g = gen(3)
    N, H1, S = 3, 4, 40000
    mask = torch.ones(1, N, dtype=torch.bool)
    X = design(g, 1, 1, N, H1, mask)[0, 0]                                   # [N, H1]
    ctx = lm.Batch(torch.zeros(1, N, 1, dtype=F64), torch.randn(1, N, 1, generator=g, dtype=F64), mask)
    prior = lm.LastLayerPrior(torch.randn(1, H1, 1, generator=g, dtype=F64), torch.randn(1, H1, 2, generator=g,
                              dtype=F64), torch.full((1, H1), -0.5, dtype=F64), torch.zeros(1, dtype=F64))
    Phi = X.expand(1, S, N, H1)
    pieces = lm.last_layer_evidence(Phi, ctx, prior, 0.2)[2]
    W = lm.last_layer_draw(Phi, ctx, prior, 0.2, pieces, gen(4))[0, :, :, 0]  # [S, H1]
    mean, cov = conditional_moments(X, ctx.y[0, :, 0], prior, 0.2)
    sd = cov.diagonal().sqrt()
    assert ((W.mean(0) - mean).abs() <= 5 * sd / math.sqrt(S)).all()
    emp = torch.cov(W.T)
    assert ((emp - cov).abs() <= 5 * math.sqrt(2 / S) * sd[:, None] * sd[None, :] + 1e-9).all()


def test_mixture_draws_pick_components_by_their_posterior_responsibilities():
    g = gen(5)
    N, H1, S = 2, 3, 40000
    mask = torch.ones(1, N, dtype=torch.bool)
    X = design(g, 1, 1, N, H1, mask)[0, 0]
    ctx = lm.Batch(torch.zeros(1, N, 1, dtype=F64), torch.tensor([[[0.5], [-0.3]]], dtype=F64), mask)
    means = torch.stack([torch.full((H1, 1), 0.4), torch.full((H1, 1), -0.4)]).double()  # two separated components
    prior = lm.LastLayerPrior(means, torch.zeros(2, H1, 0, dtype=F64), torch.full((2, H1), -2.0, dtype=F64),
                              torch.log(torch.tensor([0.3, 0.7], dtype=F64)))
    Phi = X.expand(1, S, N, H1)
    _, _, pieces = lm.last_layer_evidence(Phi, ctx, prior, 0.1)
    resp = pieces[2][0, 0]                                                   # [2]
    W = lm.last_layer_draw(Phi, ctx, prior, 0.1, pieces, gen(6))[0, :, :, 0]  # [S, H1]
    comp0 = torch.stack([conditional_moments(X, ctx.y[0, :, 0], prior, 0.1, j)[0] for j in range(2)])  # [2, H1]
    nearest = ((W[:, None, :] - comp0[None]) ** 2).sum(-1).argmin(-1)        # which component a draw came from
    frac = (nearest == 0).double().mean()
    assert abs(frac - resp[0]) < 5 * math.sqrt(resp[0] * resp[1] / S) + 1e-3, (frac, resp)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("K", [0, 3])
def test_exact_when_the_hidden_layers_are_fixed(kernel, K):
    """Hidden-layer prior std 1e-9 (fixed) and q0 = that prior: the posterior over the last layer is
    conjugate and integrated out, so every log w equals the exact log evidence log p(C) of the
    Bayesian linear model on the network's features at mu_h, for any kernel and K."""
    model = randomized(last_model(gen(7), kernel=kernel, K=K, hidden_std=1e-9, components=2)).double()
    with torch.no_grad():
        model.raw_steps.uniform_(-1, 1, generator=gen(8))
        model.raw_betas.uniform_(-2, 2, generator=gen(9))
    data = sinusoid_batch(3, 5, gen(10), F64)
    ctx = lm.first_n(data, torch.tensor([1, 3, 5]))
    _, log_w = model.sample(ctx, 6, gen(11))
    mu = model.prior_mean.detach().expand(3, 1, -1)
    Phi = model._design(model.feature_bnn(mu, ctx.x), ctx.mask)
    log_z = reference_evidence(Phi, ctx, model.last_prior(), model.sigma_y.item() ** 2)  # [3, 1]
    assert torch.allclose(log_w, log_z.expand_as(log_w), atol=1e-6)
    assert torch.allclose(lm.elbo(log_w), lm.iw_bound(log_w), atol=1e-6)


def test_weights_are_unbiased_for_the_evidence_against_prior_monte_carlo():
    """Random hidden layers (std 0.2): log p(C) is not closed form, but plain prior Monte Carlo over
    theta_h of the collapsed evidence estimates it; the sampler's IW bound with many particles must
    agree, and the ELBO must lie below it."""
    model = randomized(last_model(gen(12), K=2, hidden_std=0.1)).double()
    data = sinusoid_batch(2, 3, gen(13), F64)
    with torch.no_grad():
        v = model.sample_prior(2, 100_000, gen(14))
        ll = model.context_loglik(v, data)                                               # [2, 100000]
        log_z = torch.logsumexp(ll, -1) - math.log(v.shape[1])                          # [2]
        _, log_w = model.sample(data, 20_000, gen(15))
    ess = 1 / torch.softmax(ll, -1).square().sum(-1)
    assert (ess > 1000).all(), ess  # the reference itself is accurate
    iw, el = lm.iw_bound(log_w), lm.elbo(log_w)
    assert ((iw - log_z).abs() < 0.05).all(), (iw, log_z)
    assert (el <= iw).all()


def test_an_empty_context_draws_the_prior_exactly_without_encoder_or_diffusion(monkeypatch):
    model = randomized(last_model(gen(16), components=2)).double()
    data = sinusoid_batch(3, 4, gen(17), F64)
    ctx = lm.first_n(data, torch.tensor([0, 2, 0]))
    _, log_w = model.sample(ctx, 5, gen(18))
    assert torch.equal(log_w[[0, 2]], torch.zeros(2, 5, dtype=F64)) and (log_w[1] != 0).all()
    calls = []
    monkeypatch.setattr(model.encoder, "forward", lambda *a: calls.append("encoder"))
    monkeypatch.setattr(lm, "diffusion", lambda *a, **k: calls.append("diffusion"))
    theta, log_w = model.sample(lm.first_n(data, 0), 20_000, gen(19))
    assert calls == [] and torch.equal(log_w, torch.zeros_like(log_w))
    # the draws have the prior's moments: hidden layers N(mu_h, sigma_l^2), last layer the mixture
    mu, log_std = model.state_prior()
    Dh = mu.shape[0]
    h = theta[0, :, :Dh]
    assert ((h.mean(0) - mu).abs() < 5 * log_std.exp() / math.sqrt(20_000)).all()
    assert ((h.std(0) / log_std.exp() - 1).abs() < 0.05).all()
    prior = model.last_prior()
    w = theta[0, :, -1]                                                       # the output bias: last-layer row H
    pi = prior.log_mix.exp()
    mean = (pi * prior.mean[:, -1, 0]).sum()
    var = (pi * (prior.mean[:, -1, 0] ** 2 + (prior.basis[:, -1] ** 2).sum(-1) + (2 * prior.log_std[:, -1]).exp())
           ).sum() - mean ** 2
    assert abs(w.mean() - mean) < 5 * var.sqrt() / math.sqrt(20_000) and abs(w.var() / var - 1) < 0.05


@pytest.mark.parametrize("hidden_latent, input_scale", [(0, 0.0), (3, 0.0), (3, 0.6)])
def test_K0_is_mean_field_vi_on_the_collapsed_target(hidden_latent, input_scale):
    """K = 0: log w is the mean-field VI term, with the hidden layers as the state or with a hidden latent
    (with and without an input scale)."""
    model = (latent_model(gen(48), K=0, input_scale=input_scale) if hidden_latent
             else randomized(last_model(gen(20), K=0))).double()
    with torch.no_grad():
        for p in model.encoder.head[-1].parameters():
            p.normal_(0, 0.1, generator=gen(21))
    data = sinusoid_batch(2, 5, gen(22), F64)
    _, log_w = model.sample(data, 6, gen(23))
    m, log_s = model.q0(data)
    u0, _ = lm.draw_noise(model.cfg.kernel, 0, (2, 6, m.shape[-1]), gen(23), F64)
    _, ref = mean_field_reference(lambda v: model.log_joint(v, data), m, log_s, u0)
    assert torch.allclose(log_w, ref, atol=1e-9)


def test_training_raises_the_elbo_and_save_load_round_trips(tmp_path):
    data = sinusoid_batch(8, 8, gen(24))
    model = last_model(gen(25), iters=60, lr=3e-3, components=2)
    before = sum(-model.loss(data, gen(26)).item() for _ in range(5))
    model.fit(data, gen(27))
    after = sum(-model.loss(data, gen(26)).item() for _ in range(5))
    assert after > before
    path = str(tmp_path / "m.pt")
    model.save(path)
    back = LDVIMeta.load(path)
    ctx = lm.first_n(data, 3)
    a, b = model.predictive(ctx, data.x, 6, gen(28)), back.predictive(ctx, data.x, 6, gen(28))
    assert torch.equal(a[0], b[0])
    fixed = last_model(gen(29), components=3)
    for name in ("hidden_log_std", "log_sigma_y"):  # fixed, but saved with the model
        assert name not in dict(fixed.named_parameters()) and name in fixed.state_dict()
    assert torch.allclose(fixed.last_prior().log_mix.exp(), torch.full((3,), 1 / 3))  # equal at the start


def test_the_hmc_gold_standard_runs_on_the_collapsed_target():
    model = last_model(gen(30))
    data = sinusoid_batch(2, 6, gen(31))
    ref = gold.Gold(model, chains=4, warmup=5, draws=4, n_leapfrog=2, name="")
    mean, sy = ref.predictive(lm.first_n(data, 2), data.x, 8, gen(32))
    assert mean.shape == (2, 8, 6, 1) and torch.isfinite(mean).all() and 2 in ref.stats


@pytest.mark.parametrize("kwargs, name", [
    (dict(structure="middle"), "structure"), (dict(components=0), "components"),
    (dict(components=2, structure="all"), "components"), (dict(structure="last", hidden=()), "hidden"),
    (dict(hidden_std=0), "hidden_std"),
])
def test_bad_structure_settings_are_refused(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LDVIConfig(**kwargs)


# -----------------------------------------------------------------------------
# the hidden latent: hidden layers mu_h + B_h z_h, the sampler's state z_h

def latent_model(g, **kw):
    model = randomized(last_model(g, hidden_std=1e-3, hidden_latent=3, hidden_latent_init=0.5, **kw))
    with torch.no_grad():
        model.prior_mean.normal_(0, 0.5, generator=gen(90))
    return model


def test_the_hidden_latent_target_matches_autograd():
    model = latent_model(gen(40), components=2).double()
    data = sinusoid_batch(3, 6, gen(41), F64)
    v = 1.5 * model.sample_prior(3, 5, gen(42))                               # [3, 5, r_h]
    assert v.shape == (3, 5, 3)
    value, grad = model.target(data)(v)
    ref_value, ref_grad = lm.autograd_target(lambda v: model.log_joint(v, data))(v)
    assert torch.allclose(value, ref_value, atol=1e-10) and torch.allclose(grad, ref_grad, atol=1e-9)
    theta = model.weights(v, data, gen(43))                                    # the hidden part is mu_h + B_h z
    Dh = model.prior_mean.shape[0]
    plain = torch.stack([torch.stack([model.prior_mean + model.hidden_basis @ v[t, p] for p in range(5)])
                         for t in range(3)])
    assert torch.allclose(theta[..., :Dh], plain, atol=1e-12)


def test_input_scales_target_matches_autograd_and_scale_the_inputs():
    """With input scales the state is (z_h, z_s): the analytic score agrees with autograd, and the
    network of state (z_h, z_s) at x is the network of (z_h, 0) at x * exp(c tanh(tau z_s / c)), per
    input (about x * exp(tau z_s); c = LOG_SCALE_MAX bounds the scale)."""
    model = latent_model(gen(60), components=2, dx=2, input_scale=0.7).double()
    x = torch.rand(3, 6, 2, generator=gen(61), dtype=F64) * 4 - 2                # [3, 6, 2]
    data = lm.make_batch(x, torch.sin(x.sum(-1, keepdim=True)))                  # [3, 6, 1]
    v = 1.5 * model.sample_prior(3, 5, gen(62))                                  # [3, 5, r_h + dx]
    assert v.shape == (3, 5, 5)
    v[1, 2, 4] = -4.0                                                            # where the bound bends
    value, grad = model.target(data)(v)
    ref_value, ref_grad = lm.autograd_target(lambda v: model.log_joint(v, data))(v)
    assert torch.allclose(value, ref_value, atol=1e-10) and torch.allclose(grad, ref_grad, atol=1e-9)
    tau, c = 0.7, lm.LOG_SCALE_MAX
    v[0, 0, 3] = 30.0                                                            # far out: the bound acts
    for t in range(3):
        for p in range(5):
            unscaled = torch.cat([v[t, p, :3], torch.zeros(2, dtype=F64)])        # z_s = 0
            theta0 = model.hidden_weights(unscaled[None, None])                    # [1, 1, Dh]
            x_scaled = x[t] * torch.exp(c * torch.tanh(tau * v[t, p, 3:] / c))    # [6, 2]
            plain = model.feature_bnn(theta0, x_scaled[None])                     # [1, 1, 6, H]
            ours = model.feature_bnn(model.hidden_weights(v[t:t + 1, p:p + 1]), x[t:t + 1])
            assert torch.allclose(ours, plain, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kw", [dict(), dict(hidden_latent=3, hidden_latent_init=0.5, hidden_std=1e-3),
                                dict(hidden_latent=3, hidden_latent_init=0.5, hidden_std=1e-3, input_scale=0.5)])
def test_the_training_gradient_through_the_chain_matches_autograds_score(kernel, kw):
    """Meta-training differentiates log w through K steps, so through the analytic score itself
    (its derivative in the state and in the prior's parameters). The loss gradient of every
    parameter with the model's target equals the one with autograd's score of log_joint, on the
    same draws."""
    model = randomized(last_model(gen(70), components=2, kernel=kernel, **kw)).double()
    with torch.no_grad():
        for p in model.encoder.head[-1].parameters():                          # q0 away from the prior
            p.normal_(0, 0.1, generator=gen(71))
        model.raw_steps.fill_(-1.0)                                             # steps of about 0.3
    data = sinusoid_batch(4, 6, gen(72), F64)
    grads = []
    for target in (model.target, lambda ctx: lm.autograd_target(lambda v: model.log_joint(v, ctx))):
        model.target = target
        model.zero_grad()
        model.loss(data, gen(73)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    analytic, reference = grads
    assert analytic.keys() == reference.keys() and "raw_steps" in reference
    for name, g in reference.items():
        assert torch.allclose(analytic[name], g, rtol=1e-8, atol=1e-10 * (1 + g.abs().max())), name


def test_hidden_latent_weights_are_unbiased_against_prior_monte_carlo():
    """With the state z_h three-dimensional, plain prior Monte Carlo gives log p(C) to a few hundredths;
    the IW bound of many diffusion particles must agree, and the ELBO lie below it."""
    model = latent_model(gen(44), K=2).double()
    data = sinusoid_batch(2, 3, gen(45), F64)
    with torch.no_grad():
        ll = model.context_loglik(model.sample_prior(2, 200_000, gen(46)), data)      # [2, 200000]
        log_z = torch.logsumexp(ll, -1) - math.log(ll.shape[1])
        _, log_w = model.sample(data, 20_000, gen(47))
    assert ((lm.iw_bound(log_w) - log_z).abs() < 0.05).all(), (lm.iw_bound(log_w), log_z)
    assert (lm.elbo(log_w) <= lm.iw_bound(log_w)).all()


@pytest.mark.parametrize("input_scale", [0.0, 0.3])
def test_hidden_latent_trains_saves_loads_and_runs_the_gold_standard(tmp_path, input_scale):
    data = sinusoid_batch(8, 8, gen(52))
    model = last_model(gen(53), iters=40, hidden_std=1e-3, hidden_latent=2, input_scale=input_scale)
    before = sum(-model.loss(data, gen(54)).item() for _ in range(5))
    model.fit(data, gen(55))
    assert sum(-model.loss(data, gen(54)).item() for _ in range(5)) > before
    model.save(str(tmp_path / "m.pt"))
    back = LDVIMeta.load(str(tmp_path / "m.pt"))
    ctx = lm.first_n(data, 3)
    a, b = model.predictive(ctx, data.x, 300, gen(56)), back.predictive(ctx, data.x, 300, gen(56))
    assert torch.equal(a[0], b[0]) and a[0].shape == (8, 300, 8, 1)
    ref = gold.Gold(model, chains=4, warmup=5, draws=4, n_leapfrog=2, name="")
    assert torch.isfinite(ref.predictive(ctx, data.x, 8, gen(57))[0]).all()


@pytest.mark.parametrize("kwargs, name", [
    (dict(structure="all", components=1, hidden_latent=2), "hidden_latent"),
    (dict(hidden_latent=2, hidden_std=0.1), "hidden_std: expected its default 0.001 with hidden_latent > 0"),
    (dict(hidden_latent=0, hidden_latent_init=0.5), "hidden_latent_init: expected its default 0.1 with hidden_latent = 0"),
    (dict(hidden_latent=-1), "hidden_latent: expected an integer >= 0"),
    (dict(hidden_latent=2.5), "hidden_latent: expected an integer >= 0"),
    (dict(hidden_latent=2, hidden_latent_init=0), "hidden_latent_init: expected a finite number > 0"),
    (dict(hidden_latent=0, input_scale=0.5), "input_scale: expected its default 0.0 with hidden_latent = 0"),
    (dict(structure="all", components=1, hidden_latent=0, input_scale=0.5),
     "input_scale: expected its default 0.0 with structure"),
    (dict(structure="all", components=1), "hidden_latent: expected 0 with structure = 'all'"),
    (dict(hidden_latent=2, input_scale=-0.1), r"input_scale: expected a finite number >= 0"),
    (dict(hidden_latent=2, input_scale=float("nan")), r"input_scale: expected a finite number >= 0"),
    (dict(hidden_latent=2, input_scale=True), r"input_scale: expected a finite number >= 0"),
    (dict(hidden_latent=2, input_scale="0.3"), r"input_scale: expected a finite number >= 0"),
])
def test_bad_hidden_latent_settings_are_refused(kwargs, name):
    with pytest.raises(ValueError, match=name.replace("(", r"\(")):
        LDVIConfig(**kwargs)


def test_a_fixed_input_scale_is_kept_through_training_and_save_load(tmp_path):
    data = sinusoid_batch(8, 8, gen(70))
    model = last_model(gen(71), iters=20, hidden_std=1e-3, hidden_latent=2, input_scale=0.4, learn_input_scale=False)
    assert "input_log_scale" not in dict(model.named_parameters())               # a buffer, not trained
    model.fit(data, gen(72))
    assert math.isclose(model.input_log_scale.exp().item(), 0.4, rel_tol=1e-6)
    model.save(str(tmp_path / "m.pt"))
    back = LDVIMeta.load(str(tmp_path / "m.pt"))
    assert back.cfg.learn_input_scale is False and torch.equal(back.input_log_scale, model.input_log_scale)
    learned = last_model(gen(71), iters=20, hidden_std=1e-3, hidden_latent=2, input_scale=0.4)
    learned.fit(data, gen(72))
    assert not math.isclose(learned.input_log_scale.exp().item(), 0.4, rel_tol=1e-6)  # the default learns it


def select_configs(**kw):
    base = dict(structure="last", hidden=(8, 6), enc_hidden=16, enc_dim=8, K=0, latent=2, particles=4,
                tasks_per_batch=4, log_every=0, sigma_y=0.3, hidden_latent=2, components=1)
    base.update(kw)
    return [LDVIConfig(**dict(base, iters=0)), LDVIConfig(**dict(base, iters=60))]


def test_select_config_prefers_the_trained_model_and_is_reproducible():
    """An untrained config against the same config trained for 60 iterations: the held-out score must
    pick the trained one, and the same generator seed gives the same choice and scores."""
    data = sinusoid_batch(12, 8, gen(73))
    best, scores = lm.select_config(select_configs(), data, gen(74), contexts=(1, 4), S=64)
    assert best == 1 and scores[1] > scores[0] + 1.0, scores
    assert lm.select_config(select_configs(), data, gen(74), contexts=(1, 4), S=64) == (best, scores)


def test_select_config_scores_do_not_depend_on_the_number_of_workers():
    """The configs train side by side with one intra-op thread each: any `workers` gives the same
    scores, equal to training and scoring each config alone in turn, and torch's threads are restored."""
    data = sinusoid_batch(8, 8, gen(79))
    configs = select_configs() + [select_configs(iters=30)[1]]
    threads = torch.get_num_threads()
    runs = [lm.select_config(configs, data, gen(80), contexts=(1, 2), S=32, workers=w) for w in (1, 2, 3)]
    assert runs[0] == runs[1] == runs[2] and torch.get_num_threads() == threads
    alone = [lm.select_config([c], data, gen(80), contexts=(1, 2), S=32, workers=1)[1][0] for c in configs]
    assert runs[0][1] == alone  # each config's score is its own: the same split and seeds for every config


def test_select_config_progress_lines_say_which_config_they_belong_to(capsys):
    data = sinusoid_batch(8, 8, gen(81))
    configs = [dataclasses.replace(c, log_every=5, iters=10) for c in select_configs()]
    lm.select_config(configs, data, gen(82), contexts=(1,), S=8, workers=2)
    lines = [line for line in capsys.readouterr().err.splitlines() if " it 10/10 " in line]
    assert sorted(line.split("]")[0] for line in lines) == ["[select_config 1/2", "[select_config 2/2"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(configs=[]), "configs: expected a non-empty list of LDVIConfig"),
    (dict(configs=[dict(K=0)]), "configs: expected a non-empty list of LDVIConfig"),
    (dict(holdout=0.0), r"holdout: expected a number in \(0, 1\)"),
    (dict(holdout=1.0), r"holdout: expected a number in \(0, 1\)"),
    (dict(contexts=(1, 9)), r"contexts: expected context sizes <= the fewest points of a task \(8\)"),
    (dict(contexts=()), "contexts: expected a non-empty list of integers >= 0"),
    (dict(contexts=(1.5,)), "contexts: expected a non-empty list of integers >= 0"),
    (dict(S=0), "S: expected"),
    (dict(workers=0), "workers: expected None or an integer >= 1, got 0"),
    (dict(workers=1.5), "workers: expected None or an integer >= 1, got 1.5"),
    (dict(workers=True), "workers: expected None or an integer >= 1, got True"),
    (dict(workers="2"), "workers: expected None or an integer >= 1, got '2'"),
    (dict(gen=None), "gen: expected a torch.Generator"),
    (dict(data="tasks"), "data: expected a Batch"),
    (dict(data=1), "data: expected a Batch"),
    (dict(tasks=1), "data: expected at least 2 tasks to hold 0.25 of them out, got 1"),
    (dict(bad_learn=True), "learn_input_scale: expected True or False"),
    (dict(bad_fixed=True), "learn_input_scale: expected its default True with input_scale = 0"),
])
def test_select_config_and_fixed_scale_bad_inputs(kwargs, message):
    if kwargs.pop("bad_learn", False):
        with pytest.raises(ValueError, match=message):
            LDVIConfig(hidden_latent=2, input_scale=0.5, learn_input_scale="no")
        return
    if kwargs.pop("bad_fixed", False):
        with pytest.raises(ValueError, match=message):
            LDVIConfig(hidden_latent=2, learn_input_scale=False)
        return
    data = sinusoid_batch(kwargs.pop("tasks", 4), 8, gen(75))
    args = dict(configs=select_configs(), data=data, gen=gen(76), contexts=(1,), S=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        lm.select_config(**args)


def test_select_design_is_select_config_on_the_four_designs_at_k0():
    """select_design against the obvious route: design_candidates' four configs (K = 0, no scale or
    tau fixed, the config's length or twice it) through select_config with the same generator seed;
    the winner's scale and length go into the config, whose K and kernel stay."""
    data = sinusoid_batch(8, 8, gen(77))
    cfg = LDVIConfig(**dict(select_configs()[1].__dict__, K=3, kernel="underdamped", iters=4))
    candidates = lm.design_candidates(cfg, scale=0.7)
    assert list(candidates) == ["no scale, 4 iters", "scale 0.7, 4 iters", "no scale, 8 iters", "scale 0.7, 8 iters"]
    assert all(c.K == 0 and c.drift_grad is False for c in candidates.values())
    assert [(c.input_scale, c.learn_input_scale, c.iters) for c in candidates.values()] == \
        [(0.0, True, 4), (0.7, False, 4), (0.0, True, 8), (0.7, False, 8)]
    best, scores = lm.select_config(list(candidates.values()), data, gen(78), contexts=(1, 2), S=256)
    chosen, report = lm.select_design(cfg, data, gen(78), scale=0.7, contexts=(1, 2))
    assert report == dict(chosen=list(candidates)[best], scores=dict(zip(candidates, scores)))
    pick = list(candidates.values())[best]
    assert chosen == dataclasses.replace(cfg, input_scale=pick.input_scale, learn_input_scale=pick.learn_input_scale,
                                         iters=pick.iters)
    assert chosen.K == 3 and chosen.kernel == "underdamped" and chosen.drift_grad is False


@pytest.mark.parametrize("kwargs, message", [
    (dict(cfg=dict(hidden_latent=0, hidden_std=1e-3)), "cfg: expected a config with structure = 'last' and hidden_latent > 0"),
    (dict(cfg="config"), "cfg: expected an LDVIConfig"),
    (dict(scale=0), "scale: expected a finite number > 0"),
    (dict(scale=float("inf")), "scale: expected a finite number > 0"),
    (dict(scale=True), "scale: expected a finite number > 0"),
    (dict(scale="0.5"), "scale: expected a finite number > 0"),
    (dict(long_iters=4), "long_iters: expected an integer >= 1 other than cfg.iters = 4"),
    (dict(long_iters=0), "long_iters: expected an integer >= 1"),
    (dict(long_iters=8.0), "long_iters: expected an integer >= 1"),
    (dict(contexts=(9,), select_only=True), r"contexts: expected context sizes <= the fewest points of a task \(8\)"),
])
def test_design_candidates_bad_inputs_are_refused_before_any_training(kwargs, message):
    base = dict(select_configs()[1].__dict__, iters=4)
    cfg = kwargs.pop("cfg", {})
    cfg = LDVIConfig(**dict(base, **cfg)) if isinstance(cfg, dict) else cfg
    calls = [lambda: lm.select_design(cfg, sinusoid_batch(4, 8, gen(79)), gen(79), **kwargs)]
    if not kwargs.pop("select_only", False):  # (contexts belongs to select_design alone)
        calls.append(lambda: lm.design_candidates(cfg, **kwargs))
    for call in calls:
        with pytest.raises(ValueError, match=message if "\\" in message else message.replace("(", r"\(")):
            call()


@pytest.mark.parametrize("kw", [dict(components=1), dict(components=3, latent=0),
                                dict(components=2, hidden_latent=2, hidden_std=1e-3, input_scale=0.3)])
def test_the_loss_skips_the_last_layer_draws_but_not_their_random_numbers(kw):
    """The training loss leaves out each particle's last-layer draw (the bound does not need it) but
    advances the generator as the draw would: same loss, same generator state as through _sample."""
    model = randomized(last_model(gen(80), **kw))
    data = sinusoid_batch(5, 7, gen(81))
    data = lm.Batch(data.x, data.y, data.mask.clone())
    data.mask[2, 4:] = False
    for seed in range(3):
        g_ref, g = gen(82 + seed), gen(82 + seed)
        ctx = lm.random_subset(data, g_ref, model.cfg.min_context)
        _, log_w = model._sample(ctx, model.cfg.particles, g_ref)              # with the draws
        assert torch.equal(model.loss(data, g), -lm.elbo(log_w).mean())
        assert torch.equal(g.get_state(), g_ref.get_state())
