"""One training step of SR3 (Algorithm 1), with no knowledge of Ray or MLflow.

    repeat: (x, y0) ~ data; γ ~ p(γ); ε ~ N(0, I); step on ∇ ‖f(x, √γ y0 + √(1−γ) ε, γ) − ε‖_p^p

The loss itself is `SR3.forward`; this module adds what the paper's Appendix A trains with — Adam,
a linear learning-rate warm-up then a constant rate, gradient clipping, EMA — plus the data
augmentation of Table 6 (random flips; Gaussian blur of the LR input) and bf16 autocast on CUDA.
The distributed loop (`pipelines/`) calls `train_step` and nothing else from here.

    train_step: lr(step) → augment → draw γ, ε for the batch (SR3.draw_noise) → per micro-batch:
                loss · share, backward (DDP no_sync but the last) → clip → Adam → EMA

The step never waits for the device: no random draw or statistic goes through the host, and it
returns the loss and gradient norm as device tensors (the loop reads them every `log_every` steps).
Gradient accumulation (`micro_batch`) gives the gradient of the whole batch's mean loss.
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
    """Linear warm-up over `warmup_steps`, then constant (step counts from 0) — or, with
    `cooldown_steps` > 0, linearly down from step `cooldown_start` to 0 at `cooldown_start +
    cooldown_steps` (and 0 after it)."""
    rate = config.lr if config.warmup_steps <= 0 else config.lr * min(1.0, (step + 1) / config.warmup_steps)
    if config.cooldown_steps > 0 and step >= config.cooldown_start:
        rate *= max(0.0, (config.cooldown_start + config.cooldown_steps - step) / config.cooldown_steps)
    return rate


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """Blur each image (B, C, H, W) with its own σ (B,) by a separable kernel; σ = 0 leaves it.
    The kernel spans ±`radius` pixels (default ⌈3·max σ⌉, which reads σ on the host)."""
    if radius is None:
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
        u = torch.rand(b, generator=generator, device=gen_device)
        # on an accelerator the kernel spans the bound's ±3σ: reading this batch's largest σ would
        # make the host wait for the device every step
        radius = None if u.device.type == "cpu" else max(1, int(math.ceil(3 * high)))
        lr = gaussian_blur(lr, (low + u * (high - low)).to(lr.device), radius)
    return hr, lr


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, hr: torch.Tensor,
               lr: torch.Tensor | None, *, step: int, config: TrainConfig, ema: EMA | None = None,
               generator: torch.Generator | None = None, micro_batch: int | None = None,
               extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor | float]:
    """One optimiser step on the batch (hr, lr); `model` is an `SR3` (or DDP around one).

    Returns {"loss", "grad_norm"} as detached 0-d tensors on the batch's device — reading them
    (`float()`) waits for the device, so a loop reads them only when it logs — and "lr" (float).

    `micro_batch` (default: the whole batch) splits the batch into chunks of that many images whose
    gradients accumulate before the one optimiser step: each chunk's loss is weighted by its share
    of the batch, so the gradient is the whole batch's mean; under DDP, all but the last chunk run
    in `no_sync()` (one gradient all-reduce per step). Augmentation, γ and ε are drawn once for the
    whole batch (in the same order as without accumulation) and sliced per chunk, so the step does
    not depend on `micro_batch` beyond floating-point summation order.

    `extra`: more per-image tensors (B, …) for the model's loss, sliced like the batch and passed
    as keyword arguments — a distilled student's `teacher` outputs and noise `seed`s
    (`sr3model.distill`; a student's config turns augmentation off, as they cannot be flipped).
    """
    rate = learning_rate(step, config)
    for group in optimizer.param_groups:
        group["lr"] = rate
    hr, lr = augment(hr, lr, config, generator)
    core = getattr(model, "module", model)
    noise = core.draw_noise(hr, generator=generator)
    batch = hr.shape[0]
    size = batch if micro_batch is None or micro_batch <= 0 else min(micro_batch, batch)
    starts = list(range(0, batch, size))
    optimizer.zero_grad(set_to_none=True)
    total = None
    for k, start in enumerate(starts):
        part = slice(start, start + size)
        last = k == len(starts) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with _autocast(hr.device):
                loss = model(hr[part], None if lr is None else lr[part], generator=generator,
                             **{name: value[part] for name, value in noise.items()},
                             **{name: value[part] for name, value in (extra or {}).items()})
            if len(starts) > 1:
                loss = loss * (hr[part].shape[0] / batch)  # Σ_chunks = the batch's mean loss
            loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    if ema is not None:
        ema.update(core.net)
    return {"loss": total, "grad_norm": grad_norm.detach(), "lr": rate}
