"""ε / v / y0 prediction, step-budget-aware schedules and every sampler, against closed forms.

- Round trips: v ↔ ε ↔ ŷ0 are exact changes of variables at every level γ.
- An oracle network for each prediction (it returns the true ε, v or y0) makes every sampler
  recover y0 through `SR3.super_resolve`, for the sr3 and residual objectives.
- Gaussian data y0 ~ N(μ, s²) per pixel has the exact posterior-mean denoiser
  E[y0 | y_t] = μ + √γ s² / (γ s² + 1 − γ) · (y_t − √γ μ). With it, a sampler whose schedule starts
  where its start noise N(0, I) matches must return samples with the data's mean for any step
  count K; a schedule whose first level γ_K is far from 0 shifts the mean (the colour shift the
  y0-oracle cannot see, since it ignores y_t).
"""

import math

import pytest
import torch
from torch import nn

from sr3model import SR3, override, preset
from sr3model.diffusion import predict_eps, predict_v, predict_y0, q_sample, target, to_eps
from sr3model.resample import downsample
from sr3model.samplers import SAMPLERS, get_sampler
from sr3model.schedules import check_start, inference_schedule, linear_schedule, log_snr_schedule

PREDICTIONS = ("eps", "v", "x0")
MU, STD = 0.3, 0.5


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_round_trips_between_eps_v_and_y0(prediction):
    g = torch.Generator().manual_seed(0)
    y0, eps = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g,
                                                                                             dtype=torch.float64)
    gamma = torch.tensor([1 - 1e-4, 0.9, 0.1, 4e-5], dtype=torch.float64)
    y_t = q_sample(y0, gamma, eps)
    eps_hat = to_eps(prediction, target(prediction, y0, gamma, eps), y_t, gamma)
    assert torch.allclose(eps_hat, eps, atol=1e-8)
    assert torch.allclose(predict_y0(y_t, gamma, eps_hat), y0, atol=1e-8)
    v = predict_v(y0, gamma, eps)  # v is a rotation of (ε, y0): its norm is theirs
    assert torch.allclose(v.square() + (gamma.sqrt()[:, None, None, None] * y0 + (1 - gamma).sqrt()[:, None, None, None]
                                        * eps).square(), eps.square() + y0.square(), atol=1e-8)


class OracleNet(nn.Module):
    """A network that knows y0: returns the true target of `prediction` for its input y_t."""

    def __init__(self, y0: torch.Tensor, prediction: str, conditional: bool = True):
        super().__init__()
        self.y0, self.prediction, self.conditional = y0, prediction, conditional
        self.anchor = nn.Parameter(torch.zeros(1))  # so the model has a device

    def forward(self, inputs: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        y_t = inputs[:, 3:] if self.conditional else inputs
        y0 = self.y0.repeat_interleave(y_t.shape[0] // self.y0.shape[0], dim=0)  # image-major rows
        return target(self.prediction, y0, gamma, predict_eps(y_t, gamma, y0))


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("objective,scale", [("sr3", 1.0), ("residual", 1.0), ("residual", 0.2)])
def test_an_oracle_network_of_each_prediction_recovers_y0_with_every_sampler(sampler, prediction, objective, scale):
    config = override(preset("tiny"), [f"objective={objective}", f"diffusion.prediction={prediction}",
                                       f"residual_scale={scale}"])
    model = SR3(config).eval()
    g = torch.Generator().manual_seed(0)
    hr = (torch.rand(2, 3, 64, 64, generator=g) * 1.6 - 0.8)
    lr = downsample(hr, (16, 16))  # the HR's own LR: the consistency projection (on) leaves it as it is
    assert model.config.diffusion.sample_consistency
    y0 = model.to_y0(hr, model.condition(lr))
    model.net = OracleNet(y0, prediction)
    for steps in (1, 3, 25):
        out = model.super_resolve(lr, sampler=sampler, schedule=model.inference_schedule(steps=steps), samples=2,
                                  generator=torch.Generator().manual_seed(1))
        assert out.shape == (2, 2, 3, 64, 64)
        error = float((out - hr[:, None]).abs().max())
        assert error < 2e-3, f"{sampler}/{prediction}/{objective}, {steps} steps: max error {error:.2e}"


def gaussian_denoiser(mu: float = MU, std: float = STD):
    """The exact E[y0 | y_t] of y0 ~ N(μ, s²) per pixel, returned as ε̂ (float64)."""
    var = std ** 2

    def eps_hat(x, y_t, gamma):
        g = gamma.double()[:, None, None, None]
        y0 = mu + g.sqrt() * var / (g * var + 1 - g) * (y_t - g.sqrt() * mu)
        return predict_eps(y_t, gamma.double(), y0)
    return eps_hat


def _gaussian_samples(sampler: str, schedule, seed: int = 0) -> torch.Tensor:
    y_T = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return get_sampler(sampler)(gaussian_denoiser(), None, schedule, y_T=y_T,
                                generator=torch.Generator().manual_seed(seed + 1))


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [10, 25, 100])
def test_default_schedules_keep_the_data_mean_for_any_step_budget(sampler, steps):
    """98,304 pixels: the sample mean's standard error is 0.0016, so 0.01 is a 6σ bound."""
    config = preset("natural-64-256").diffusion
    samples = _gaussian_samples(sampler, inference_schedule(config, steps))
    assert abs(float(samples.mean()) - MU) < 0.01, f"{sampler} K={steps}: mean {float(samples.mean()):.4f}"


def test_a_schedule_that_starts_too_clean_shifts_the_mean_and_is_refused():
    config = preset("natural-64-256").diffusion
    old = linear_schedule(10, config.sample_beta_start, config.sample_beta_end)  # γ_K = 0.58
    mean = float(_gaussian_samples("ddim", old).mean())
    assert abs(mean - MU) > 0.05  # the colour shift the sampler alone makes
    with pytest.raises(ValueError, match="γ_K = 0.5"):
        check_start(old, config)
    with pytest.raises(ValueError, match="γ_K"):
        inference_schedule(config, 25, 1e-4, 0.1)
    strong = inference_schedule(config, 10, 1e-4, 0.99)  # explicit and valid: γ_K = 1.1e-5
    assert float(strong.gammas[-1]) < float(log_snr_schedule(10, 0.9999, 4.4e-5).gammas[-1])
    assert abs(float(_gaussian_samples("ddim", strong).mean()) - MU) < 0.01


@pytest.mark.parametrize("steps", [1, 2, 10, 100])
def test_log_snr_schedule_spans_the_training_levels_uniformly(steps):
    config = preset("tiny").diffusion
    schedule = inference_schedule(config, steps)
    last = float(linear_schedule(config.steps, config.beta_start, config.beta_end).gammas[-1])
    assert len(schedule) == steps and math.isclose(float(schedule.gammas[-1]), last, rel_tol=1e-9)
    if steps > 1:
        assert math.isclose(float(schedule.gammas[0]), 1 - 1e-4, rel_tol=1e-12)
        gaps = schedule.log_snr[:-1] - schedule.log_snr[1:]
        assert torch.allclose(gaps, gaps[0].expand_as(gaps), rtol=1e-9)


def test_dpmpp_2m_reaches_the_data_std_in_ten_steps_where_ddim_does_not():
    schedule = inference_schedule(preset("natural-64-256").diffusion, 10)
    fast, ddim = (float(_gaussian_samples(name, schedule).std()) for name in ("dpmpp-2m", "ddim"))
    assert abs(fast - STD) < 0.03, f"dpmpp-2m std {fast:.3f}"
    assert abs(ddim - STD) > abs(fast - STD)  # the first-order solver is further off at K = 10


def test_regression_with_a_skip_starts_at_bicubic_and_the_papers_at_zero():
    lr = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    skip = SR3(preset("tiny", "regression")).eval()  # zero-initialised output layer
    assert skip.config.regression_skip
    assert torch.allclose(skip.super_resolve(lr, consistency=False)[:, 0], skip.condition(lr).clamp(-1, 1))
    paper = SR3(override(preset("tiny", "regression"), ["regression_skip=false"])).eval()
    assert torch.equal(paper.super_resolve(lr, consistency=False)[:, 0], torch.zeros(2, 3, 64, 64))
    hr = skip.condition(lr)
    assert float(skip(hr, lr)) == 0.0 and float(paper(hr, lr)) > 0.1  # the loss is on HR − x
