"""Every registered sampler obeys one contract; an oracle denoiser makes each recover y0."""

import pytest
import torch

from sr3model.diffusion import ddpm_mean, posterior, predict_eps, predict_y0
from sr3model.samplers import SAMPLERS, clipped, ddpm_step, get_sampler
from sr3model.schedules import linear_schedule


def oracle(y0: torch.Tensor):
    """The denoiser that knows the answer: returns the true ε that takes y0 to y_t."""
    def eps(x, y_t, gamma):
        return predict_eps(y_t, gamma, y0)
    return eps


@pytest.fixture
def y0():
    return torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps,start,end", [(1, 0.5, 0.5), (2, 1e-4, 0.3), (10, 1e-4, 0.1),
                                             (100, 1e-6, 0.05)])
@pytest.mark.parametrize("clip", [False, True])
def test_oracle_denoiser_recovers_y0(name, y0, steps, start, end, clip):
    schedule = linear_schedule(steps, start, end)
    denoiser = clipped(oracle(y0)) if clip else oracle(y0)
    out = get_sampler(name)(denoiser, torch.zeros_like(y0), schedule,
                            generator=torch.Generator().manual_seed(1))
    assert out.shape == y0.shape
    assert torch.allclose(out, y0, atol=2e-4), float((out - y0).abs().max())


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_contract(name, y0):
    sampler, schedule = SAMPLERS[name], linear_schedule(5, 1e-4, 0.2)
    def denoiser(x, y_t, gamma):  # an imperfect denoiser, so that the start noise matters
        assert gamma.shape == (y_t.shape[0],) and gamma.dtype == torch.float32
        return 0.5 * y_t
    x = torch.zeros(4, 3, 8, 8)
    calls = []
    a = sampler(denoiser, x, schedule, generator=torch.Generator().manual_seed(7),
                callback=lambda i, n, y: calls.append((i, n, y.shape)))
    b = sampler(denoiser, x, schedule, generator=torch.Generator().manual_seed(7))
    c = sampler(denoiser, x, schedule, generator=torch.Generator().manual_seed(8))
    assert a.shape == x.shape  # every image of the batch is returned
    assert torch.equal(a, b) and not torch.allclose(a, c)  # seeded
    assert not torch.allclose(a[0], a[1])  # each image gets its own noise
    assert calls == [(i, 5, x.shape) for i in range(1, 6)]
    unconditional = sampler(denoiser, None, schedule, shape=(2, 3, 8, 8),
                            generator=torch.Generator().manual_seed(7))
    assert unconditional.shape == (2, 3, 8, 8)
    y_T = torch.randn(4, 3, 8, 8)
    same = [sampler(denoiser, x, schedule, y_T=y_T, generator=torch.Generator().manual_seed(3)) for _ in (0, 1)]
    assert torch.equal(*same) and not torch.equal(same[0], a)  # y_T replaces the drawn start


def test_ddpm_step_is_eq_11_plus_scaled_noise():
    g = torch.Generator().manual_seed(0)
    y_t, eps_hat, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    alpha, gamma = torch.tensor(0.98, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    got = ddpm_step(lambda x, y, gm: eps_hat, None, y_t, alpha, gamma, z)
    a, gm = 0.98, 0.6
    want = (y_t - (1 - a) / (1 - gm) ** 0.5 * eps_hat) / a ** 0.5 + (1 - a) ** 0.5 * z
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(ddpm_step(lambda x, y, gm: eps_hat, None, y_t, alpha, gamma, None),
                          ddpm_mean(y_t, eps_hat, alpha, gamma))


def test_ddpm_adds_no_noise_on_the_last_step(y0):
    """With one step, Algorithm 2 is deterministic given y_T: the same output for any generator."""
    schedule = linear_schedule(1, 0.3, 0.3)
    y_T = torch.randn_like(y0)
    den = lambda x, y, g: 0.1 * y  # noqa: E731
    a = SAMPLERS["ddpm"](den, None, schedule, y_T=y_T, generator=torch.Generator().manual_seed(0))
    b = SAMPLERS["ddpm"](den, None, schedule, y_T=y_T, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_unknown_sampler_is_a_clear_error():
    with pytest.raises(KeyError, match="ddim"):
        get_sampler("euler")


def test_clipped_ddpm_step_is_the_posterior_mean_of_the_clipped_y0():
    """Eq. 11 with the clipped denoiser's ε = μ of q(y_{t−1} | clip(ŷ0), y_t) (eq. 4–5)."""
    g = torch.Generator().manual_seed(0)
    y_t, eps_hat = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    schedule = linear_schedule(10, 1e-4, 0.3)
    t = 6
    alpha, gamma, gamma_prev = schedule.alphas[t], schedule.gammas[t], schedule.gammas_prev[t]
    y0_hat = predict_y0(y_t, gamma, eps_hat)
    assert (y0_hat.abs() > 1).any() and (y0_hat.abs() < 1).any()  # the case clipping is for
    got = ddpm_step(clipped(lambda x, y, gm: eps_hat), None, y_t, alpha, gamma, None)
    want, _ = posterior(y0_hat.clamp(-1, 1), y_t, gamma, gamma_prev, alpha)
    assert torch.allclose(got, want, atol=1e-10)
    unclipped = ddpm_step(lambda x, y, gm: eps_hat, None, y_t, alpha, gamma, None)
    assert torch.allclose(unclipped, posterior(y0_hat, y_t, gamma, gamma_prev, alpha)[0], atol=1e-10)
    assert not torch.allclose(got, unclipped)


def test_clipped_keeps_y0_inside_tensor_bounds_and_leaves_in_range_predictions_alone():
    g = torch.Generator().manual_seed(1)
    y_t, eps_hat, x = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    gamma = torch.full((2,), 0.05)
    low, high = -1 - x, 1 - x  # the residual model's y0 = HR − x
    eps = clipped(lambda *_: eps_hat, low, high)(x, y_t, gamma)
    y0 = predict_y0(y_t, gamma, eps)
    assert (y0 >= low - 1e-5).all() and (y0 <= high + 1e-5).all()
    raw = predict_y0(y_t, gamma, eps_hat)
    inside = (raw >= low) & (raw <= high)
    assert inside.any() and not inside.all()
    assert torch.equal(eps[inside], eps_hat[inside])


@pytest.mark.parametrize("objective", ["sr3", "residual", "unconditional"])
def test_super_resolve_clips_y0_to_the_image_range_unless_the_config_says_not(objective):
    """The last refinement step returns ŷ0: clipped, the image (ŷ0, or x + s·ŷ0 for the residual
    model) lies in [-1, 1] before the final clamp; with `diffusion.sample_clip=false` it does not."""
    from sr3model import SR3, override, preset

    def final_image(model: SR3) -> torch.Tensor:
        seen = []
        lr = None if objective == "unconditional" else torch.rand(2, 3, 16, 16) * 2 - 1
        model.super_resolve(lr, batch=2, sampler="ddim", schedule=linear_schedule(4, 1e-3, 0.3),
                            denoiser=lambda x, y_t, g: -3 * y_t,  # ŷ0 far outside the range
                            callback=lambda i, n, y: seen.append(y), generator=torch.Generator().manual_seed(0))
        return model.to_image(seen[-1], model.condition(lr))

    config = override(preset("tiny", objective), ["diffusion.sample_consistency=false"])  # clipping alone
    assert final_image(SR3(config)).abs().max() <= 1 + 1e-5
    raw = SR3(override(config, ["diffusion.sample_clip=false"]))
    assert final_image(raw).abs().max() > 1.5
