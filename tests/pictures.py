"""Comparing pictures across batch layouts, thread counts and CPUs.

torch's CPU kernels promise no bit-exactness across batch shapes, thread counts or CPU models: the
same sample computed in another layout may differ in a float's last bits, which flips an 8-bit
level where a value sits on a rounding boundary. What the tests protect is that an image's noise
and model are the same whatever the layout — a different noise stream or model gives a different
picture (typically < 25 dB apart), not a pixel one level off. `assert_same_picture` allows the
latter and catches the former.
"""

from __future__ import annotations

import numpy as np

MAX_LEVELS = 2  # largest per-pixel difference allowed, in 8-bit levels
MAX_FRACTION = 0.01  # at most 1% of values may differ at all
MIN_PSNR_DB = 50.0


def picture_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 pictures (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def assert_same_picture(a: np.ndarray, b: np.ndarray, name: str = "picture") -> None:
    """`a` and `b` (uint8, same shape) are the same picture up to last-bit float differences."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8, f"{name}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    fraction, psnr = float((diff > 0).mean()), picture_psnr(a, b)
    assert int(diff.max()) <= MAX_LEVELS and fraction <= MAX_FRACTION and psnr >= MIN_PSNR_DB, (
        f"{name}: differs by up to {int(diff.max())} levels in {fraction:.2%} of values, PSNR {psnr:.1f} dB "
        f"(allowed: ≤ {MAX_LEVELS} levels, ≤ {MAX_FRACTION:.0%}, ≥ {MIN_PSNR_DB} dB)")
