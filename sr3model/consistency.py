"""LR-consistent sampling: every step's ŷ0 projected onto the images whose downsampling is the LR.

SR3 reports consistency — MSE(D(ŷ), lr) on [0, 1] images, D the bicubic anti-aliased downsampling
(Table 2; `sr3model.metrics.consistency`) — of 2.68e-5 on faces (≈ 45.7 dB LR-PSNR). A small or
briefly trained network lands far from that; this module makes any sampler reach it exactly.

The operator. `sr3model.resample.downsample` is linear and separable: per channel,
D(y) = A_h · y · A_wᵀ with 1-D resampling matrices A_h (h × H) and A_w (w × W)
(`resample_matrix`: the exact operator applied to the identity, so it agrees with `downsample` to
float precision). The set of consistent images C = {y : D(y) = lr} is an affine subspace.

The projection (closed form, no iterations). The orthogonal projection onto C is
P(y) = y + Aᵀ(AAᵀ)⁻¹(lr − Ay) for A = A_h ⊗ A_w. Since AAᵀ = (A_hA_hᵀ) ⊗ (A_wA_wᵀ) and
(AAᵀ)⁻¹ = (A_hA_hᵀ)⁻¹ ⊗ (A_wA_wᵀ)⁻¹, it factors per axis:

    P(y) = y + A_h⁺ · (lr − A_h y A_wᵀ) · A_w⁺ᵀ,      A⁺ = Aᵀ(AAᵀ)⁻¹ (H × h),

two small matrix products per axis (`project`). A_hA_hᵀ is h × h and well conditioned for the
paper's scales (eigenvalues 0.12–0.25 at ×4), solved once in float64 per size and cached. P is
idempotent, D(P(y)) = lr to float precision, and P leaves consistent images unchanged; it only
changes y within the range of Aᵀ (the low frequencies the LR image determines) and keeps y's
component in A's null space (the detail the model invents) as it is.

The sampler wrapper (`consistent`), like `sr3model.samplers.clipped`, keeps every sampler's
signature: ŷ0 (eq. 10) from the wrapped denoiser's ε̂ is replaced by its projection and the ε
consistent with it is returned, so eq. 11's mean is the posterior mean (eq. 4–5) of q(y_{t−1} |
P(ŷ0), y_t) and DDIM / DPM-Solver++ step towards P(ŷ0); the last step of every sampler returns it.

- Residual objective: y0 = (HR − x)/s (s = `residual_scale`), so the image x + s·ŷ0 is projected:
  ŷ0 ← (P(x + s·ŷ0) − x)/s (`offset`, `scale`).
- Clipping: the box [−1, 1] and C are both convex and the photo lies in both. One projection
  after clipping lands in C but may leave the box where the LR is saturated (the final clamp would
  then undo consistency there); one clip after projecting stays in the box but leaves C. So the
  wrapper alternates them, `rounds` times clip → project (projections onto convex sets, POCS),
  ending on C: the output is consistent, and what the final clamp cuts shrinks with every round.
- Oracles: with the Gaussian data of the closed-form tests (y0 ~ N(μ, s²I) per pixel) the exact
  denoiser of the data constrained to C is the projection of the unconstrained one (the null-space
  component of y_t is independent of A·y0), so projected sampling draws from that data
  conditioned on D(y0) = lr: mean P(μ), covariance s²(I − A⁺A), for any number of steps
  (tests/test_consistency.py). An input already consistent is returned unchanged, so the oracle
  denoiser that knows a consistent y0 still recovers it with every sampler.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .diffusion import predict_eps, predict_y0
from .resample import downsample
from .samplers import Denoiser

ROUNDS = 2  # clip → project rounds when the output is also clipped (README "Consistency")


@lru_cache(maxsize=32)
def _matrices(size: int, lr_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, A⁺) in float64 on the CPU for one axis: A (lr_size × size), A⁺ = Aᵀ(AAᵀ)⁻¹."""
    a = resample_matrix(size, lr_size)
    pinv = torch.linalg.solve(a @ a.T, a).T  # (AAᵀ)⁻¹A, transposed: Aᵀ(AAᵀ)⁻¹ (AAᵀ symmetric)
    return a, pinv


def resample_matrix(size: int, lr_size: int, chunk: int = 512) -> torch.Tensor:
    """A (lr_size × size), float64: `resample.downsample` along one axis as a matrix (its columns are
    the downsampled unit vectors, `chunk` at a time; the other axis keeps its size, which the
    operator leaves as is — for sizes ≥ 2: torch's anti-aliased kernel returns zeros on a size-1 axis)."""
    width = max(2, min(chunk, size))
    a = torch.zeros(lr_size, size, dtype=torch.float64)
    for start in sorted({min(s, size - width) for s in range(0, size, width)}):  # the last one flush
        eye = torch.zeros(1, 1, size, width, dtype=torch.float64)
        eye[0, 0, torch.arange(start, start + width), torch.arange(width)] = 1
        a[:, start:start + width] = downsample(eye, (lr_size, width))[0, 0]
    return a


def _on(matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    wide = torch.float64 if like.dtype == torch.float64 else torch.float32
    return matrix.to(device=like.device, dtype=wide)


def apply_down(y: torch.Tensor, lr_size: tuple[int, int]) -> torch.Tensor:
    """A_h · y · A_wᵀ: `resample.downsample` as matrix products (B, C, H, W) → (B, C, h, w)."""
    a_h, _ = _matrices(y.shape[-2], lr_size[0])
    a_w, _ = _matrices(y.shape[-1], lr_size[1])
    return _on(a_h, y) @ y @ _on(a_w, y).T


def project(y: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """P(y): the nearest image (in L2) to y (B, C, H, W) whose downsampling is lr (B, C, h, w)."""
    if y.shape[:2] != lr.shape[:2]:
        raise ValueError(f"images {tuple(y.shape)} and LR {tuple(lr.shape)} differ in batch or channels")
    wide = torch.float64 if y.dtype == torch.float64 else torch.float32
    image = y.to(wide)
    a_h, p_h = (_on(m, image) for m in _matrices(y.shape[-2], lr.shape[-2]))
    a_w, p_w = (_on(m, image) for m in _matrices(y.shape[-1], lr.shape[-1]))
    residual = lr.to(wide) - a_h @ image @ a_w.T  # (B, C, h, w)
    return (image + p_h @ residual @ p_w.T).to(y.dtype)


def project_clipped(y: torch.Tensor, lr: torch.Tensor, low=None, high=None, rounds: int = ROUNDS) -> torch.Tensor:
    """`rounds` × (clip to [low, high], project onto C), ending on C; no bounds: one projection."""
    if low is None and high is None:
        return project(y, lr)
    for _ in range(max(1, rounds)):
        y = project(y.clamp(low, high), lr)
    return y


def consistent(denoiser: Denoiser, lr: torch.Tensor, *, offset: torch.Tensor | None = None,
               scale: float = 1.0, low: torch.Tensor | float | None = None,
               high: torch.Tensor | float | None = None, rounds: int = ROUNDS) -> Denoiser:
    """`denoiser` whose ŷ0 is projected onto {y : downsample(offset + scale·y) = lr} at every call.

    `lr` (B, C, h, w) pairs row by row with y_t; `offset` and `scale` are the residual objective's
    x and `residual_scale` (the image is x + s·ŷ0); `low`/`high` bound the image, as
    `samplers.clipped` does, alternated with the projection `rounds` times. Returns the ε
    consistent with the projected ŷ0."""
    def eps_hat(x: torch.Tensor | None, y_t: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        eps = denoiser(x, y_t, gamma)
        y0 = predict_y0(y_t, gamma, eps)
        image = y0 if offset is None else offset + scale * y0
        image = project_clipped(image, lr, low, high, rounds)
        return predict_eps(y_t, gamma, image if offset is None else (image - offset) / scale)
    return eps_hat
