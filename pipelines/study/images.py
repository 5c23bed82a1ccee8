"""Images as the study serves them: one encoding for all, opaque names, the degraded catch copy.

Every served image — real photo, model output, bicubic, LR, degraded catch copy — is decoded to
8-bit RGB and written the same way: a PNG with no metadata chunks (no text, time, gamma, ICC or
pHYs) and zlib level 0 (stored blocks), so a file's size depends on its width and height only:
the real photo and any output of the same size are byte-for-byte the same length. Names are
`images/<32 random hex>.png`, unrelated to the source, the model or the role.
"""

from __future__ import annotations

import io
import secrets

import numpy as np
from PIL import Image

from pipelines.study.plan import IMAGES_DIR

CATCH_FACTOR = 8  # the catch copy keeps 1/8 of the resolution, shown as blocks


def encode(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 → the study's PNG (see the module docstring)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    """Any image file → (H, W, 3) uint8 RGB (the project's decoding rules)."""
    from sr3model.imageio import decode_image

    return np.asarray(decode_image(data))


def opaque_name() -> str:
    return f"{IMAGES_DIR}/{secrets.token_hex(16)}.png"


def degrade(rgb: np.ndarray, factor: int = CATCH_FACTOR) -> np.ndarray:
    """A heavily degraded copy for catch trials: area-downsampled by `factor`, blown up with
    nearest neighbours (visible blocks) — no attentive rater takes it for the photo."""
    h, w = rgb.shape[:2]
    small = Image.fromarray(rgb).resize((max(2, w // factor), max(2, h // factor)), Image.BOX)
    return np.asarray(small.resize((w, h), Image.NEAREST))
