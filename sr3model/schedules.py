"""Noise schedules (SR3 §2, eq. 1–3; Appendix A).

A schedule of T steps is a sequence β_1..β_T; α_t = 1 − β_t and γ_t = ∏_{i≤t} α_i, with γ_0 = 1.
q(y_t | y0) = N(√γ_t · y0, (1 − γ_t) I), so γ_t is the fraction of signal variance left at step t.

SR3 trains with a linear β schedule (T = 2000, 1e-6 → 1e-2 by default) and, because the network
is conditioned on the continuous noise level γ rather than on t (§2.5), samples with *another*
schedule chosen at run time (e.g. 100 steps, 1e-4 → 0.1, found by a hyper-parameter search).
Tensors are float64: γ_t near 1 needs the precision when 1 − γ_t is formed.

Training levels (`training_schedule`): the paper's linear β schedule, or (`diffusion.schedule =
"log-snr"`, the presets) the same γ range spaced uniformly in log-SNR. The piecewise-uniform p(γ)
draws each of the T steps equally often, so the spacing decides where training goes: the linear
schedule gives the levels above log-SNR 2 (γ > 0.88) about 10% of the draws, while the default
20-step sampler spends 8 of its 20 steps there — the steps that set a sample's finest texture.

Inference schedules must respect the step budget. Sampling starts from y_K ~ N(0, I), which is
q(y_K | y0) only when γ_K ≈ 0; a K-step linear β schedule with fixed end points has a γ_K that
depends on K (e.g. 0.27 for 25 steps of 1e-4 → 0.1) and then every sample inherits a colour shift
from the mismatch. So:

- `log_snr_schedule(K, γ_max, γ_min)` (the default, `diffusion.sample_schedule="log-snr"`) puts
  the K levels uniformly in log-SNR λ = log(γ / (1 − γ)) (VDM, DPM-Solver) between γ_max = 1 − 1e-4
  and γ_min = the training schedule's last γ, for any K ≥ 1;
- `linear_schedule` (the paper's form, explicit β end points) is checked by `check_start`: its γ_K
  must not lie above the training schedule's last γ, or a ValueError names γ_K.
- `student_schedule(K, γ_max, γ_min)` (`diffusion.sample_schedule="student"`, a distilled K-step
  student's levels, `sr3model.distill`): the first level at γ_min (pure noise, as above), the
  others uniform in log-SNR towards γ_max with the clean end itself left out — a solver's last
  level at γ ≈ 1 costs a network pass that returns its input, which a 1–4-pass student cannot spare.
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

    @classmethod
    def from_gammas(cls, gammas: torch.Tensor) -> "NoiseSchedule":
        """The schedule with these levels γ_1 > … > γ_T (α_t = γ_t / γ_{t−1}, γ_0 = 1)."""
        gammas = torch.as_tensor(gammas, dtype=torch.float64)
        previous = torch.cat([torch.ones(1, dtype=torch.float64), gammas[:-1]])
        return cls(1.0 - gammas / previous)

    @property
    def log_snr(self) -> torch.Tensor:
        """λ_t = log(γ_t / (1 − γ_t)) for t = 1..T."""
        return torch.log(self.gammas) - torch.log1p(-self.gammas)

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


GAMMA_MAX = 1 - 1e-4  # the cleanest level a default inference schedule visits
START_SLACK = 1.01  # γ_K may exceed the training schedule's last γ by 1% (rounding), no more


def log_snr_schedule(steps: int, gamma_max: float, gamma_min: float) -> NoiseSchedule:
    """K levels uniform in log-SNR from `gamma_max` (step 1) down to `gamma_min` (step K)."""
    if steps < 1:
        raise ValueError("a schedule needs at least one step")
    if not 0 < gamma_min < gamma_max < 1:
        raise ValueError(f"need 0 < gamma_min < gamma_max < 1, got {gamma_min:g}, {gamma_max:g}")
    high, low = (torch.logit(torch.tensor(g, dtype=torch.float64)) for g in (gamma_max, gamma_min))
    lam = torch.linspace(float(high), float(low), steps, dtype=torch.float64) if steps > 1 else low[None]
    return NoiseSchedule.from_gammas(torch.sigmoid(lam))


def student_schedule(steps: int, gamma_max: float, gamma_min: float) -> NoiseSchedule:
    """A K-step student's levels: K+1 points uniform in log-SNR from `gamma_min` to `gamma_max`,
    the cleanest (`gamma_max`) dropped; step K (the first sampled) is at `gamma_min`."""
    if steps < 1:
        raise ValueError("a schedule needs at least one step")
    if not 0 < gamma_min < gamma_max < 1:
        raise ValueError(f"need 0 < gamma_min < gamma_max < 1, got {gamma_min:g}, {gamma_max:g}")
    high, low = (torch.logit(torch.tensor(g, dtype=torch.float64)) for g in (gamma_max, gamma_min))
    lam = torch.linspace(float(high), float(low), steps + 1, dtype=torch.float64)[1:]
    return NoiseSchedule.from_gammas(torch.sigmoid(lam))


def linear_end_for(steps: int, beta_start: float, gamma_k: float) -> float:
    """The β_K whose K-step linear schedule from `beta_start` ends at level `gamma_k` (at or just
    below it; β_K = β_1 when a constant schedule already goes lower). K = 1 has one β: 1 − γ_K."""
    if steps == 1:
        return 1 - gamma_k
    def last(end: float) -> float:
        return float(linear_schedule(steps, beta_start, end).gammas[-1])
    low, high = beta_start, 1 - 1e-12
    if last(low) <= gamma_k:
        return low
    for _ in range(100):  # γ_K falls monotonically as β_K grows: bisection
        middle = (low + high) / 2
        low, high = (middle, high) if last(middle) > gamma_k else (low, middle)
    return high


def training_schedule(config: DiffusionConfig) -> NoiseSchedule:
    """The `steps` training levels: the paper's linear β schedule, or (`schedule="log-snr"`) its
    range — γ from 1 − β_start down to its last level — spaced uniformly in log-SNR."""
    linear = linear_schedule(config.steps, config.beta_start, config.beta_end)
    if config.schedule == "log-snr":
        return log_snr_schedule(config.steps, float(linear.gammas[0]), float(linear.gammas[-1]))
    return linear


def start_limit(config: DiffusionConfig) -> float:
    """The highest γ_K an inference schedule may start from: the training schedule's last γ — the
    linear β schedule's, which the log-SNR spacing keeps as its end (`training_schedule`)."""
    return float(linear_schedule(config.steps, config.beta_start, config.beta_end).gammas[-1])


def check_start(schedule: NoiseSchedule, config: DiffusionConfig) -> NoiseSchedule:
    """`schedule` if its first level γ_K matches pure-noise start y_K ~ N(0, I); else ValueError."""
    gamma_k, limit = float(schedule.gammas[-1]), start_limit(config)
    if gamma_k > limit * START_SLACK:
        raise ValueError(
            f"inference schedule {schedule!r} starts at γ_K = {gamma_k:.3g}, above the training schedule's "
            f"last level {limit:.3g}: sampling starts from pure noise, which is q(y_K | y0) only when γ_K is "
            f"that small, so every sample would inherit a colour shift. Raise β_end or the number of steps, "
            f"or use the default log-SNR schedule (diffusion.sample_schedule=log-snr, no explicit β)")
    return schedule


def inference_schedule(config: DiffusionConfig, steps: int | None = None,
                       beta_start: float | None = None, beta_end: float | None = None) -> NoiseSchedule:
    """The K-step sampling schedule (K = `steps`, default the config's `sample_steps`).

    Explicit β end points (or `sample_schedule="linear"`) give the paper's linear β schedule,
    checked by `check_start`; `"student"` a distilled student's levels (`student_schedule`);
    otherwise K levels uniform in log-SNR between `GAMMA_MAX` and the training schedule's last γ."""
    steps = steps or config.sample_steps
    if beta_start is None and beta_end is None and config.sample_schedule == "log-snr":
        return log_snr_schedule(steps, GAMMA_MAX, start_limit(config))
    if beta_start is None and beta_end is None and config.sample_schedule == "student":
        return student_schedule(steps, GAMMA_MAX, start_limit(config))
    schedule = linear_schedule(steps, config.sample_beta_start if beta_start is None else beta_start,
                               config.sample_beta_end if beta_end is None else beta_end)
    return check_start(schedule, config)
