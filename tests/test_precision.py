"""bf16 autocast of the U-Net while sampling: on CUDA by default, on request anywhere, never on CPU
by default (CPUs without bf16 units run it far slower). The GPU check of its accuracy on a trained
model is benchmarks/gpu_check.py; here the code path is taken on CPU where it can be."""

import pytest
import torch

from model_support import make_tiny
from sr3model.metrics import psnr
from sr3model.model import autocast
from sr3model.tiling import super_resolve_any


def test_auto_is_bf16_on_cuda_only():
    assert isinstance(autocast(torch.device("cuda"), "auto"), torch.autocast)
    assert not isinstance(autocast(torch.device("cpu"), "auto"), torch.autocast)
    assert isinstance(autocast(torch.device("cpu"), "bf16"), torch.autocast)
    assert not isinstance(autocast(torch.device("cuda"), "fp32"), torch.autocast)


def test_bf16_runs_the_unet_in_bf16_and_hands_samplers_fp32():
    model = make_tiny("sr3", 0, "diffusion.prediction=v")
    seen = []
    model.net.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    g = torch.Generator().manual_seed(0)
    x, y_t = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.randn(2, 3, 16, 16, generator=g)  # any size ÷4
    gamma = torch.tensor([0.3, 0.9])
    fp32, auto, bf16 = (model.denoiser(p)(x, y_t, gamma) for p in ("fp32", "auto", "bf16"))
    assert seen == [torch.float32, torch.float32, torch.bfloat16]
    assert torch.equal(fp32, auto) and bf16.dtype == torch.float32
    assert float((bf16 - fp32).abs().max()) < 0.05 and not torch.equal(bf16, fp32)
    with pytest.raises(ValueError, match="precision"):
        model.denoiser("fp16")


def test_bf16_samples_stay_close_to_fp32_through_tiling():
    model = make_tiny("sr3", 0, "diffusion.prediction=v")
    lr = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1  # two tiles
    out = {p: super_resolve_any(model, lr, sampler="dpmpp-2m", schedule=model.inference_schedule(2), precision=p,
                                generator=torch.Generator().manual_seed(1)) for p in ("fp32", "bf16")}
    assert out["fp32"].shape == (1, 1, 3, 64, 96)
    assert float(psnr(out["bf16"][:, 0], out["fp32"][:, 0])) > 30
