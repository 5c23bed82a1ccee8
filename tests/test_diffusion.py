"""Identities of SR3's diffusion math (eq. 2, 4, 10, 11; §2.5's p(γ))."""

import math

import pytest
import torch

from sr3model.diffusion import (ddpm_mean, lp_loss, posterior, predict_eps, predict_y0, q_sample,
                                sample_noise_level, sample_step_and_level)
from sr3model.schedules import linear_schedule


@pytest.fixture
def schedule():
    return linear_schedule(2000, 1e-6, 1e-2)


def test_schedule_defines_gamma_as_product_of_alphas(schedule):
    assert torch.allclose(schedule.alphas, 1 - schedule.betas)
    assert torch.allclose(schedule.gammas[10], torch.prod(schedule.alphas[:11]))
    assert schedule.gammas_prev[0] == 1 and torch.equal(schedule.gammas_prev[1:], schedule.gammas[:-1])
    assert bool((schedule.gammas[1:] < schedule.gammas[:-1]).all())
    with pytest.raises(ValueError):
        linear_schedule(10, 0.5, 0.1)


@pytest.mark.parametrize("gamma", [0.999, 0.5, 0.01])
def test_q_sample_has_the_moments_of_q(gamma):
    g = torch.Generator().manual_seed(0)
    y0 = torch.rand(1, 3, 4, 4, generator=g) * 2 - 1
    n = 40_000
    eps = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    y_t = q_sample(y0.double().expand(n, -1, -1, -1), torch.full((n,), gamma, dtype=torch.float64), eps)
    mean, var = y_t.mean(0), y_t.var(0)
    se_mean = math.sqrt((1 - gamma) / n)
    assert torch.allclose(mean, math.sqrt(gamma) * y0[0].double(), atol=5 * se_mean)
    assert torch.allclose(var, torch.full_like(var, 1 - gamma), rtol=5 * math.sqrt(2 / n))


def test_noise_levels_lie_in_their_interval_and_differ_per_image(schedule):
    g = torch.Generator().manual_seed(0)
    t, gamma = sample_step_and_level(schedule, 50_000, generator=g)
    assert bool((gamma <= schedule.gammas_prev[t]).all()) and bool((gamma >= schedule.gammas[t]).all())
    assert len(torch.unique(gamma)) == len(gamma)  # one draw per image, not one per batch
    counts = torch.bincount(t, minlength=len(schedule)).double()
    assert counts.min() > 0 and abs(counts.mean() - 25) < 1e-9 and counts.std() < 8  # t ~ U{1..T}
    u = (gamma - schedule.gammas[t]) / (schedule.gammas_prev[t] - schedule.gammas[t])
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005  # uniform within
    levels = sample_noise_level(schedule, 8, generator=torch.Generator().manual_seed(1))
    assert levels.dtype == torch.float32 and levels.shape == (8,)


def test_posterior_matches_a_float64_bayes_reference(schedule):
    g = torch.Generator().manual_seed(0)
    y0 = torch.randn(3, 3, 5, 5, generator=g, dtype=torch.float64)
    y_t = torch.randn(3, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 700, 1999])
    mean, var = posterior(y0, y_t, schedule.gammas[t], schedule.gammas_prev[t], schedule.alphas[t])
    # Reference: prior q(y_{t-1}|y0) = N(√γ' y0, 1−γ') times likelihood q(y_t|y_{t-1}) = N(√α y_{t-1}, 1−α).
    a, gp = schedule.alphas[t].view(-1, 1, 1, 1), schedule.gammas_prev[t].view(-1, 1, 1, 1)
    precision = 1 / (1 - gp).clamp_min(1e-300) + a / (1 - a)
    ref_var = 1 / precision
    ref_mean = ref_var * (gp.sqrt() * y0 / (1 - gp).clamp_min(1e-300) + a.sqrt() * y_t / (1 - a))
    ref_mean[0] = y0[0]  # t = 1: γ_0 = 1, the posterior is a point mass at y0
    assert mean.dtype == torch.float64 and torch.allclose(mean, ref_mean, atol=1e-9)
    assert torch.allclose(var.flatten()[1:], ref_var.flatten()[1:], rtol=1e-9)
    assert float(var.flatten()[0]) == 0.0


def test_eps_and_y0_round_trip():
    g = torch.Generator().manual_seed(0)
    y0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    gamma = torch.tensor([0.9999, 0.7, 0.2, 1e-3])
    y_t = q_sample(y0, gamma, eps)
    assert torch.allclose(predict_y0(y_t, gamma, eps), y0, atol=1e-3)
    assert torch.allclose(predict_eps(y_t, gamma, y0), eps, atol=1e-3)
    y_t64 = q_sample(y0.double(), gamma.double(), eps.double())
    assert torch.allclose(predict_y0(y_t64, gamma.double(), eps.double()), y0.double(), atol=1e-9)


def test_ddpm_mean_with_true_noise_equals_the_posterior_mean(schedule):
    g = torch.Generator().manual_seed(0)
    y0, eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(
        2, 3, 4, 4, generator=g, dtype=torch.float64)
    t = 500
    y_t = q_sample(y0, schedule.gammas[t], eps)
    mu = ddpm_mean(y_t, eps, schedule.alphas[t], schedule.gammas[t])
    ref, _ = posterior(y0, y_t, schedule.gammas[t], schedule.gammas_prev[t], schedule.alphas[t])
    assert torch.allclose(mu, ref, atol=1e-9)


def test_lp_loss_is_l1_or_l2():
    a, b = torch.zeros(2, 3), torch.full((2, 3), 2.0)
    assert float(lp_loss(a, b, 1)) == 2.0 and float(lp_loss(a, b, 2)) == 4.0


def test_log_snr_training_levels_span_the_linear_range_uniformly_in_log_snr():
    """`diffusion.schedule="log-snr"`: the same γ range as the paper's linear β schedule (so the
    start noise and every inference schedule's bounds are unchanged), its T levels equally spaced
    in log-SNR, so the piecewise-uniform p(γ) gives the clean levels the share the sampler does."""
    import torch

    from sr3model import override, preset
    from sr3model.schedules import inference_schedule, start_limit, training_schedule

    config = preset("tiny").diffusion
    linear_config = override(preset("tiny"), ["diffusion.schedule=linear"]).diffusion
    spaced, linear = training_schedule(config), training_schedule(linear_config)
    assert len(spaced) == len(linear) == config.steps
    assert torch.allclose(spaced.gammas[[0, -1]], linear.gammas[[0, -1]], rtol=1e-9)
    gaps = spaced.log_snr[:-1] - spaced.log_snr[1:]
    assert torch.allclose(gaps, gaps.mean().expand_as(gaps), rtol=1e-6) and bool((gaps > 0).all())
    assert start_limit(config) == pytest.approx(start_limit(linear_config), rel=1e-9)
    # the sampler's 20 levels: 8 above log-SNR 2; the spaced schedule trains there ≥ 3× as often
    above = lambda s: float((s.log_snr > 2).double().mean())  # noqa: E731
    assert above(inference_schedule(config, 20)) == pytest.approx(0.4, abs=0.05)
    assert above(spaced) >= 3 * above(linear) and above(spaced) == pytest.approx(0.4, abs=0.05)
