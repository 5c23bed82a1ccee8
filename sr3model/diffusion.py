"""Conditional diffusion math of SR3 as pure functions over tensors.

Symbols follow the paper: y0 the clean HR image, x the conditioning (bicubic-upsampled LR) image,
y_t the noisy image, γ the noise level (γ = ∏α, 1 = clean), ε standard normal noise.

| function              | paper                                                                    |
| --------------------- | ------------------------------------------------------------------------ |
| `q_sample`            | eq. 2 / §2.2: y_t = √γ · y0 + √(1−γ) · ε                                 |
| `sample_noise_level`  | §2.5: γ ~ p(γ) = Σ_t 1/T · U(γ_{t−1}, γ_t), one draw per image            |
| `lp_loss`             | eq. 6: E ‖f(x, y_t, γ) − target‖_p^p, p ∈ {1, 2} (target ε in the paper) |
| `target`              | what the network learns: ε (paper), v = √γ·ε − √(1−γ)·y0, or y0          |
| `to_eps`              | the network's ε / v / y0 output as ε̂ (the samplers' currency)            |
| `predict_y0`          | eq. 10: ŷ0 = (y_t − √(1−γ) · ε̂) / √γ                                     |
| `predict_eps`         | eq. 10 solved for ε                                                      |
| `posterior`           | eq. 4–5: q(y_{t−1} | y0, y_t) mean and variance                           |
| `ddpm_mean`           | eq. 11: μ = (y_t − (1−α_t)/√(1−γ_t) · ε̂) / √α_t                          |

Noise levels are per-image tensors of shape (B,); images are (B, C, H, W).

Predictions (`diffusion.prediction`). With y_t = √γ y0 + √(1−γ) ε, the velocity
v = √γ ε − √(1−γ) y0 (Salimans & Ho 2022) is a rotation of (ε, y0) by the angle with cos = √γ:

    ε = √(1−γ) y_t + √γ v,        y0 = √γ y_t − √(1−γ) v.

An ε-network's error reaches ŷ0 multiplied by √(1−γ)/√γ, which is huge at the noisiest levels
where a sample's global colour is decided; a v-network's error reaches ŷ0 multiplied by √(1−γ) ≤ 1
at every level. An x0-network predicts ŷ0 directly (its ε̂ divides by √(1−γ), large near γ = 1).
"""

from __future__ import annotations

import torch

from .schedules import NoiseSchedule


def _bcast(level: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A per-image level (B,) or a scalar, shaped (B, 1, 1, 1) to broadcast over images."""
    level = torch.as_tensor(level, device=like.device)
    level = level.to(torch.float64 if like.dtype == torch.float64 else torch.float32)
    return level.reshape(-1, *([1] * (like.ndim - 1))) if level.ndim else level


def q_sample(y0: torch.Tensor, gamma: torch.Tensor | float, eps: torch.Tensor) -> torch.Tensor:
    """Forward process: a sample of q(y_t | y0) = N(√γ y0, (1−γ) I) given noise ε."""
    g = _bcast(gamma, y0)
    return (g.sqrt() * y0 + (1 - g).sqrt() * eps).to(y0.dtype)


def sample_step_and_level(schedule: NoiseSchedule, batch: int, *,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, γ) per image: t uniform in 1..T (returned 0-based), γ uniform in [γ_t, γ_{t−1}]; float64,
    on the generator's device (the CPU without one): no host round trip per training step."""
    gen_device = torch.device(generator.device if generator is not None else "cpu")
    t = torch.randint(0, len(schedule), (batch,), generator=generator, device=gen_device)
    u = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64)
    high, low = _levels_on(schedule, gen_device)
    return t, low[t] + u * (high[t] - low[t])


_LEVELS: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _levels_on(schedule: NoiseSchedule, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ_{t−1}, γ_t) of the schedule on `device`, copied there once per schedule and device, so
    that drawing levels on an accelerator's generator never makes the host wait for it."""
    if device.type == "cpu":
        return schedule.gammas_prev, schedule.gammas
    key = (id(schedule), device)
    cached = _LEVELS.get(key)
    if cached is None or cached[0] is not schedule.gammas:  # an id reused by another schedule
        cached = (schedule.gammas, schedule.gammas_prev.to(device), schedule.gammas.to(device))
        _LEVELS[key] = cached
    return cached[1], cached[2]


def sample_noise_level(schedule: NoiseSchedule, batch: int, *, generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """γ ~ p(γ) = Σ_t 1/T · U(γ_t, γ_{t−1}), one independent draw per image: (B,) float32."""
    _, gamma = sample_step_and_level(schedule, batch, generator=generator)
    return gamma.to(device=device, dtype=torch.float32)


def lp_loss(prediction: torch.Tensor, target: torch.Tensor, p: int = 1) -> torch.Tensor:
    """Mean L_p error between the network's output and its target (the paper's loss, p = 1 or 2)."""
    diff = (prediction.float() - target.float()).abs()
    return diff.mean() if p == 1 else diff.square().mean()


def predict_v(y0: torch.Tensor, gamma: torch.Tensor | float, eps: torch.Tensor) -> torch.Tensor:
    """v = √γ ε − √(1−γ) y0."""
    g = _bcast(gamma, y0)
    return (g.sqrt() * eps - (1 - g).sqrt() * y0).to(y0.dtype)


def target(prediction: str, y0: torch.Tensor, gamma: torch.Tensor | float, eps: torch.Tensor) -> torch.Tensor:
    """The training target of a network that predicts `prediction` (eps | v | x0)."""
    if prediction == "eps":
        return eps
    if prediction == "v":
        return predict_v(y0, gamma, eps)
    if prediction == "x0":
        return y0
    raise ValueError(f"unknown prediction {prediction!r}; choose eps, v or x0")


def to_eps(prediction: str, output: torch.Tensor, y_t: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor:
    """ε̂ from a network output that predicts `prediction` at y_t, level γ (float32, or float64)."""
    if prediction == "eps":
        return output
    wide = torch.float64 if output.dtype == torch.float64 else torch.float32
    out, y = output.to(wide), y_t.to(wide)
    g = _bcast(gamma, out)
    if prediction == "v":
        return (1 - g).sqrt() * y + g.sqrt() * out
    if prediction == "x0":
        return (y - g.sqrt() * out) / (1 - g).sqrt()
    raise ValueError(f"unknown prediction {prediction!r}; choose eps, v or x0")


def predict_y0(y_t: torch.Tensor, gamma: torch.Tensor | float, eps: torch.Tensor) -> torch.Tensor:
    """ŷ0 from y_t and (predicted) noise: inverts `q_sample` (eq. 10)."""
    g = _bcast(gamma, y_t)
    return ((y_t - (1 - g).sqrt() * eps) / g.sqrt()).to(y_t.dtype)


def predict_eps(y_t: torch.Tensor, gamma: torch.Tensor | float, y0: torch.Tensor) -> torch.Tensor:
    """The noise that takes y0 to y_t at level γ (the oracle denoiser's answer)."""
    g = _bcast(gamma, y_t)
    return ((y_t - g.sqrt() * y0) / (1 - g).sqrt()).to(y_t.dtype)


def posterior(y0: torch.Tensor, y_t: torch.Tensor, gamma_t, gamma_prev, alpha_t):
    """q(y_{t−1} | y0, y_t) = N(μ, σ² I) (eq. 4–5); returns (μ, σ²)."""
    g, gp, a = (_bcast(v, y_t) for v in (gamma_t, gamma_prev, alpha_t))
    mean = gp.sqrt() * (1 - a) / (1 - g) * y0 + a.sqrt() * (1 - gp) / (1 - g) * y_t
    variance = (1 - gp) * (1 - a) / (1 - g)
    return mean.to(y_t.dtype), variance


def ddpm_mean(y_t: torch.Tensor, eps: torch.Tensor, alpha_t, gamma_t) -> torch.Tensor:
    """μ_θ of Algorithm 2 / eq. 11: (y_t − (1−α_t)/√(1−γ_t) · ε̂) / √α_t."""
    a, g = _bcast(alpha_t, y_t), _bcast(gamma_t, y_t)
    return ((y_t - (1 - a) / (1 - g).sqrt() * eps) / a.sqrt()).to(y_t.dtype)
