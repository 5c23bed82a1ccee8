"""Noise schedules (SR3 §2, eq. 1–3; Appendix A).

A schedule of T steps is a sequence β_1..β_T; α_t = 1 − β_t and γ_t = ∏_{i≤t} α_i, with γ_0 = 1.
q(y_t | y0) = N(√γ_t · y0, (1 − γ_t) I), so γ_t is the fraction of signal variance left at step t.

SR3 trains with a linear β schedule (T = 2000, 1e-6 → 1e-2 by default) and, because the network
is conditioned on the continuous noise level γ rather than on t (§2.5), samples with *another*
schedule chosen at run time (e.g. 100 steps, 1e-4 → 0.1, found by a hyper-parameter search).
Tensors are float64: γ_t near 1 needs the precision when 1 − γ_t is formed.
"""

from __future__ import annotations

import torch

from .config import DiffusionConfig


class NoiseSchedule:
    """β_t, α_t, γ_t (and γ_{t−1}) for t = 1..T, stored 0-based: index t−1 holds step t."""

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError("betas must be a non-empty 1-D sequence")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie in (0, 1)")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.gammas = torch.cumprod(self.alphas, dim=0)
        self.gammas_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.gammas[:-1]])

    def __len__(self) -> int:
        return len(self.betas)

    def __repr__(self) -> str:
        return (f"NoiseSchedule(steps={len(self)}, beta={self.betas[0]:.3g}..{self.betas[-1]:.3g}, "
                f"gamma_T={self.gammas[-1]:.3g})")


def linear_schedule(steps: int, beta_start: float, beta_end: float) -> NoiseSchedule:
    """β linear in t from `beta_start` to `beta_end` over `steps` steps (SR3, WaveGrad)."""
    if steps < 1:
        raise ValueError("a schedule needs at least one step")
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError("need 0 < beta_start <= beta_end < 1")
    return NoiseSchedule(torch.linspace(beta_start, beta_end, steps, dtype=torch.float64))


def training_schedule(config: DiffusionConfig) -> NoiseSchedule:
    return linear_schedule(config.steps, config.beta_start, config.beta_end)


def inference_schedule(config: DiffusionConfig, steps: int | None = None,
                       beta_start: float | None = None, beta_end: float | None = None) -> NoiseSchedule:
    """The sampling schedule: the config's defaults, each overridable at run time."""
    return linear_schedule(steps or config.sample_steps,
                           config.sample_beta_start if beta_start is None else beta_start,
                           config.sample_beta_end if beta_end is None else beta_end)
