"""Image-quality metrics of the paper, per image, on tensors in [-1, 1] (B, 3, H, W).

- `psnr`, `ssim`: torchmetrics, on images mapped to [0, 1] (data range 1).
- `consistency`: SR3 Table 2 — MSE between the SR output downsampled to LR size (bicubic,
  anti-aliased) and the LR input, on [0, 1] images, in units of 1e-5 (the table reports ×1e-5).
- `lr_psnr`: the same comparison in dB.
- `diversity`: SRDiff's σ — per-pixel standard deviation across N samples of one input, averaged,
  on [0, 1] images; samples (B, N, 3, H, W).
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from .resample import downsample


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1], clamped, float32."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def psnr(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image (B,)."""
    return peak_signal_noise_ratio(to_unit(sr), to_unit(hr), data_range=1.0, reduction="none",
                                   dim=(1, 2, 3))


def ssim(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """SSIM per image (B,), Gaussian window 11, σ 1.5 (the standard setting)."""
    return structural_similarity_index_measure(to_unit(sr), to_unit(hr), data_range=1.0,
                                               reduction="none")


def _lr_mse(sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    down = downsample(to_unit(sr), tuple(lr.shape[-2:])).clamp(0, 1)
    return (down - to_unit(lr)).square().mean(dim=(1, 2, 3))


def consistency(sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """MSE(downsample(sr), lr) on [0, 1] images, ×1e5 (Table 2's unit), per image (B,)."""
    return _lr_mse(sr, lr) * 1e5


def lr_psnr(sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """PSNR in dB between the downsampled output and the LR input, per image (B,)."""
    return -10 * torch.log10(_lr_mse(sr, lr).clamp_min(1e-12))


def diversity(samples: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel std across samples (B, N, 3, H, W) → (B,); needs N ≥ 2."""
    if samples.ndim != 5 or samples.shape[1] < 2:
        raise ValueError("diversity needs samples shaped (B, N>=2, C, H, W)")
    return to_unit(samples).std(dim=1, unbiased=True).mean(dim=(1, 2, 3))
