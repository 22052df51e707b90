"""Tests of the meta-learned Gaussian baselines (baselines.GaussianModel: ALPaCA's Bayesian linear
regression on learned features and the deep-kernel GP) and of the Gaussian conditioning helpers
they share with ldvi_meta: the evidence against torch's MultivariateNormal, the Woodbury form
against the full covariance, padding, the one-point posterior in closed form, the covariance of
joint draws, save/load and bad inputs."""
import math

import pytest
import torch
from torch.distributions import MultivariateNormal

import baselines as bl
import ldvi_meta as lm
from test_ldvi_meta import F64, gen, sinusoid_batch

SMALL = dict(width=8, depth=1, features=3, log_every=0)


def model_of(kernel, seed=0, **kw):
    """A small random model in float64, with a non-trivial prior factor / scale and noise."""
    m = bl.GaussianModel(bl.GaussianConfig(kernel=kernel, **{**SMALL, **kw}), gen(seed)).double()
    with torch.no_grad():
        if kernel == "linear":
            m.prior_factor.copy_(0.5 * torch.randn(m.prior_factor.shape, generator=gen(seed + 1), dtype=F64))
        else:
            m.log_scale.fill_(0.3)
        m.log_sigma_y.fill_(math.log(0.3))
    return m


def reference_log_evidence(model, data):
    """Per task, the real points only, through torch's MultivariateNormal with the full covariance."""
    out = []
    for t in range(data.x.shape[0]):
        keep = data.mask[t]
        x, y = data.x[t:t + 1, keep], data.y[t, keep].double()                 # [1, n, 1], [n, dy]
        cov = model.kernel(x, x)[0] + model.noise_var() * torch.eye(x.shape[1], dtype=F64)
        mean = model.mean(x)[0]                                                 # [n, dy]
        out.append(sum(MultivariateNormal(mean[:, j], cov).log_prob(y[:, j]) for j in range(y.shape[1]))
                   if x.shape[1] else torch.zeros((), dtype=F64))
    return torch.stack(out)


def padded(data, g, extra=3):
    """The same tasks with `extra` padded points of random content appended (the mask keeps them out)."""
    T, N, _ = data.x.shape
    x = torch.cat([data.x, 7 * torch.randn(T, extra, data.x.shape[-1], generator=g, dtype=data.x.dtype)], 1)
    y = torch.cat([data.y, 7 * torch.randn(T, extra, data.y.shape[-1], generator=g, dtype=data.y.dtype)], 1)
    mask = torch.cat([data.mask, torch.zeros(T, extra, dtype=torch.bool)], 1)
    return lm.Batch(x, y, mask)  # by hand, so the padding is NOT zeroed


@pytest.mark.parametrize("kernel", bl.GP_KERNELS)
def test_evidence_equals_multivariate_normal_on_random_small_cases(kernel):
    for seed in range(3):
        g = gen(seed)
        data = sinusoid_batch(4, 6, g, F64)
        data = lm.Batch(data.x, data.y, torch.arange(6) < torch.tensor([0, 1, 4, 6]).unsqueeze(-1))
        model = model_of(kernel, seed)
        got, ref = model.log_evidence(data), reference_log_evidence(model, data)
        assert torch.allclose(got, ref, atol=1e-9), (got, ref)
        assert got[0] == 0  # an empty task has evidence 1


def test_woodbury_form_equals_the_full_covariance_gp_form():
    model = model_of("linear", 3, features=4)
    data = sinusoid_batch(5, 9, gen(4), F64)
    data = lm.Batch(data.x, data.y, torch.arange(9) < torch.tensor([9, 2, 5, 1, 7]).unsqueeze(-1))
    n = data.counts.double()
    A = lm.noisy_gram(model.kernel(data.x, data.x), data.mask, model.noise_var())
    full = lm.gaussian_log_evidence(torch.linalg.cholesky(A), model.residual(data), n)
    assert torch.allclose(model.log_evidence(data), full, atol=1e-9)
    # and the gradients of both forms agree (meta-training differentiates the Woodbury form)
    g1 = torch.autograd.grad(model.log_evidence(data).sum(), model.prior_factor)[0]
    A = lm.noisy_gram(model.kernel(data.x, data.x), data.mask, model.noise_var())
    g2 = torch.autograd.grad(lm.gaussian_log_evidence(torch.linalg.cholesky(A), model.residual(data), n).sum(),
                             model.prior_factor)[0]
    assert torch.allclose(g1, g2, atol=1e-8)


@pytest.mark.parametrize("kernel", bl.GP_KERNELS)
def test_padding_changes_no_number(kernel):
    g = gen(5)
    data = sinusoid_batch(3, 5, g, F64)
    pad = padded(data, g)
    model = model_of(kernel, 6)
    assert torch.allclose(model.log_evidence(pad), model.log_evidence(data), atol=1e-10)
    xt = torch.linspace(-5, 5, 7, dtype=F64).view(1, 7, 1).expand(3, 7, 1)
    for a, b in zip(model.exact_predictive(pad, xt), model.exact_predictive(data, xt)):
        assert torch.allclose(a, b, atol=1e-10)
    m1, _ = model.predictive(pad, xt, 6, gen(7))
    m2, _ = model.predictive(data, xt, 6, gen(7))
    assert torch.allclose(m1, m2, atol=1e-9)


@pytest.mark.parametrize("kernel", bl.GP_KERNELS)
def test_one_point_posterior_is_the_closed_form(kernel):
    model = model_of(kernel, 8)
    x1, y1 = torch.tensor([[[0.7]]], dtype=F64), torch.tensor([[[1.3]]], dtype=F64)
    xt = torch.tensor([[[-2.0], [0.7], [3.0]]], dtype=F64)
    mean, cov = model.exact_predictive(lm.make_batch(x1, y1), xt)
    k11, kt1, ktt = model.kernel(x1, x1)[0, 0, 0], model.kernel(xt, x1)[0, :, 0], model.kernel(xt, xt)[0]
    s2 = model.noise_var()
    ref_mean = model.mean(xt)[0, :, 0] + kt1 * (y1[0, 0, 0] - model.mean(x1)[0, 0, 0]) / (k11 + s2)
    ref_var = ktt.diagonal() - kt1 ** 2 / (k11 + s2)
    assert torch.allclose(mean[0, :, 0], ref_mean, atol=1e-12)
    assert torch.allclose(cov[0].diagonal(), ref_var, atol=1e-12)
    # no context: the prior
    mean0, cov0 = model.exact_predictive(lm.first_n(lm.make_batch(x1, y1), 0), xt)
    assert torch.allclose(mean0, model.mean(xt), atol=1e-12) and torch.allclose(cov0, ktt, atol=1e-12)


@pytest.mark.parametrize("kernel", bl.GP_KERNELS)
def test_joint_draws_have_the_posterior_mean_and_covariance(kernel):
    """S = 40000 draws at 5 targets; the tolerance is about 5 standard errors of the sample moments."""
    model = model_of(kernel, 9)
    ctx = sinusoid_batch(2, 3, gen(10), F64)
    xt = torch.tensor([-3.0, -1.0, 0.0, 2.0, 4.0], dtype=F64).view(1, 5, 1).expand(2, 5, 1)
    mean, cov = model.exact_predictive(ctx, xt)
    f, sy = model.predictive(ctx, xt, 40000, gen(11))                               # [2, S, 5, 1]
    assert torch.allclose(sy, model.log_sigma_y.exp())
    emp_mean, d = f.mean(1), f[..., 0] - f[..., 0].mean(1, keepdim=True)
    emp_cov = d.transpose(1, 2) @ d / (f.shape[1] - 1)                              # [2, 5, 5]
    sd = cov.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()                         # [2, 5]
    assert ((emp_mean[..., 0] - mean[..., 0]).abs() <= 5 * sd / math.sqrt(40000) + 1e-9).all()
    scale = sd.unsqueeze(-1) * sd.unsqueeze(-2)                                     # [2, 5, 5]
    assert ((emp_cov - cov).abs() <= 5 * math.sqrt(2 / 40000) * scale + 1e-6).all()


def test_exact_log_predictive_is_the_joint_density_of_the_targets():
    model = model_of("rbf", 12)
    data = sinusoid_batch(2, 6, gen(13), F64)
    ctx = lm.first_n(data, 2)
    got = model.exact_log_predictive(ctx, data)
    mean, cov = model.exact_predictive(ctx, data.x)
    for t in range(2):
        ref = MultivariateNormal(mean[t, :, 0], cov[t] + model.noise_var() * torch.eye(6, dtype=F64))
        assert torch.isclose(got[t], ref.log_prob(data.y[t, :, 0]), atol=1e-9)


def test_the_s_draw_score_tends_to_the_exact_density():
    """The benchmark's estimator with many draws approaches exact_log_predictive from below (Jensen)."""
    model = model_of("linear", 14)
    x = sinusoid_batch(3, 8, gen(15), F64).x
    mean, cov = model.exact_predictive(lm.first_n(lm.make_batch(x, x), 0), x)      # the prior at x
    cov = cov + model.noise_var() * torch.eye(8, dtype=F64)
    y = mean + (torch.linalg.cholesky(cov) @ torch.randn(3, 8, 1, generator=gen(16), dtype=F64))  # data from the model
    data = lm.make_batch(x, y)
    ctx = lm.first_n(data, 3)
    exact = model.exact_log_predictive(ctx, data)
    est = lm.log_predictive(*model.predictive(ctx, data.x, 20000, gen(16)), data)
    assert ((est - exact).abs() < 0.2).all() and (est <= exact + 0.05).all(), (est, exact)


@pytest.mark.parametrize("kernel", bl.GP_KERNELS)
def test_short_meta_training_raises_the_evidence_and_save_load_round_trips(kernel, tmp_path):
    data = sinusoid_batch(16, 10, gen(17))
    model = bl.GaussianModel(bl.GaussianConfig(kernel=kernel, iters=150, lr=3e-3, **SMALL), gen(18))
    before = model.log_evidence(data).mean().item()
    history = model.fit(data, gen(19))
    assert model.log_evidence(data).mean().item() > before + 1 and len(history) == 150
    path = str(tmp_path / "gp.pt")
    model.save(path, train_s=1.5)
    back = bl.GaussianModel.load(path)
    assert back.saved_meta == {"train_s": 1.5} and back.cfg == model.cfg
    xt = data.x[:, :4]
    a, b = model.predictive(lm.first_n(data, 2), xt, 5, gen(20)), back.predictive(lm.first_n(data, 2), xt, 5, gen(20))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="holds 'GaussianModel'"):
        bl.NeuralProcess.load(path)


def test_learned_noise_is_an_option_and_fixed_noise_stays_fixed():
    data = sinusoid_batch(8, 10, gen(21))
    fixed = bl.GaussianModel(bl.GaussianConfig(iters=20, **SMALL), gen(22))
    fixed.fit(data, gen(23))
    assert fixed.log_sigma_y.exp().item() == pytest.approx(0.25) and not fixed.log_sigma_y.requires_grad
    learned = bl.GaussianModel(bl.GaussianConfig(iters=20, learn_sigma_y=True, **SMALL), gen(22))
    learned.fit(data, gen(23))
    assert learned.log_sigma_y.exp().item() != pytest.approx(0.25)


def test_several_outputs_are_independent_given_the_kernel():
    model = model_of("linear", 24, dy=2)
    g = gen(25)
    x = 4 * torch.rand(2, 5, 1, generator=g, dtype=F64) - 2
    y = torch.randn(2, 5, 2, generator=g, dtype=F64)
    data = lm.make_batch(x, y)
    assert torch.allclose(model.log_evidence(data), reference_log_evidence(model, data), atol=1e-9)
    f, _ = model.predictive(data, x, 3, gen(26))
    assert f.shape == (2, 3, 5, 2)


@pytest.mark.parametrize("kwargs, name", [
    (dict(kernel="matern"), "kernel"), (dict(features=0), "features"), (dict(width=0), "width"),
    (dict(depth=-1), "depth"), (dict(sigma_y=0), "sigma_y"), (dict(jitter=-1e-6), "jitter"),
    (dict(learn_sigma_y=1), "learn_sigma_y"), (dict(lr_final=2), "lr_final"), (dict(iters=1.5), "iters"),
])
def test_bad_config_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        bl.GaussianConfig(**kwargs)


@pytest.mark.parametrize("kernel", bl.GP_KERNELS)
def test_bad_inputs_are_refused_with_the_argument_named(kernel):
    model = bl.GaussianModel(bl.GaussianConfig(kernel=kernel, **SMALL), gen(0))
    x, y = torch.zeros(2, 3, 1), torch.zeros(2, 3, 1)
    ctx = lm.make_batch(x, y)
    with pytest.raises(ValueError, match="dx = 1"):
        model.predictive(lm.make_batch(torch.zeros(2, 3, 2), y), x, 2, gen(0))
    with pytest.raises(ValueError, match="float64"):
        model.predictive(lm.make_batch(x.double(), y.double()), x, 2, gen(0))
    with pytest.raises(ValueError, match="x_target"):
        model.predictive(ctx, torch.zeros(3, 3, 1), 2, gen(0))
    with pytest.raises(ValueError, match="S"):
        model.predictive(ctx, x, 0, gen(0))
    with pytest.raises(ValueError, match="gen"):
        model.predictive(ctx, x, 2, 0)
    with pytest.raises(ValueError, match="data"):
        model.fit(lm.make_batch(torch.zeros(2, 3, 1), torch.zeros(2, 3, 2)), gen(0))
    with pytest.raises(ValueError, match="gen"):
        model.fit(ctx, None)


def test_safe_cholesky_adds_jitter_only_when_needed_and_says_what_failed():
    v = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    rank1 = v.T @ v                                                         # [3, 3], singular
    L = lm.safe_cholesky(rank1, 1e-6, "cov")
    assert torch.allclose(L @ L.T, rank1, atol=1e-4)
    spd = rank1 + torch.eye(3, dtype=F64)
    assert torch.equal(lm.safe_cholesky(spd), torch.linalg.cholesky(spd))
    with pytest.raises(FloatingPointError, match="my covariance"):
        lm.safe_cholesky(-spd, 1e-6, "my covariance")
