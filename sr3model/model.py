"""`SR3`: a U-Net bundled with its config and objective — training loss and super-resolution.

Objectives (`SR3Config.objective`):

| objective       | network input          | target / output                 | paper                 |
| --------------- | ---------------------- | ------------------------------- | --------------------- |
| `sr3`           | concat(x, y_t), γ      | ε (Algorithm 1); y0 by Alg. 2    | SR3 §2                |
| `residual`      | concat(x, y_t), γ      | ε of y0 = (HR − x)/s; output x + s·sample | SRDiff (Li et al.) |
| `regression`    | x, γ = 1               | y0 (or y0 − x, `regression_skip`), L_p loss, one step | SR3's baseline (§4) |
| `unconditional` | y_t, γ                 | ε; samples from noise alone      | DDPM base of cascade  |

The diffusion objectives' network predicts `config.diffusion.prediction` — ε as in the paper, v, or
y0 (see `sr3model.diffusion`); the loss is on that target and `denoiser()` converts the output to ε̂,
so samplers, ŷ0 clipping and tiling see ε̂ whatever the network predicts.

x is always the LR image upsampled bicubically to HR size; images are (B, 3, H, W) in [-1, 1].
s = `residual_scale` (1 = SRDiff's plain residual, and configs written before the field): HR − x
of natural photos spreads ~0.1, a tenth of what the schedules, v-prediction and the samplers
assume of y0 (README "Where the grain came from"). `to_y0` / `to_image` map between the two.
`forward(hr, lr)` returns the training loss, so the module can be wrapped by DDP as it is.

A distilled K-step student (`config.distill.student_steps` = K > 0, `sr3model.distill`) is the same
network: `forward(hr, lr, teacher=, seed=)` returns the distillation loss (its ŷ0 at each of its K
levels regressed onto the teacher's output for the start noise of `seed`), and `super_resolve`
samples it with its config's sampler `distilled` at its K levels like any other model.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .config import SR3Config
from .diffusion import lp_loss, q_sample, sample_noise_level, target, to_eps
from .resample import upsample
from .consistency import consistent, project_clipped
from .samplers import Callback, Denoiser, Generators, clipped, get_sampler, randn
from .schedules import NoiseSchedule, inference_schedule, training_schedule
from .unet import build_unet


PRECISIONS = ("auto", "bf16", "fp32")


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast for the U-Net: on CUDA by default ("auto"), anywhere with "bf16", never with "fp32"."""
    use = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()


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

    def to_y0(self, hr: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """The diffused y0 of an HR image: HR, or (HR − x) / residual_scale for the residual objective."""
        if self.config.objective != "residual":
            return hr
        return (hr - x) / self.config.residual_scale

    def to_image(self, y0: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """The image of a (predicted) y0: the inverse of `to_y0`."""
        if self.config.objective != "residual":
            return y0
        return x + self.config.residual_scale * y0

    def network_input(self, x: torch.Tensor | None, y_t: torch.Tensor | None) -> torch.Tensor:
        """What the U-Net sees: concat(x, y_t) on channels, or whichever of them is given."""
        parts = [t for t in (x, y_t) if t is not None]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def denoiser(self, precision: str = "auto") -> Denoiser:
        """The callable the samplers use: (x, y_t, γ) → ε̂, whatever the network predicts
        (`diffusion.prediction`); for regression (y_t = None) the network's y0.

        `precision`: "auto" runs the U-Net under bf16 autocast on CUDA and in fp32 elsewhere (CPUs
        without bf16 units run it ~100× slower); "bf16" / "fp32" force it. The conversion to ε̂ and
        everything the samplers do stays in fp32."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        prediction = self.config.diffusion.prediction

        def eps_hat(x: torch.Tensor | None, y_t: torch.Tensor | None, gamma: torch.Tensor) -> torch.Tensor:
            inputs = self.network_input(x, y_t)
            with autocast(inputs.device, precision):
                out = self.net(inputs, gamma)
            out = out.float() if out.dtype == torch.bfloat16 else out
            return out if y_t is None else to_eps(prediction, out, y_t, gamma)
        return eps_hat

    # -- training (Algorithm 1) -----------------------------------------------------------------
    def draw_noise(self, hr: torch.Tensor, *, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Algorithm 1's random draws for a batch of HR images: γ ~ p(γ) (B,) and ε (B, 3, H, W),
        as `forward(..., gamma=, eps=)` takes them ({} for regression, which draws nothing).
        Drawn once for a whole batch and sliced per micro-batch, they make gradient accumulation
        see the same noise as the full batch (`sr3model.training.train_step`)."""
        if self.config.objective == "regression" or self.config.student:
            return {}  # a student's noise is the teacher's, regenerated from the batch's seeds
        gamma = sample_noise_level(self.schedule, hr.shape[0], generator=generator, device=hr.device)
        eps = randn(hr.shape, generator=generator, like=hr, dtype=hr.dtype)
        if not self.config.diffusion.input_perturbation:
            return {"gamma": gamma, "eps": eps}
        return {"gamma": gamma, "eps": eps, "perturb": randn(hr.shape, generator=generator, like=hr, dtype=hr.dtype)}

    def forward(self, hr: torch.Tensor, lr: torch.Tensor | None = None, *,
                generator: torch.Generator | None = None, gamma: torch.Tensor | None = None,
                eps: torch.Tensor | None = None, perturb: torch.Tensor | None = None,
                teacher: torch.Tensor | None = None, seed: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss for a batch of HR images (B, 3, H, W) and their LR images; γ (B,) and
        ε (B, 3, H, W) are drawn here (`draw_noise`) unless given — with input perturbation ξ
        (`diffusion.input_perturbation`) also ε′ (`perturb`): y_t is made from ε + ξ·ε′, the target
        from ε (DDPM-IP, Ning et al. 2023, their eq. 9). A student's loss needs the
        teacher's outputs `teacher` (B, 3, H, W) and their noise seeds `seed` (B,) instead."""
        x = self.condition(lr)
        p = self.config.diffusion.loss
        batch = hr.shape[0]
        if self.config.student:
            return self._distill_loss(hr, lr, x, teacher, seed)
        if self.config.objective == "regression":
            ones = torch.ones(batch, device=hr.device)
            return lp_loss(self.net(x, ones), hr - x if self.config.regression_skip else hr, p)
        y0 = self.to_y0(hr, x)
        xi = self.config.diffusion.input_perturbation
        if gamma is None or eps is None or (xi and perturb is None):
            drawn = self.draw_noise(y0, generator=generator)
            gamma, eps, perturb = drawn["gamma"], drawn["eps"], drawn.get("perturb")
        y_t = q_sample(y0, gamma, eps + xi * perturb if xi else eps)
        out = self.net(self.network_input(x, y_t), gamma)  # (B, 3, H, W): ε, v or y0
        return lp_loss(out, target(self.config.diffusion.prediction, y0, gamma, eps), p)

    def _distill_loss(self, hr: torch.Tensor, lr: torch.Tensor, x: torch.Tensor, teacher: torch.Tensor | None,
                      seed: torch.Tensor | None) -> torch.Tensor:
        from .distill import distill_loss, teacher_noise

        if teacher is None or seed is None:
            raise ValueError("a distilled student trains on the teacher's outputs: pass teacher= and seed=")
        z = teacher_noise(seed, tuple(hr.shape[1:]), device=self.config.distill.noise_device, to=hr.device)
        lr_rows = lr.float() if self.config.diffusion.sample_consistency else None  # as super_resolve projects
        return distill_loss(self, x, self.to_y0(teacher, x), self.to_y0(hr, x), z.to(hr.dtype),
                            self.inference_schedule(), lr=lr_rows)

    # -- inference (Algorithm 2) ----------------------------------------------------------------
    def inference_schedule(self, steps: int | None = None, beta_start: float | None = None,
                           beta_end: float | None = None) -> NoiseSchedule:
        return inference_schedule(self.config.diffusion, steps, beta_start, beta_end)

    @torch.no_grad()
    def super_resolve(self, lr: torch.Tensor | None = None, *, sampler: str | None = None,
                      schedule: NoiseSchedule | None = None, samples: int = 1,
                      batch: int | None = None, generator: Generators = None,
                      callback: Callback | None = None, denoiser: Denoiser | None = None,
                      precision: str = "auto", consistency: bool | None = None) -> torch.Tensor:
        """Samples (B, samples, 3, H, W) in [-1, 1] for LR images (B, 3, h, w).

        Unconditional models take `lr=None` and `batch=B`. `denoiser` replaces the plain network
        call (e.g. `sr3model.tiling.TiledDenoiser` for images larger than the model's size);
        `schedule` defaults to the config's. `generator` is one generator or one per output row
        (B·samples, image-major), so each sample's noise can be its own. With the config's
        `diffusion.sample_clip`, ŷ0 stays in the image range at every step (`samplers.clipped`;
        for the residual model, x + ŷ0). With `consistency` (None: the config's
        `diffusion.sample_consistency`), every step's ŷ0 (x + ŷ0 for the residual model; the
        regression output) is projected onto the images whose bicubic downsampling is the LR input
        (`sr3model.consistency`), on the whole canvas even when `denoiser` tiles it. `precision` is
        the U-Net's (`denoiser`): bf16 autocast on CUDA by default.
        """
        cfg = self.config
        if lr is not None and lr.shape[1] != 3:
            raise ValueError(f"expected RGB LR images (B, 3, h, w), got {tuple(lr.shape)}")
        x = self.condition(lr)
        project = cfg.diffusion.sample_consistency if consistency is None else consistency
        project = project and x is not None  # an unconditional model has no LR to be consistent with
        if x is not None:
            x = x.repeat_interleave(samples, dim=0)  # (B·samples, 3, H, W)
            lr_rows = lr.float().repeat_interleave(samples, dim=0)  # (B·samples, 3, h, w)
        if cfg.objective == "regression":  # one step, γ = 1; the denoiser ignores y_t
            out = (denoiser or self.denoiser(precision))(x, None, torch.ones(x.shape[0], device=x.device))
            out = x + out if cfg.regression_skip else out
            if project:
                out = project_clipped(out.float(), lr_rows, -1.0, 1.0)
        else:
            n = (lr.shape[0] if lr is not None else (batch or 1)) * samples
            shape = (n, 3, cfg.hr_size, cfg.hr_size) if x is None else tuple(x.shape)
            device = x.device if x is not None else next(self.parameters()).device
            y_T = randn(shape, generator=generator, device=device)
            run = get_sampler(sampler or cfg.diffusion.sample_sampler)
            denoise = denoiser or self.denoiser(precision)
            residual = cfg.objective == "residual"
            offset, scale = (x, cfg.residual_scale) if residual else (None, 1.0)
            if project:  # clip (when configured) alternated with the projection, ending consistent
                bounds = (-1.0, 1.0) if cfg.diffusion.sample_clip else (None, None)
                denoise = consistent(denoise, lr_rows, offset=offset, scale=scale, low=bounds[0], high=bounds[1])
            elif cfg.diffusion.sample_clip:
                denoise = clipped(denoise, (-1 - x) / scale, (1 - x) / scale) if residual else clipped(denoise)
            out = run(denoise, x, schedule or self.inference_schedule(),
                      generator=generator, callback=callback, y_T=y_T)
            out = self.to_image(out, x)
        out = out.float().clamp(-1, 1)
        return out.reshape(-1, samples, *out.shape[1:])
