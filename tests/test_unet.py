"""The paper's U-Net: shapes for every preset task, parameter counts against Table A.1, init."""

import dataclasses

import pytest
import torch

from sr3model.config import PAPER_PARAMS, PRESETS, preset
from sr3model.layers import AttentionBlock, ResBlock
from sr3model.unet import UNet, build_unet, count_parameters


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_output_shape_for_each_preset_task_on_meta_device(name):
    config = PRESETS[name]
    with torch.device("meta"):
        net = build_unet(config)
        out = net(torch.empty(2, 6, config.hr_size, config.hr_size), torch.empty(2))
    assert out.shape == (2, 3, config.hr_size, config.hr_size)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_count_is_within_25_percent_of_the_paper(name):
    with torch.device("meta"):
        n = count_parameters(build_unet(PRESETS[name]))
    assert 0.75 <= n / PAPER_PARAMS[name] <= 1.25, f"{name}: {n / 1e6:.0f}M vs {PAPER_PARAMS[name] / 1e6:.0f}M"


def test_attention_sits_at_16x16_and_blocks_resample_inside():
    net = build_unet(preset("faces-16-128"))
    attn = [m for m in net.modules() if isinstance(m, AttentionBlock)]
    # 3 down blocks + 4 up blocks at 16², plus the middle block
    assert len(attn) == 3 + 4 + 1
    resampling = [m.resample for m in net.modules() if isinstance(m, ResBlock) and m.resample]
    assert resampling.count("down") == 4 and resampling.count("up") == 4


def test_small_width_forward_at_task_size_and_zero_initialised_output():
    config = preset("tiny")
    net = build_unet(config)
    x = torch.randn(3, 6, 64, 64)
    out = net(x, torch.rand(3))
    assert out.shape == (3, 3, 64, 64)
    assert torch.count_nonzero(out) == 0  # zero-initialised output convolution
    torch.manual_seed(0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    a, b = net(x, torch.tensor([0.1, 0.1, 0.1])), net(x, torch.tensor([0.9, 0.9, 0.9]))
    assert not torch.allclose(a, b)  # the noise level γ changes the output (FiLM)


def test_any_size_divisible_by_the_downsampling_factor():
    net = build_unet(preset("tiny")).eval()
    assert net(torch.randn(1, 6, 32, 96), torch.rand(1)).shape == (1, 3, 32, 96)
    with pytest.raises(ValueError, match="divisible"):
        UNet(preset("tiny").unet, image_size=66)


def test_activation_checkpointing_gives_the_same_gradients():
    config = preset("tiny")
    torch.manual_seed(0)
    plain = build_unet(config)
    ckpt = UNet(dataclasses.replace(config.unet, checkpointing=True), config.hr_size)
    ckpt.load_state_dict(plain.state_dict())
    for p in list(plain.parameters()) + list(ckpt.parameters()):  # make the branches non-trivial
        torch.nn.init.normal_(p, std=0.02) if p.ndim > 1 else None
    ckpt.load_state_dict(plain.state_dict())
    x, g = torch.randn(2, 6, 64, 64), torch.rand(2)
    grads = []
    for net in (plain, ckpt):
        net.zero_grad()
        net(x, g).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)
