"""Metrics against hand-computed values on known images."""

import math

import pytest
import torch

from sr3model.metrics import (colour_error, consistency, detail_ratio, diversity, flat_mask, flat_noise_ratio,
                              lr_psnr, psnr, scores, ssim)
from sr3model.resample import downsample, upsample


@pytest.fixture
def image():
    from skimage import data
    img = torch.from_numpy(data.astronaut()[:256, :256].copy()).permute(2, 0, 1).float()[None] / 127.5 - 1
    return downsample(img, 64).clamp(-1, 1)


def test_psnr_of_a_constant_shift(image):
    shifted = image - 0.2  # 0.1 in [0, 1] units → MSE 0.01 → 20 dB (away from the clamp)
    img = image.clamp(-0.6, 1)
    assert float(psnr(img - 0.2, img)) == pytest.approx(20.0, abs=1e-3)
    assert torch.isinf(psnr(image, image)).all() or float(psnr(image, image)) > 100
    assert float(psnr(shifted, image)) < 21


def test_ssim_is_one_for_identical_and_lower_for_noisy(image):
    assert float(ssim(image, image)) == pytest.approx(1.0, abs=1e-6)
    noisy = (image + 0.2 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert float(ssim(noisy, image)) < 0.8


def test_consistency_of_the_bicubic_upsample_itself(image):
    lr = downsample(image, 16).clamp(-1, 1)
    up = upsample(lr, 64).clamp(-1, 1)
    c = float(consistency(up, lr))
    assert 0 < c < 200  # bicubic up then anti-aliased down nearly returns the LR image (×1e-5 units)
    far = float(consistency(torch.zeros_like(up), lr))
    assert far > 100 * c
    mse = c * 1e-5
    assert float(lr_psnr(up, lr)) == pytest.approx(-10 * math.log10(mse), rel=1e-4)


def test_consistency_of_a_constant_offset_is_its_square():
    lr = torch.zeros(1, 3, 8, 8)
    sr = torch.full((1, 3, 32, 32), 0.2)  # 0.1 in [0, 1] units
    assert float(consistency(sr, lr)) == pytest.approx(0.01 * 1e5, rel=1e-4)


def test_diversity_is_zero_for_identical_samples_and_the_std_otherwise():
    same = torch.zeros(2, 4, 3, 8, 8)
    assert torch.equal(diversity(same), torch.zeros(2))
    two = torch.stack([torch.full((3, 8, 8), -1.0), torch.full((3, 8, 8), 1.0)])[None]  # 0 and 1 in [0, 1]
    assert float(diversity(two)) == pytest.approx(math.sqrt(0.5), rel=1e-6)
    with pytest.raises(ValueError):
        diversity(same[:, :1])


def test_colour_error_is_the_mean_channel_shift_in_levels(image):
    img = image.clamp(-0.8, 0.8)
    assert float(colour_error(img, img)) == 0.0
    shift = torch.tensor([0.2, 0.0, -0.1])[None, :, None, None]  # [-1, 1] units: 25.5, 0, 12.75 levels
    assert float(colour_error(img + shift, img)) == pytest.approx((25.5 + 0 + 12.75) / 3, rel=1e-4)
    noise = 0.1 * torch.randn(img.shape, generator=torch.Generator().manual_seed(0))
    assert float(colour_error(img + noise, img)) < 1.0  # zero-mean grain is not a colour shift


def test_detail_ratio_is_one_for_the_photo_low_for_bicubic_high_for_grain(image):
    lr = downsample(image, 16).clamp(-1, 1)
    assert float(detail_ratio(image, image, 16)) == pytest.approx(1.0, rel=1e-6)
    bicubic = upsample(lr, 64).clamp(-1, 1)
    assert float(detail_ratio(bicubic, image, 16)) < 0.3  # bicubic restores little of the detail
    grain = (image + 0.3 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert float(detail_ratio(grain, image, 16)) > 1.5


def _photo_crops() -> torch.Tensor:
    """Eight 64² crops of two photos (the quickstart's held-out ones): flat backgrounds and fur."""
    from skimage import data

    out = []
    for name in ("chelsea", "coffee"):
        img = torch.from_numpy(getattr(data, name)().copy()).permute(2, 0, 1).float()[None] / 127.5 - 1
        h, w = img.shape[-2:]
        for top, left in ((0, 0), (h // 2 - 32, w // 2 - 32), (h - 64, w - 64), (0, w - 64)):
            out.append(img[..., top:top + 64, left:left + 64])
    return torch.cat(out)


def test_flat_noise_ratio_is_one_for_the_photo_and_below_for_bicubic():
    hr = _photo_crops()
    lr = downsample(hr, 16)
    mask = flat_mask(hr, 16)
    assert 0.2 < float(mask.float().mean()) < 0.8  # the threshold finds flat parts, and not everything
    photo = scores(hr[:, None], hr, lr)
    assert photo["flat_noise_ratio"] == pytest.approx(1.0, rel=1e-9)
    bicubic = scores(upsample(lr, 64).clamp(-1, 1)[:, None], hr, lr)
    assert bicubic["flat_noise_ratio"] < 0.3
    per_image = flat_noise_ratio(hr, hr, 16)  # a crop without flat pixels has no ratio of its own
    assert torch.isnan(per_image).any() and torch.allclose(per_image[~per_image.isnan()],
                                                           torch.ones(1), rtol=1e-6)


def test_grain_on_flat_areas_raises_the_flat_noise_ratio_where_the_detail_ratio_barely_moves():
    """The failure this metric refuses: grain counted as detail. 2.5/255 of noise on the flat pixels
    only (invisible in the detail ratio, which the textured parts dominate) more than triples it."""
    hr = _photo_crops()
    lr = downsample(hr, 16)
    noise = 0.02 * torch.randn(hr.shape, generator=torch.Generator().manual_seed(0))
    grainy = (hr + noise * flat_mask(hr, 16)).clamp(-1, 1)
    found = scores(grainy[:, None], hr, lr)
    assert found["flat_noise_ratio"] > 3
    assert found["detail_ratio"] < 1.1
    textured = (hr + noise * ~flat_mask(hr, 16)).clamp(-1, 1)  # the same noise where the photo has texture
    assert scores(textured[:, None], hr, lr)["flat_noise_ratio"] < 1.2
