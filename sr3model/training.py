"""One training step of SR3 (Algorithm 1), with no knowledge of Ray or MLflow.

    repeat: (x, y0) ~ data; γ ~ p(γ); ε ~ N(0, I); step on ∇ ‖f(x, √γ y0 + √(1−γ) ε, γ) − ε‖_p^p

The loss itself is `SR3.forward`; this module adds what the paper's Appendix A trains with — Adam,
a linear learning-rate warm-up then a constant rate, gradient clipping, EMA — plus the data
augmentation of Table 6 (random flips; Gaussian blur of the LR input) and bf16 autocast on CUDA.
The distributed loop (`pipelines/`) calls `train_step` and nothing else from here.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .ema import EMA


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.is_cuda for p in params)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay,
                            fused=fused or None, foreach=None if fused else True)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then constant (step counts from 0)."""
    if config.warmup_steps <= 0:
        return config.lr
    return config.lr * min(1.0, (step + 1) / config.warmup_steps)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image (B, C, H, W) with its own σ (B,) by a separable kernel; σ = 0 leaves it."""
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    s = sigma.to(images).clamp_min(1e-6)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None] / s) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, K)
    b, c, h, w = images.shape
    flat = F.pad(images.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    k = kernel.repeat_interleave(c, dim=0)  # (B·C, K)
    flat = F.conv2d(flat, k[:, None, None, :], groups=b * c)
    flat = F.conv2d(flat, k[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def augment(hr: torch.Tensor, lr: torch.Tensor | None, config: TrainConfig,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random horizontal flip of each (HR, LR) pair; Gaussian blur of LR with σ ~ U(blur_sigma)."""
    gen_device = generator.device if generator is not None else "cpu"
    b = hr.shape[0]
    if config.hflip:
        flip = (torch.rand(b, generator=generator, device=gen_device) < 0.5).to(hr.device)
        hr = torch.where(flip[:, None, None, None], hr.flip(-1), hr)
        if lr is not None:
            lr = torch.where(flip[:, None, None, None], lr.flip(-1), lr)
    low, high = config.blur_sigma
    if lr is not None and high > 0:
        u = torch.rand(b, generator=generator, device=gen_device).to(lr.device)
        lr = gaussian_blur(lr, low + u * (high - low))
    return hr, lr


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, hr: torch.Tensor,
               lr: torch.Tensor | None, *, step: int, config: TrainConfig, ema: EMA | None = None,
               generator: torch.Generator | None = None) -> dict[str, float]:
    """One optimiser step; `model` is an `SR3` (or DDP around one). Returns loss, grad norm, lr."""
    rate = learning_rate(step, config)
    for group in optimizer.param_groups:
        group["lr"] = rate
    hr, lr = augment(hr, lr, config, generator)
    with _autocast(hr.device):
        loss = model(hr, lr, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    if ema is not None:
        ema.update(getattr(model, "module", model).net)
    return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "lr": rate}
