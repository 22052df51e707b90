"""Tests for baselines.py: MAML's inner step, SVGD against a slow loop and a Gaussian target,
the chaser loss, the NP's symmetries, short training runs and input validation."""
import math

import pytest
import torch

import baselines as bl
import ldvi_meta as lm
from test_ldvi_meta import F64, gen, sinusoid_batch

SMALL = dict(hidden=(16, 16), log_every=0)


def test_maml_inner_step_equals_manual_sgd_and_first_order_differs_in_meta_gradient():
    g = gen(0)
    data = sinusoid_batch(3, 8, g, F64)
    ctx = lm.first_n(data, torch.tensor([0, 3, 8]))
    grads = {}
    for first_order in (False, True):
        model = bl.MAML(bl.MAMLConfig(adapt_steps=1, inner_lr=0.05, first_order=first_order, **SMALL), gen(1)).double()
        theta = model.adapt(ctx)  # [T, 1, D]
        for t in range(3):  # reference: plain autograd on one task
            th = model.theta0.detach().clone().requires_grad_(True)
            n = int(ctx.counts[t])
            f = model.bnn(th.view(1, 1, -1), ctx.x[t:t + 1, :max(n, 1)])[0, 0]
            loss = ((f - ctx.y[t, :max(n, 1)]) ** 2).mean() if n else th.sum() * 0
            gt, = torch.autograd.grad(loss, th)
            assert torch.allclose(theta[t, 0], th - 0.05 * gt, atol=1e-12)
        assert torch.equal(theta[0, 0], model.theta0)  # empty context: no adaptation
        grads[first_order], = torch.autograd.grad(model.loss(ctx, data), model.theta0)
    assert not torch.allclose(grads[False], grads[True], atol=1e-6)


def test_batched_maml_matches_a_vmapped_per_task_reference():
    import bench
    g = gen(20)
    data = sinusoid_batch(4, 8, g, F64)
    ctx = lm.random_subset(data, g, 1)
    model = bl.MAML(bl.MAMLConfig(adapt_steps=2, **SMALL), gen(21)).double()
    loss, ref = model.loss(ctx, data), bench.vmap_maml_loss(model, ctx, data)
    assert torch.allclose(loss, ref, atol=1e-10)
    g1 = torch.autograd.grad(loss, [model.theta0, model.log_sigma_y])
    g2 = torch.autograd.grad(ref, [model.theta0, model.log_sigma_y])
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(g1, g2))


def slow_svgd_direction(theta, score):
    """Per task, per particle double loop with the same kernel and bandwidth."""
    T, M, D = theta.shape
    out = torch.zeros_like(theta)
    for t in range(T):
        sq = torch.tensor([[float(((theta[t, i] - theta[t, j]) ** 2).sum()) for j in range(M)] for i in range(M)],
                          dtype=theta.dtype)
        h = max(sq.flatten().median().item() / math.log(M + 1), 1e-12)
        for i in range(M):
            for j in range(M):
                k = math.exp(-float(((theta[t, j] - theta[t, i]) ** 2).sum()) / h)
                out[t, i] += k * score[t, j] + k * 2 / h * (theta[t, i] - theta[t, j])
        out[t] /= M
    return out


def test_svgd_batched_equals_loop_and_one_particle_is_gradient_ascent():
    g = gen(2)
    theta, score = torch.randn(3, 5, 4, generator=g, dtype=F64), torch.randn(3, 5, 4, generator=g, dtype=F64)
    assert torch.allclose(bl.svgd_direction(theta, score), slow_svgd_direction(theta, score), atol=1e-10)
    one = theta[:, :1]
    assert torch.allclose(bl.svgd_direction(one, score[:, :1]), score[:, :1], atol=1e-12)


def test_svgd_converges_on_a_gaussian_target():
    g = gen(3)
    mu, std = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([0.5, 2.0], dtype=F64)
    theta = torch.randn(1, 100, 2, generator=g, dtype=F64) * 0.1  # start far too narrow
    for _ in range(1500):
        theta = theta + 0.2 * bl.svgd_direction(theta, -(theta - mu) / std ** 2)
    assert torch.allclose(theta[0].mean(0), mu, atol=0.05)
    assert torch.allclose(theta[0].std(0), std, rtol=0.15)


def test_chaser_loss_is_zero_without_leader_steps_and_leader_gets_no_gradient():
    g = gen(4)
    data = sinusoid_batch(2, 6, g, F64)
    ctx = lm.first_n(data, 3)
    model = bl.BMAML(bl.BMAMLConfig(particles=3, leader_steps=0, **SMALL), gen(5)).double()
    assert model.loss(ctx, data).item() == 0.0
    model.cfg.leader_steps = 2
    loss = model.loss(ctx, data)
    assert loss.item() > 0
    # no gradient into the leader: the gradient equals that of |chaser - c|^2 with c a constant
    g_loss, = torch.autograd.grad(loss, model.theta0)
    chaser = model.svgd(model.initial(2), ctx, model.cfg.chaser_steps)
    leader = model.svgd(chaser.detach(), data, 2).detach()
    g_ref, = torch.autograd.grad((chaser - leader).square().sum((-1, -2)).mean(), model.theta0)
    assert torch.allclose(g_loss, g_ref, atol=1e-10)


def test_np_is_permutation_invariant_and_ignores_padding():
    model = bl.NeuralProcess(bl.NPConfig(hidden=16, r_dim=8, z_dim=4, log_every=0), gen(6)).double()
    for p in model.encoder.head[-1].parameters():
        torch.nn.init.normal_(p, 0, 0.3, generator=gen(7))
    data = sinusoid_batch(2, 5, gen(8), F64)
    perm = torch.randperm(5, generator=gen(9))
    a = model.predictive(data, data.x, 4, gen(10))[0]
    b = model.predictive(lm.Batch(data.x[:, perm], data.y[:, perm], data.mask[:, perm]), data.x, 4, gen(10))[0]
    pad = lm.make_batch(torch.cat([data.x, torch.full((2, 3, 1), 7.0, dtype=F64)], 1),
                        torch.cat([data.y, torch.full((2, 3, 1), float("inf"), dtype=F64)], 1),
                        torch.cat([data.mask, torch.zeros(2, 3, dtype=torch.bool)], 1))
    c = model.predictive(pad, data.x, 4, gen(10))[0]
    assert torch.allclose(a, b, atol=1e-12) and torch.allclose(a, c, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda g: bl.MAML(bl.MAMLConfig(iters=150, lr=3e-3, **SMALL), g),
    lambda g: bl.BMAML(bl.BMAMLConfig(iters=150, lr=3e-3, particles=4, chaser_steps=2, **SMALL), g),
    lambda g: bl.NeuralProcess(bl.NPConfig(iters=150, lr=3e-3, hidden=32, r_dim=16, z_dim=8, log_every=0), g),
], ids=["maml", "bmaml", "np"])
def test_short_training_improves_target_mse(make):
    g = gen(11)
    train, test = sinusoid_batch(32, 16, g), sinusoid_batch(32, 32, gen(12))
    model = make(g)

    def test_mse():
        mean, _ = model.predictive(lm.first_n(test, 8), test.x, 8, gen(13))
        return lm.mse(mean, test).median().item()
    before = test_mse()
    model.fit(train, g)
    after = test_mse()
    assert after < 0.8 * before, (before, after)
    # empty contexts work
    mean, std = model.predictive(lm.first_n(test, 0), test.x, 3, gen(14))
    assert torch.isfinite(mean).all() and torch.isfinite(torch.as_tensor(std)).all()


@pytest.mark.parametrize("cfg, kwargs, name", [
    (bl.MAMLConfig, dict(adapt_steps=-1), "adapt_steps"), (bl.MAMLConfig, dict(inner_lr=0), "inner_lr"),
    (bl.BMAMLConfig, dict(particles=0), "particles"), (bl.BMAMLConfig, dict(svgd_lr=float("inf")), "svgd_lr"),
    (bl.BMAMLConfig, dict(leader_steps=-1), "leader_steps"), (bl.NPConfig, dict(min_std=0), "min_std"),
    (bl.NPConfig, dict(tasks_per_batch=0), "tasks_per_batch"),
])
def test_bad_config_values(cfg, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cfg(**kwargs)


def test_bad_inputs():
    x, y = torch.zeros(2, 3, 1), torch.zeros(2, 3, 1)
    for model in (bl.MAML(bl.MAMLConfig(**SMALL), gen(0)), bl.BMAML(bl.BMAMLConfig(**SMALL), gen(0)),
                  bl.NeuralProcess(bl.NPConfig(log_every=0), gen(0))):
        with pytest.raises(ValueError, match="dx = 1"):
            model.predictive(lm.make_batch(torch.zeros(2, 3, 2), y), x, 2, gen(0))
        with pytest.raises(ValueError, match="float64"):
            model.predictive(lm.make_batch(x.double(), y.double()), x, 2, gen(0))
        with pytest.raises(ValueError, match="data"):
            model.fit(lm.make_batch(torch.zeros(2, 3, 1), torch.zeros(2, 3, 2)), gen(0))


def test_np_blocked_decoding_equals_decoding_all_samples_at_once(monkeypatch):
    model = bl.NeuralProcess(bl.NPConfig(hidden=16, r_dim=8, z_dim=4, log_every=0), gen(6)).double()
    data = sinusoid_batch(2, 5, gen(8), F64)
    monkeypatch.setattr(bl, "SAMPLE_BLOCK", 2)
    mean, std = model.predictive(data, data.x, 5, gen(10))
    g = gen(10)
    with torch.no_grad():
        mu, log_std = model.posterior(data)
        ref_mean, ref_std = model.decode(model._sample_z(mu, log_std, 5, g), data.x)
    assert torch.allclose(mean, ref_mean, atol=1e-12) and torch.allclose(std, ref_std, atol=1e-12)
