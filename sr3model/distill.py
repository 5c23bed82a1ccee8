"""Distillation of an SR3 teacher into a K-step student (K = 1, 2, 4), pure tensors.

The teacher's deterministic sampler (DDIM, or DPM-Solver++(2M); ~20 network passes) is a function
F(x, z): conditioning image x and start noise z = y_T ~ N(0, I) → one output. The student is the
teacher's own U-Net, initialised from its weights, run at K fixed levels γ_K < … < γ_1
(`schedules.student_schedule`: the first at the pure-noise level, the others uniform in log-SNR):

    y_K = z;   for k = K … 1:   ŷ0_k = student's ŷ0 at (x, y_k, γ_k)            (eq. 10, via ε̂)
                                y_{k−1} = √γ_{k−1}·clip(ŷ0_k) + √(1−γ_{k−1})·ε̂(clip(ŷ0_k))   (DDIM's step)
    output = ŷ0_1  (x + s·ŷ0_1 for the residual objective, s = `residual_scale`: `SR3.to_image`)

which is the registered sampler `distilled` (`sr3model.samplers`), with the clipping every SR3
sampler applies — or, with LR-consistent sampling (`diffusion.sample_consistency`, the presets'),
clip(ŷ0) replaced by its clip/projection onto {y : downsample(y) = LR} (`sr3model.consistency`):
both are denoiser wrappers, so `distilled` composes with them like every sampler, and the rollout
below steps through the very same map (`sampled_y0`). Training (`distill_loss`, what `SR3.forward` returns for a student) rolls the
student out on the states it visits itself, from the very z the teacher started from (regenerated
from the stored per-output seed, `teacher_noise`), and regresses every level's ŷ0 onto the teacher's
output F(x, z), optionally plus a weight on the HR image y0 (`distill.hr_weight`, default 0):

    L = 1/K Σ_k  ‖ŷ0_k − F(x, z)‖_p^p + w_HR · ‖ŷ0_k − y0‖_p^p          (the states y_k detached)

This is SinSR's recipe (Wang et al. 2024: regression onto a deterministic teacher's outputs for
the same noise, with an optional ground-truth term) generalised from one step to K steps trained on
their own trajectories, as rollout-based distillation does (the student learns to correct the
states it actually reaches, not the teacher's). Why this rather than progressive distillation or
consistency distillation, and why the HR term is off by default: see the README ("Distil a fast
student").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .config import DistillConfig, SR3Config
from .consistency import project_clipped
from .diffusion import lp_loss, predict_eps, predict_y0, to_eps
from .schedules import NoiseSchedule


def teacher_noise(seeds: Sequence[int] | torch.Tensor, shape: tuple[int, ...], *, device: str = "cpu",
                  to: torch.device | str | None = None) -> torch.Tensor:
    """The start noise (B, *shape) the sampling path drew for outputs of these seeds: row i from a
    generator on `device` seeded by seeds[i] (`pipelines.sampling.image_seed`), as
    `sr3model.samplers.randn` draws it; moved to `to`."""
    values = seeds.tolist() if isinstance(seeds, torch.Tensor) else list(seeds)
    rows = [torch.randn((1, *shape), generator=torch.Generator(device=device).manual_seed(int(s)), device=device)
            for s in values]
    out = torch.cat(rows)
    return out.to(to) if to is not None else out


def y0_bounds(config: SR3Config, x: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """The range ŷ0 is clipped to while sampling: the image's, or (−1 − x)/s … (1 − x)/s for the
    residual (s = `residual_scale`), as `SR3.super_resolve` clips."""
    if config.objective != "residual":
        return -1.0, 1.0
    s = config.residual_scale
    return (-1 - x) / s, (1 - x) / s


def sampled_y0(config: SR3Config, x: torch.Tensor, lr: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map ŷ0 → the ŷ0 the sampler steps towards, as `SR3.super_resolve` wraps the denoiser:
    clipped to the image range (`samplers.clipped`), or with `lr` given (LR-consistent sampling)
    clipped and projected onto the images whose downsampling is `lr` (`consistency.consistent`)."""
    residual = config.objective == "residual"
    s = config.residual_scale if residual else 1.0
    if lr is None:
        if not config.diffusion.sample_clip:
            return lambda y0: y0
        low, high = y0_bounds(config, x)
        return lambda y0: y0.clamp(low, high)
    bounds = (-1.0, 1.0) if config.diffusion.sample_clip else (None, None)

    def project(y0: torch.Tensor) -> torch.Tensor:
        image = x + s * y0 if residual else y0
        image = project_clipped(image.float(), lr.float(), bounds[0], bounds[1]).to(y0.dtype)
        return (image - x) / s if residual else image
    return project


def student_step(net_out: torch.Tensor, prediction: str, y_t: torch.Tensor, gamma_t: torch.Tensor,
                 gamma_prev: torch.Tensor, towards: Callable[[torch.Tensor], torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One student level from the network's output at y_t: (ŷ0 as the network made it, y_{t−1}).

    y_{t−1} is DDIM's step from towards(ŷ0) (clipped, or clipped and LR-projected: `sampled_y0`)
    with the ε consistent with it, exactly what `samplers.distilled` under `samplers.clipped` or
    `consistency.consistent` computes; γ_{t−1} = 1 gives y_{t−1} = towards(ŷ0)."""
    g = gamma_t.to(torch.float32).expand(y_t.shape[0])
    eps = to_eps(prediction, net_out.float(), y_t, g)
    y0 = predict_y0(y_t, g, eps)
    inside = towards(y0.detach())
    eps_in = predict_eps(y_t, g, inside)
    y_prev = (gamma_prev.sqrt() * inside + (1 - gamma_prev).sqrt() * eps_in).to(y_t.dtype)
    return y0, y_prev


def distill_loss(model, x: torch.Tensor, teacher_y0: torch.Tensor, hr_y0: torch.Tensor, z: torch.Tensor,
                 schedule: NoiseSchedule, lr: torch.Tensor | None = None) -> torch.Tensor:
    """The student's loss (module docstring) for a batch: x (B, 3, H, W) the conditioning image,
    `teacher_y0` / `hr_y0` the teacher's output and the HR image as the objective's y0
    (`SR3.to_y0`), z the teacher's start noise, `lr` the LR images when the student samples
    LR-consistently (its states then follow the projected ŷ0, as sampling's do). `model` is an
    `SR3` with a student config; its network is called once per level (the states between levels
    carry no gradient)."""
    cfg: SR3Config = model.config
    d: DistillConfig = cfg.distill
    towards = sampled_y0(cfg, x, lr)
    y = z
    total = None
    levels = len(schedule)
    for t in reversed(range(levels)):
        gamma = schedule.gammas[t].to(torch.float32)
        out = model.net(model.network_input(x, y), gamma.expand(y.shape[0]).to(y.device))
        y0, y = student_step(out, cfg.diffusion.prediction, y, schedule.gammas[t], schedule.gammas_prev[t],
                             towards)
        y = y.detach()
        loss = lp_loss(y0, teacher_y0, d.loss)
        if d.hr_weight:
            loss = loss + d.hr_weight * lp_loss(y0, hr_y0, d.loss)
        total = loss if total is None else total + loss
    return total / levels


def student_config(teacher: SR3Config, steps: int, *, teacher_uri: str = "", teacher_sampler: str = "dpmpp-2m",
                   teacher_steps: int = 20, hr_weight: float | None = None, loss: int | None = None,
                   noise_device: str = "cpu") -> SR3Config:
    """The config of a K-step student of `teacher`: the same network, sampled with `distilled` at
    its K levels; no flips or LR blur in training (its target is the teacher's output for exactly
    this x and z; a flipped pair would need the teacher's output for flipped noise)."""
    import dataclasses

    if not teacher.conditional or teacher.objective == "regression":
        raise ValueError(f"a {teacher.objective!r} model cannot be distilled: the teacher must be a conditional "
                         "diffusion model (objective sr3 or residual)")
    if teacher.diffusion.prediction == "eps":
        raise ValueError("an ε-prediction teacher cannot be distilled here: a student run from pure noise "
                         "reads ŷ0 = (y − √(1−γ)·ε̂)/√γ, which multiplies the network's error by ~1/√γ_K "
                         f"(≈ {1 / float(_first_gamma(teacher)) ** 0.5:.0f} here); distil a v- or x0-prediction "
                         "teacher (the presets train x0-prediction)")
    if steps < 1:
        raise ValueError(f"student steps must be ≥ 1, got {steps}")
    defaults = DistillConfig()
    distill = DistillConfig(student_steps=steps, teacher=teacher_uri, teacher_sampler=teacher_sampler,
                            teacher_steps=teacher_steps,
                            hr_weight=defaults.hr_weight if hr_weight is None else hr_weight,
                            loss=defaults.loss if loss is None else loss, noise_device=noise_device)
    diffusion = dataclasses.replace(teacher.diffusion, sample_sampler="distilled", sample_steps=steps,
                                    sample_schedule="student", sample_clip=True)
    train = dataclasses.replace(teacher.train, hflip=False, blur_sigma=(0.0, 0.0))
    name = teacher.name if teacher.name.endswith(f"-student{steps}") else f"{teacher.name}-student{steps}"
    return dataclasses.replace(teacher, name=name, diffusion=diffusion, train=train, distill=distill)


def _first_gamma(config: SR3Config) -> float:
    from .schedules import start_limit

    return start_limit(config.diffusion)
