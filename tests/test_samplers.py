"""Every registered sampler obeys one contract; an oracle denoiser makes each recover y0."""

import pytest
import torch

from sr3model.diffusion import ddpm_mean, predict_eps
from sr3model.samplers import SAMPLERS, ddpm_step, get_sampler
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
def test_oracle_denoiser_recovers_y0(name, y0, steps, start, end):
    schedule = linear_schedule(steps, start, end)
    out = get_sampler(name)(oracle(y0), torch.zeros_like(y0), schedule,
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
