"""Samplers: iterative refinement from pure noise to an image (SR3 §2.3, Algorithm 2).

Every sampler has one signature and lives in `SAMPLERS`:

    sampler(denoiser, x, schedule, *, shape=None, generator=None, callback=None, y_T=None) -> y0

- `denoiser(x, y_t, gamma) -> ε̂`: the network, conditioned on x (None for an unconditional model)
  and on the per-image noise level γ (B,);
- `x`: the conditioning image (B, C, H, W), or None with `shape` given;
- `schedule`: an inference `NoiseSchedule` (any number of steps, any start/end — the network is
  conditioned on γ, so no retraining is needed);
- `generator`: a `torch.Generator` for reproducible noise, or one per row (then each image's noise
  is its own, whatever batch it is in); `y_T` to pass the start noise instead;
- `callback(step, total, y_t)`: progress, called after each refinement step.

The single refinement steps `ddpm_step`, `ddim_step` and `dpmpp_2m_step` are public, to write
other loops (`distilled` steps with `ddim_step`).

- `ddpm`: Algorithm 2 exactly: y_{t−1} = μ_θ(y_t) + √(1−α_t) z (eq. 11), z = 0 on the last step.
- `ddim`: deterministic DDIM (Song et al. 2021) expressed on γ: ŷ0 from eq. 10, then
  y_{t−1} = √γ_{t−1} ŷ0 + √(1−γ_{t−1}) ε̂; the same network, typically far fewer steps.
- `dpmpp-2m`: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; as k-diffusion's `sample_dpmpp_2m`),
  a deterministic second-order multistep solver of the probability-flow ODE in the data
  prediction ŷ0, on the half log-SNR λ = ½·log(γ/(1−γ)) with step h = λ_{t−1} − λ_t:
  y_{t−1} = √((1−γ_{t−1})/(1−γ_t)) y_t − √γ_{t−1} (e^{−h} − 1) D, where D = ŷ0 on the first and
  last step and D = (1 + 1/2r) ŷ0 − 1/2r ŷ0' otherwise (ŷ0' the previous step's, r = h'/h).
  It needs ~10 steps where DDPM needs ~100.
- `distilled`: a distilled K-step student's sampler (`sr3model.distill`): DDIM's deterministic step
  at each of the student's K levels (`schedules.student_schedule`, the first at the pure-noise
  level); the step the student was trained on (`distill.student_step` is the same computation with
  gradients). Its own name, so that outputs, manifests and runs say a student made them; the
  sampling path picks it (and K) from the student's config.

All return y0 unclipped; callers map it to images (see `sr3model.model`). Any schedule works, but
the start y_T ~ N(0, I) is only right when the schedule's first level γ_K is ≈ 0
(`sr3model.schedules.inference_schedule` makes sure of it).

`clipped(denoiser, low, high)` is the standard sampling refinement that Algorithm 2 as printed
leaves out (Ho et al. 2020's published code and common SR3 implementations do it): ŷ0 (eq. 10) is
clipped to the image range and ε̂ replaced by the noise consistent with the clipped ŷ0. With that ε̂, eq. 11's
mean is exactly the posterior mean of q(y_{t−1} | ŷ0, y_t) (eq. 4–5) for the clipped ŷ0, and DDIM
steps towards it. At high noise levels (small γ) ŷ0 = (y_t − √(1−γ) ε̂)/√γ amplifies every error of
ε̂ by 1/√γ; unclipped, those errors decide the sample's global colour. `SR3.super_resolve` applies it
unless the config says `diffusion.sample_clip=false`.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence, Union

import torch

from .config import SAMPLER_NAMES
from .diffusion import ddpm_mean, predict_eps, predict_y0
from .schedules import NoiseSchedule

Denoiser = Callable[[Optional[torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor], None]
Generators = Union[torch.Generator, Sequence[torch.Generator], None]  # one, or one per row


class Sampler(Protocol):
    def __call__(self, denoiser: Denoiser, x: torch.Tensor | None, schedule: NoiseSchedule, *,
                 shape: tuple[int, ...] | None = None, generator: Generators = None,
                 callback: Callback | None = None, y_T: torch.Tensor | None = None) -> torch.Tensor: ...


def randn(shape, *, generator: Generators, like: torch.Tensor | None = None,
          device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved next to `like`.

    `generator` may be a sequence of one generator per row (shape[0] of them): row i is drawn from
    generator i alone, so an image's noise does not depend on which batch it was sampled in."""
    target = like.device if like is not None else device
    if generator is not None and not isinstance(generator, torch.Generator):
        generators = list(generator)
        if len(generators) != shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
        rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype).to(target)
                for g in generators]
        return torch.cat(rows)
    gen_device = generator.device if generator is not None else device
    z = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
    return z.to(target)


def _levels(value: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    return value.to(device=device, dtype=torch.float32).expand(batch)


def ddpm_step(denoiser: Denoiser, x: torch.Tensor | None, y_t: torch.Tensor, alpha_t: torch.Tensor,
              gamma_t: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """One step of Algorithm 2: y_{t−1} = (y_t − (1−α_t)/√(1−γ_t) ε̂) / √α_t + √(1−α_t) z."""
    eps = denoiser(x, y_t, _levels(gamma_t, y_t.shape[0], y_t.device))
    y_prev = ddpm_mean(y_t, eps, alpha_t, gamma_t)
    if z is not None:
        y_prev = y_prev + (1 - alpha_t).sqrt().to(y_t.dtype) * z
    return y_prev


def ddim_step(denoiser: Denoiser, x: torch.Tensor | None, y_t: torch.Tensor, gamma_t: torch.Tensor,
              gamma_prev: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step from level γ_t to γ_{t−1} (γ_0 = 1 returns ŷ0)."""
    eps = denoiser(x, y_t, _levels(gamma_t, y_t.shape[0], y_t.device))
    y0 = predict_y0(y_t, gamma_t, eps)
    return (gamma_prev.sqrt() * y0 + (1 - gamma_prev).sqrt() * eps).to(y_t.dtype)


def dpmpp_2m_step(denoiser: Denoiser, x: torch.Tensor | None, y_t: torch.Tensor, gamma_t: torch.Tensor,
                  gamma_prev: torch.Tensor, previous: tuple[torch.Tensor, float] | None = None
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, float]]:
    """One DPM-Solver++(2M) step from γ_t to γ_{t−1}; `previous` = (ŷ0, h) of the step before
    (None on the first). Returns (y_{t−1}, (ŷ0, h)) to pass to the next step; γ_{t−1} = 1 returns ŷ0."""
    eps = denoiser(x, y_t, _levels(gamma_t, y_t.shape[0], y_t.device))
    y0 = predict_y0(y_t, gamma_t, eps)
    if float(gamma_prev) >= 1:  # the last step lands on the clean image (σ = 0): first order
        return y0, (y0, float("inf"))
    half_lambda = lambda g: 0.5 * (torch.log(g) - torch.log1p(-g))  # noqa: E731 (float64 levels)
    h = float(half_lambda(gamma_prev) - half_lambda(gamma_t))
    d = y0
    if previous is not None:
        r = previous[1] / h
        d = (1 + 1 / (2 * r)) * y0 - (1 / (2 * r)) * previous[0]
    ratio = float(((1 - gamma_prev) / (1 - gamma_t)).sqrt())
    y_prev = ratio * y_t - float(gamma_prev.sqrt() * torch.expm1(torch.tensor(-h, dtype=torch.float64))) * d
    return y_prev.to(y_t.dtype), (y0, h)


def _start(x: torch.Tensor | None, shape, generator, y_T) -> torch.Tensor:
    if y_T is not None:
        return y_T
    if shape is None:
        if x is None:
            raise ValueError("an unconditional sampler needs `shape` (or `y_T`)")
        shape = x.shape
    device = x.device if x is not None else "cpu"
    return randn(tuple(shape), generator=generator, device=device)


def _chain(step, x: torch.Tensor | None, schedule: NoiseSchedule, shape, generator: Generators,
           callback: Callback | None, y_T: torch.Tensor | None) -> torch.Tensor:
    """The loop every sampler shares: from y_T (drawn unless given), y, state ← step(y, t, state)
    for t = T−1 … 0, `callback(i, T, y)` after each step."""
    y = _start(x, shape, generator, y_T)
    total, state = len(schedule), None
    for i, t in enumerate(reversed(range(total))):
        y, state = step(y, t, state)
        if callback is not None:
            callback(i + 1, total, y)
    return y


@torch.no_grad()
def ddpm(denoiser: Denoiser, x: torch.Tensor | None, schedule: NoiseSchedule, *, shape=None,
         generator: Generators = None, callback: Callback | None = None,
         y_T: torch.Tensor | None = None) -> torch.Tensor:
    """Algorithm 2: T refinement steps, variance 1 − α_t, no noise added on the last step."""
    def step(y, t, _):
        z = randn(y.shape, generator=generator, like=y) if t > 0 else None
        return ddpm_step(denoiser, x, y, schedule.alphas[t], schedule.gammas[t], z), None
    return _chain(step, x, schedule, shape, generator, callback, y_T)


@torch.no_grad()
def ddim(denoiser: Denoiser, x: torch.Tensor | None, schedule: NoiseSchedule, *, shape=None,
         generator: Generators = None, callback: Callback | None = None,
         y_T: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic DDIM over the schedule's γ levels (the start noise is the only randomness)."""
    def step(y, t, _):
        return ddim_step(denoiser, x, y, schedule.gammas[t], schedule.gammas_prev[t]), None
    return _chain(step, x, schedule, shape, generator, callback, y_T)


@torch.no_grad()
def dpmpp_2m(denoiser: Denoiser, x: torch.Tensor | None, schedule: NoiseSchedule, *, shape=None,
             generator: Generators = None, callback: Callback | None = None,
             y_T: torch.Tensor | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) over the schedule's γ levels (deterministic given y_T)."""
    def step(y, t, previous):
        return dpmpp_2m_step(denoiser, x, y, schedule.gammas[t], schedule.gammas_prev[t], previous)
    return _chain(step, x, schedule, shape, generator, callback, y_T)


@torch.no_grad()
def distilled(denoiser: Denoiser, x: torch.Tensor | None, schedule: NoiseSchedule, *, shape=None,
              generator: Generators = None, callback: Callback | None = None,
              y_T: torch.Tensor | None = None) -> torch.Tensor:
    """A distilled student's K deterministic jumps over its levels (one network pass each): DDIM's
    step over the student's own schedule (`schedules.student_schedule`), under its own name so
    that configs, manifests and refusals can tell a student's sampling from a teacher's."""
    return ddim(denoiser, x, schedule, shape=shape, generator=generator, callback=callback, y_T=y_T)


def clipped(denoiser: Denoiser, low: torch.Tensor | float = -1.0,
            high: torch.Tensor | float = 1.0) -> Denoiser:
    """`denoiser` with ŷ0 clipped to [low, high]: returns the ε consistent with the clipped ŷ0.

    Bounds may be tensors shaped like y_t (the residual model's y0 is HR − x, so its bounds are
    −1 − x and 1 − x). Where ŷ0 lies inside the bounds, ε̂ is returned unchanged."""
    def eps_hat(x: torch.Tensor | None, y_t: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        eps = denoiser(x, y_t, gamma)
        y0 = predict_y0(y_t, gamma, eps)
        inside = y0.clamp(low, high)
        return torch.where(inside == y0, eps, predict_eps(y_t, gamma, inside))
    return eps_hat


SAMPLERS: dict[str, Sampler] = {"ddpm": ddpm, "ddim": ddim, "dpmpp-2m": dpmpp_2m, "distilled": distilled}
assert tuple(SAMPLERS) == SAMPLER_NAMES  # the names jobs offer without importing torch


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise KeyError(f"unknown sampler {name!r}; choose from {sorted(SAMPLERS)}")
    return SAMPLERS[name]
