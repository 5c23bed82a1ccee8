"""Bicubic resampling on tensors, the paper's image operations (see DESIGN.md "Images").

- `upsample`: the conditioning image x = bicubic upsampling of the LR image to HR size (SR3 §2).
- `downsample`: bicubic with anti-aliasing, used to make LR from HR and for the consistency metric
  (Table 2). It agrees closely with Pillow's `BICUBIC` resize, which builds the training pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def upsample(lr: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) → (B, C, H, W), bicubic (no clamping: values may overshoot [-1, 1] slightly)."""
    return F.interpolate(lr.float(), size=_size(size), mode="bicubic", align_corners=False).to(lr.dtype)


def downsample(hr: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) → (B, C, h, w), bicubic with anti-aliasing (Pillow-like)."""
    return F.interpolate(hr.float(), size=_size(size), mode="bicubic", align_corners=False,
                         antialias=True).to(hr.dtype)
