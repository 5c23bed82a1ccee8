"""`SR3`: a U-Net bundled with its config and objective — training loss and super-resolution.

Objectives (`SR3Config.objective`):

| objective       | network input          | target / output                 | paper                 |
| --------------- | ---------------------- | ------------------------------- | --------------------- |
| `sr3`           | concat(x, y_t), γ      | ε (Algorithm 1); y0 by Alg. 2    | SR3 §2                |
| `residual`      | concat(x, y_t), γ      | ε of y0 − x; output x + sample   | SRDiff (Li et al.)    |
| `regression`    | x, γ = 1               | y0 directly, L_p loss, one step  | SR3's baseline (§4)   |
| `unconditional` | y_t, γ                 | ε; samples from noise alone      | DDPM base of cascade  |

x is always the LR image upsampled bicubically to HR size; images are (B, 3, H, W) in [-1, 1].
`forward(hr, lr)` returns the training loss, so the module can be wrapped by DDP as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import SR3Config
from .diffusion import eps_loss, q_sample, sample_noise_level
from .resample import upsample
from .samplers import Callback, Denoiser, Generators, clipped, get_sampler, randn
from .schedules import NoiseSchedule, inference_schedule, training_schedule
from .unet import build_unet


class SR3(nn.Module):
    def __init__(self, config: SR3Config):
        super().__init__()
        self.config = config
        self.net = build_unet(config)
        self.schedule = training_schedule(config.diffusion)

    # -- conditioning ----------------------------------------------------------------------------
    def condition(self, lr: torch.Tensor | None) -> torch.Tensor | None:
        """x: the LR image (B, 3, lr, lr) upsampled bicubically to HR size; None if unconditional."""
        if not self.config.conditional:
            return None
        if lr is None:
            raise ValueError(f"a {self.config.objective!r} model needs an LR image")
        return upsample(lr, tuple(s * self.config.scale for s in lr.shape[-2:]))

    def _inputs(self, x: torch.Tensor | None, y_t: torch.Tensor | None) -> torch.Tensor:
        parts = [t for t in (x, y_t) if t is not None]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def denoiser(self) -> Denoiser:
        """The ε-predicting callable the samplers use: (x, y_t, γ) → ε̂ (regression: y0, y_t = None)."""
        def eps_hat(x: torch.Tensor | None, y_t: torch.Tensor | None, gamma: torch.Tensor) -> torch.Tensor:
            return self.net(self._inputs(x, y_t), gamma)
        return eps_hat

    # -- training (Algorithm 1) -----------------------------------------------------------------
    def forward(self, hr: torch.Tensor, lr: torch.Tensor | None = None, *,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """The training loss for a batch of HR images (B, 3, H, W) and their LR images."""
        x = self.condition(lr)
        p = self.config.diffusion.loss
        batch = hr.shape[0]
        if self.config.objective == "regression":
            ones = torch.ones(batch, device=hr.device)
            return eps_loss(self.net(x, ones), hr, p)
        y0 = hr - x if self.config.objective == "residual" else hr
        gamma = sample_noise_level(self.schedule, batch, generator=generator, device=hr.device)
        eps = randn(y0.shape, generator=generator, like=y0, dtype=y0.dtype)
        y_t = q_sample(y0, gamma, eps)
        return eps_loss(self.denoiser()(x, y_t, gamma), eps, p)

    # -- inference (Algorithm 2) ----------------------------------------------------------------
    def inference_schedule(self, steps: int | None = None, beta_start: float | None = None,
                           beta_end: float | None = None) -> NoiseSchedule:
        return inference_schedule(self.config.diffusion, steps, beta_start, beta_end)

    @torch.no_grad()
    def super_resolve(self, lr: torch.Tensor | None = None, *, sampler: str | None = None,
                      schedule: NoiseSchedule | None = None, samples: int = 1,
                      batch: int | None = None, generator: Generators = None,
                      callback: Callback | None = None, denoiser: Denoiser | None = None) -> torch.Tensor:
        """Samples (B, samples, 3, H, W) in [-1, 1] for LR images (B, 3, h, w).

        Unconditional models take `lr=None` and `batch=B`. `denoiser` replaces the plain network
        call (e.g. `sr3model.tiling.TiledDenoiser` for images larger than the model's size);
        `schedule` defaults to the config's. `generator` is one generator or one per output row
        (B·samples, image-major), so each sample's noise can be its own. With the config's
        `diffusion.sample_clip`, ŷ0 stays in the image range at every step (`samplers.clipped`;
        for the residual model, x + ŷ0).
        """
        cfg = self.config
        if lr is not None and lr.shape[1] != 3:
            raise ValueError(f"expected RGB LR images (B, 3, h, w), got {tuple(lr.shape)}")
        x = self.condition(lr)
        if x is not None:
            x = x.repeat_interleave(samples, dim=0)  # (B·samples, 3, H, W)
        if cfg.objective == "regression":  # one step, γ = 1; the denoiser ignores y_t
            out = (denoiser or self.denoiser())(x, None, torch.ones(x.shape[0], device=x.device))
        else:
            n = (lr.shape[0] if lr is not None else (batch or 1)) * samples
            shape = (n, 3, cfg.hr_size, cfg.hr_size) if x is None else tuple(x.shape)
            device = x.device if x is not None else next(self.parameters()).device
            y_T = randn(shape, generator=generator, device=device)
            run = get_sampler(sampler or cfg.diffusion.sample_sampler)
            denoise = denoiser or self.denoiser()
            if cfg.diffusion.sample_clip:
                denoise = clipped(denoise, -1 - x, 1 - x) if cfg.objective == "residual" else clipped(denoise)
            out = run(denoise, x, schedule or self.inference_schedule(),
                      generator=generator, callback=callback, y_T=y_T)
            if cfg.objective == "residual":
                out = out + x
        out = out.float().clamp(-1, 1)
        return out.reshape(-1, samples, *out.shape[1:])
