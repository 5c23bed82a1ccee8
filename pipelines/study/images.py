"""Images as the study serves them: one encoding for all, opaque names, the degraded catch copy,
and a fresh invisible jitter on every response.

Every stored image — real photo, model output, bicubic, LR, degraded catch copy — is decoded to
8-bit RGB and written the same way: a PNG with no metadata chunks (no text, time, gamma, ICC or
pHYs) and zlib level 0 (stored blocks), so a file's size depends on its width and height only:
the real photo and any output of the same size are byte-for-byte the same length. Names are
`images/<32 random hex>.png`, unrelated to the source, the model or the role.

What is served is never the stored file (`served_png`): each response re-encodes the pixels after
adding an independent random d ∈ {−1, 0, +1} to every channel value (clipped to 0…255; drawn from
a generator seeded by `secrets`). Why: with two or more models, a source's real photo appears in
trials against each of them, while each output appears only against the photo; identical bytes
would let a script that collects files across trials (several sessions, colluding raters) find the
photo by the hash, bytes or size that recurs. With the jitter no two served files are the same
(3^(H·W·3) equally likely patterns of change), the size stays a function of width and height, and
no exact rule recovers a common key: any per-value function unchanged by every ±1 step is constant
on 0…255 (the steps connect all levels), so masking low bits or quantising does not undo it. A
change of at most one level in 255 is far below what a rater can see (PSNR ≈ 50 dB against the
stored image). What it does not stop: a script that matches pixels approximately can still see
that two served images are nearly the same photo; that needs many sessions (one rater never sees a
source twice), which invite-only sessions and the per-address limit keep away.
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


def pixels(data: bytes) -> np.ndarray:
    """A stored study image (the encoding above) → (H, W, 3) uint8, without the project's
    decoder (the web app stays free of torch)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def jitter(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """rgb + d, d ∈ {−1, 0, +1} independently per channel value, clipped: a change of ≤ 1 level."""
    step = rng.integers(-1, 2, size=rgb.shape, dtype=np.int16)
    return np.clip(rgb.astype(np.int16) + step, 0, 255).astype(np.uint8)


def served_png(rgb: np.ndarray) -> bytes:
    """The bytes of one response: a fresh jitter (unpredictable seed), then the study's encoding."""
    return encode(jitter(rgb, np.random.default_rng(secrets.randbits(128))))


def opaque_name() -> str:
    return f"{IMAGES_DIR}/{secrets.token_hex(16)}.png"


def degrade(rgb: np.ndarray, factor: int = CATCH_FACTOR) -> np.ndarray:
    """A heavily degraded copy for catch trials: area-downsampled by `factor`, blown up with
    nearest neighbours (visible blocks) — no attentive rater takes it for the photo."""
    h, w = rgb.shape[:2]
    small = Image.fromarray(rgb).resize((max(2, w // factor), max(2, h // factor)), Image.BOX)
    return np.asarray(small.resize((w, h), Image.NEAREST))
