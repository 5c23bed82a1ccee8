"""Super-resolution of any image size: joint denoising of overlapping tiles.

A model is trained at one LR size s (`config.lr_size`) and HR size S = scale·s. An LR image of any
other size h × w (non-square too) is super-resolved as one picture:

1. LR smaller than the tile on a side is padded (replicate) up to the tile; the output is cropped
   back, so it is always exactly scale·h × scale·w.
2. Tiles of `tile` LR pixels start at 0, step `tile − overlap`, the last one flush with the border
   (`tile_starts`); in HR pixels everything is ×scale.
3. x is the bicubic upsample of the *whole* LR image (the tiles crop it), and the sampler runs on
   the whole HR canvas: one noise image y_T, one y_t per step.
4. At every refinement step `TiledDenoiser` crops the tiles of x and y_t, runs the network on them
   in chunks, and blends the tile predictions ε̂ with smooth weights — a sin² ramp across the
   overlap towards each neighbouring tile, 1 elsewhere (`blend_ramp`) — normalised by their sum
   (a partition of unity). The ramp starts with a few zero-weight pixels, so the border pixels a
   tile computes with zero padding never reach the output where a neighbour covers them. So
   overlapping tiles agree on one ε̂ at every level γ and the sample has no seams (the
   MultiDiffusion construction, Bar-Tal et al. 2023, applied to SR3's ε-network).
5. LR-consistent sampling (`sr3model.consistency`) projects the blended ŷ0 of the whole canvas
   onto the images whose downsampling is the whole (padded) LR image, outside the tiles.

The regression objective goes through the same denoiser (it ignores y_t), so its tiled output is
blended the same way. An image equal to one tile goes straight through the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .samplers import Callback, Denoiser, Generators
from .schedules import NoiseSchedule


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of `tile` pixels covering [0, size) with at least `overlap` shared pixels."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
    if size <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((size - tile) / stride) + 1
    # spread the tiles evenly between 0 and size − tile (overlaps ≥ the requested one)
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def blend_ramp(tile: int, overlap: int, before: bool, after: bool, *, device=None) -> torch.Tensor:
    """(tile,) weights along one axis: 1, except a ramp across the `overlap` pixels on each side that
    has a neighbouring tile (`before` / `after`). The ramp is 0 for its first m = overlap // 4 pixels
    — where a tile's prediction feels the network's zero padding — rises as sin² and is 1 for the
    last m; a neighbour's mirrored ramp over the same pixels is its complement (sin² + cos² = 1)."""
    w = torch.ones(tile, dtype=torch.float64, device=device)
    if overlap == 0:
        return w.float()
    margin = overlap // 4
    d = torch.arange(tile, dtype=torch.float64, device=device)  # pixels from the near edge
    u = ((d - margin + 0.5) / (overlap - 2 * margin)).clamp(0, 1)
    ramp = torch.sin(u * math.pi / 2) ** 2
    if before:
        w = w * ramp
    if after:
        w = w * ramp.flip(0)
    return w.float()


class TiledDenoiser:
    """A `Denoiser` for HR canvases larger than the network's tile: blends ε̂ of overlapping tiles."""

    def __init__(self, inner: Denoiser, tile: int, overlap: int, batch: int = 16):
        self.inner, self.tile, self.overlap, self.batch = inner, tile, overlap, max(1, batch)

    def __call__(self, x: torch.Tensor | None, y_t: torch.Tensor | None, gamma: torch.Tensor) -> torch.Tensor:
        ref = y_t if y_t is not None else x
        b, _, height, width = ref.shape
        t = self.tile
        if height == t and width == t:
            return self.inner(x, y_t, gamma)
        rows, cols = tile_starts(height, t, self.overlap), tile_starts(width, t, self.overlap)
        boxes = [(top, left) for top in rows for left in cols]

        def ramp(starts: list[int], start: int) -> torch.Tensor:
            return blend_ramp(t, self.overlap, start != starts[0], start != starts[-1], device=ref.device)

        out = None
        norm = torch.zeros(height, width, device=ref.device)
        per_call = max(1, self.batch // b)  # boxes per network call
        for first in range(0, len(boxes), per_call):
            group = boxes[first:first + per_call]

            def crops(image: torch.Tensor | None) -> torch.Tensor | None:
                if image is None:
                    return None
                return torch.cat([image[..., r:r + t, c:c + t] for r, c in group])  # (len·B, C, t, t)

            eps = self.inner(crops(x), crops(y_t), gamma.repeat(len(group)))
            if out is None:
                out = torch.zeros(b, eps.shape[1], height, width, device=ref.device, dtype=torch.float32)
            for k, (r, c) in enumerate(group):
                window = ramp(rows, r)[:, None] * ramp(cols, c)[None, :]  # (t, t)
                out[..., r:r + t, c:c + t] += eps[k * b:(k + 1) * b].float() * window
                norm[r:r + t, c:c + t] += window
        return (out / norm).to(ref.dtype)


def super_resolve_any(model, lr: torch.Tensor, *, tile: int | None = None, overlap: int | None = None,
                      tile_batch: int = 16, sampler: str | None = None,
                      schedule: NoiseSchedule | None = None, samples: int = 1,
                      generator: Generators = None, callback: Callback | None = None,
                      precision: str = "auto", consistency: bool | None = None) -> torch.Tensor:
    """`model.super_resolve` for LR images (B, 3, h, w) of any size → (B, samples, 3, s·h, s·w).

    `tile` and `overlap` are LR pixels (defaults: the model's `lr_size` and a quarter of the tile);
    `tile_batch` is the number of tiles per network call. `consistency` (None: the config's) projects
    ŷ0 onto the LR-consistent images on the whole (padded) canvas at every step, never per tile: a
    tile's crop of a consistent canvas is not consistent with its LR crop near its borders."""
    cfg = model.config
    if not cfg.conditional:
        raise ValueError("tiling applies to super-resolution models, not the unconditional base")
    scale = cfg.scale
    tile = tile or cfg.lr_size
    overlap = tile // 4 if overlap is None else overlap
    factor = cfg.unet.downsampling_factor
    if (tile * scale) % factor:
        raise ValueError(f"tile {tile}×{scale} = {tile * scale} HR pixels is not divisible by the U-Net's "
                         f"down-sampling factor {factor}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
    h, w = lr.shape[-2:]
    kwargs = dict(sampler=sampler, schedule=schedule, samples=samples, generator=generator, callback=callback,
                  precision=precision, consistency=consistency)
    if (h, w) == (tile, tile):
        return model.super_resolve(lr, **kwargs)
    padded_h, padded_w = max(h, tile), max(w, tile)
    if (padded_h, padded_w) != (h, w):
        lr = F.pad(lr, (0, padded_w - w, 0, padded_h - h), mode="replicate")
    denoiser = TiledDenoiser(model.denoiser(precision), tile * scale, overlap * scale, tile_batch)
    out = model.super_resolve(lr, denoiser=denoiser, **kwargs)
    return out[..., :h * scale, :w * scale]
