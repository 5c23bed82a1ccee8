"""LR-consistent sampling (`sr3model.consistency`): the projection's algebra, its effect on the
closed-form oracles, and the sampling paths that use it (plain, residual, tiled)."""

import pytest
import torch

from sr3model import SR3, override, preset
from sr3model.diffusion import predict_eps
from sr3model.consistency import apply_down, consistent, project, project_clipped, resample_matrix
from sr3model.metrics import lr_psnr
from sr3model.resample import downsample, upsample
from sr3model.samplers import SAMPLERS, clipped, get_sampler
from sr3model.schedules import inference_schedule, linear_schedule
from sr3model.tiling import super_resolve_any

from test_predictions import MU, STD, gaussian_denoiser
from test_samplers import oracle


def _images(*shape, seed=0, dtype=torch.float32):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


@pytest.mark.parametrize("size,lr_size", [((64, 64), (16, 16)), ((48, 80), (12, 20)), ((60, 60), (20, 20))])
def test_the_matrices_are_the_resample_operator(size, lr_size):
    y = _images(2, 3, *size, dtype=torch.float64)
    assert torch.allclose(apply_down(y, lr_size), downsample(y, lr_size), atol=1e-6)
    a = resample_matrix(size[0], lr_size[0], chunk=7)  # built in chunks: the same matrix
    assert torch.allclose(a, resample_matrix(size[0], lr_size[0]), atol=1e-12)
    assert torch.allclose(a.sum(dim=1), torch.ones(lr_size[0], dtype=torch.float64), atol=1e-6)  # keeps flat


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-6), (torch.float32, 2e-5)])
@pytest.mark.parametrize("size,lr_size", [((64, 64), (16, 16)), ((48, 80), (12, 20))])
def test_the_projection_is_consistent_idempotent_and_the_nearest_consistent_image(size, lr_size, dtype, atol):
    y, lr = _images(2, 3, *size, seed=1, dtype=dtype), _images(2, 3, *lr_size, seed=2, dtype=dtype)
    p = project(y, lr)
    assert p.dtype == dtype and p.shape == y.shape
    # downsample(P(y)) = lr, measured with the operator the metric uses (not our matrices)
    assert float((downsample(p, lr_size) - lr).abs().max()) < atol
    assert float((downsample(y, lr_size) - lr).abs().max()) > 0.1  # it was not before
    assert torch.allclose(project(p, lr), p, atol=atol)  # idempotent
    # nearest: y − P(y) is orthogonal to every move that stays consistent (P(z) − P(y))
    z = project(_images(2, 3, *size, seed=3, dtype=dtype), lr)
    inner = float(((y - p) * (z - p)).sum())
    assert abs(inner) < 1e-3 * float((y - p).norm() * (z - p).norm()), inner


def test_a_consistent_image_is_left_unchanged():
    hr = _images(2, 3, 64, 64, seed=4, dtype=torch.float64)
    lr = downsample(hr, (16, 16))
    assert torch.allclose(project(hr, lr), hr, atol=1e-6)
    # clip → project rounds keep an in-range consistent image as it is, too
    assert torch.allclose(project_clipped(hr, lr, -1.0, 1.0), hr, atol=1e-6)


def test_clip_and_project_rounds_end_consistent_and_shrink_what_the_final_clamp_cuts():
    lr = _images(2, 3, 16, 16, seed=5).clamp(-0.8, 1)  # saturated (white) LR pixels
    lr[:, :, :6] = 1.0
    y = _images(2, 3, 64, 64, seed=6) * 1.5
    once, thrice = (project_clipped(y, lr, -1.0, 1.0, rounds=r) for r in (1, 4))
    for p in (once, thrice):
        assert float((downsample(p, (16, 16)) - lr).abs().max()) < 2e-5
    outside = [float((p - p.clamp(-1, 1)).abs().sum()) for p in (once, thrice)]
    assert outside[1] < outside[0], outside


def _consistent_y0(seed=0):
    """A y0 (3, 3, 64, 64) and its own LR: the input the projection does not touch."""
    y0 = upsample(_images(3, 3, 16, 16, seed=seed) * 0.6, (64, 64)) + 0.1 * _images(3, 3, 64, 64, seed=seed + 1)
    return y0, downsample(y0, (16, 16))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 10, 100])
@pytest.mark.parametrize("clip", [False, True])
def test_every_sampler_with_the_oracle_still_recovers_a_consistent_y0(name, steps, clip):
    y0, lr = _consistent_y0()
    bounds = dict(low=-1.0, high=1.0) if clip else {}
    denoiser = consistent(oracle(y0), lr, **bounds)
    out = get_sampler(name)(denoiser, torch.zeros_like(y0), linear_schedule(steps, 1e-4, 0.1),
                            generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, y0, atol=5e-4), float((out - y0).abs().max())


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_the_oracle_of_an_inconsistent_y0_lands_on_its_projection(name):
    """The projection's effect on the oracle: it returns P(y0), not y0, when y0 disagrees with lr."""
    y0, _ = _consistent_y0()
    lr = _images(3, 3, 16, 16, seed=9) * 0.5
    out = get_sampler(name)(consistent(oracle(y0), lr), torch.zeros_like(y0), linear_schedule(10, 1e-4, 0.1),
                            generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, project(y0, lr), atol=5e-4)
    assert float((downsample(out, (16, 16)) - lr).abs().max()) < 5e-4


def _gaussian(sampler, schedule, lr, seed=0):
    y_T = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    run = get_sampler(sampler)
    denoiser = gaussian_denoiser()
    free = run(denoiser, None, schedule, y_T=y_T, generator=torch.Generator().manual_seed(seed + 1))
    tied = run(consistent(denoiser, lr), None, schedule, y_T=y_T, generator=torch.Generator().manual_seed(seed + 1))
    return free, tied


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [10, 50])
def test_gaussian_oracle_projected_sampling_is_the_projection_of_free_sampling(sampler, steps):
    """Gaussian data y0 ~ N(μ, s²) per pixel: the constrained posterior mean is the projection of the
    free one (the null-space part of y_t says nothing about A·y0), so the projected sampler returns
    exactly P(free sample) from the same noise: a draw of the data conditioned on D(y0) = lr, with
    mean P(μ) and per-pixel variance s²·diag(I − A⁺A) (average s²·(1 − 1/16) at ×4)."""
    schedule = inference_schedule(preset("natural-64-256").diffusion, steps)
    lr = downsample(MU + STD * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7),
                                           dtype=torch.float64), (8, 8)).expand(64, -1, -1, -1)
    free, tied = _gaussian(sampler, schedule, lr)
    assert torch.allclose(tied, project(free, lr), atol=1e-4), float((tied - project(free, lr)).abs().max())
    assert float((downsample(tied, (8, 8)) - lr).abs().max()) < 1e-4
    mean = tied.mean(dim=0)  # (3, 32, 32) over 64 samples: its squared error is the variance / 64
    want = project(torch.full((1, 3, 32, 32), MU, dtype=torch.float64), lr[:1])[0]
    noise = float(tied.var(dim=0).mean()) / 64
    assert 0.7 < float((mean - want).square().mean()) / noise < 1.3
    assert float((mean - MU).square().mean()) / noise > 3  # the free data mean is not it
    ratio = float(tied.var(dim=0).mean() / free.var(dim=0).mean())
    assert abs(ratio - 15 / 16) < 0.02, ratio


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_gaussian_oracle_keeps_the_data_mean_when_the_lr_is_the_datas_own(sampler):
    """An LR that the data mean already satisfies (D(μ) = μ) leaves the mean test of
    tests/test_predictions.py as it was: samples keep the data's mean."""
    schedule = inference_schedule(preset("natural-64-256").diffusion, 25)
    lr = torch.full((64, 3, 8, 8), MU, dtype=torch.float64)
    _, tied = _gaussian(sampler, schedule, lr)
    assert abs(float(tied.mean()) - MU) < 0.01


def _lr(seed=0, size=(16, 16)):
    """The LR of a photo-like HR in range (a feasible LR: some in-range image downsamples to it)."""
    hr = upsample(_images(2, 3, *size, seed=seed) * 0.7, (4 * size[0], 4 * size[1]))
    hr = (hr + 0.2 * _images(2, 3, 4 * size[0], 4 * size[1], seed=seed + 1)).clamp(-0.95, 0.95)
    return downsample(hr, size)


def _aiming_at(target: torch.Tensor, model: SR3):
    """A denoiser whose ŷ0 is always `target` (the image, in range, inconsistent with the LR); for
    the residual objective its y0 is target − x, for the regression one the skip's target − x."""
    def eps_hat(x, y_t, gamma):
        rows = target.repeat_interleave(x.shape[0] // target.shape[0], dim=0)
        if y_t is None:  # regression
            return rows - x if model.config.regression_skip else rows
        y0 = model.to_y0(rows, x)
        return predict_eps(y_t, gamma, y0)
    return eps_hat


@pytest.mark.parametrize("objective,scale", [("sr3", 1.0), ("residual", 1.0), ("residual", 0.2), ("regression", 1.0)])
def test_super_resolve_is_consistent_when_asked_and_as_before_when_not(objective, scale):
    before = ["diffusion.sample_consistency=false"]  # as configs written before the setting load
    model = SR3(override(preset("tiny", objective), [f"residual_scale={scale}", *before])).eval()
    lr = _lr()
    target = (upsample(lr, (64, 64)) + 0.3 * _images(2, 3, 64, 64, seed=8)).clamp(-0.95, 0.95)
    kwargs = dict(sampler="ddim", schedule=model.inference_schedule(4), samples=2, denoiser=_aiming_at(target, model))
    off = model.super_resolve(lr, consistency=False, generator=torch.Generator().manual_seed(0), **kwargs)
    on = model.super_resolve(lr, consistency=True, generator=torch.Generator().manual_seed(0), **kwargs)
    default = model.super_resolve(lr, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(default, off)  # a config without the setting samples as before
    assert torch.allclose(off, target[:, None].expand_as(off), atol=1e-3)
    lr2 = lr.repeat_interleave(2, dim=0)
    assert float(lr_psnr(on.flatten(0, 1), lr2).min()) > 60
    assert float(lr_psnr(off.flatten(0, 1), lr2).max()) < 40
    config_on = SR3(override(model.config, ["diffusion.sample_consistency=true"])).eval()
    assert torch.equal(config_on.super_resolve(lr, generator=torch.Generator().manual_seed(0), **kwargs), on)


def test_a_config_without_the_field_loads_with_consistency_off():
    data = preset("tiny").to_dict()
    del data["diffusion"]["sample_consistency"]
    assert type(preset("tiny")).from_dict(data).diffusion.sample_consistency is False


def test_a_tiled_canvas_is_projected_as_one_picture():
    """A fresh residual x0-model predicts ŷ0 = 0 (zero-initialised output layer) in every tile, so
    its output is x, the bicubic upsampling, which is not LR-consistent; projected on the whole
    canvas, the blended tiles are."""
    model = SR3(override(preset("tiny", "residual"), ["diffusion.prediction=x0"])).eval()
    lr = _lr(3, (28, 40))[:1]  # 3 × 4 tiles of 16 LR pixels sharing 4, non-square
    kwargs = dict(sampler="dpmpp-2m", schedule=model.inference_schedule(3))
    on, off = (super_resolve_any(model, lr, generator=torch.Generator().manual_seed(0), consistency=flag, **kwargs)[:, 0]
               for flag in (True, False))
    assert on.shape == off.shape == (1, 3, 112, 160)
    assert torch.allclose(off, model.condition(lr).clamp(-1, 1), atol=1e-4)
    assert float(lr_psnr(off, lr)) < 45
    assert float(lr_psnr(on, lr)) > 60
    assert float((downsample(on, (28, 40)) - lr).abs().max()) < 1e-3
