"""Any-size super-resolution: tile grid, blending identities, seams, the real U-Net through tiles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sr3model import SR3, preset
from sr3model.tiling import TiledDenoiser, blend_ramp, super_resolve_any, tile_starts


@pytest.mark.parametrize("size,tile,overlap", [(16, 16, 4), (17, 16, 4), (40, 16, 4), (100, 16, 0), (63, 32, 8)])
def test_tile_starts_cover_with_overlap(size: int, tile: int, overlap: int) -> None:
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] == max(0, size - tile)
    covered = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all()
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # overlaps ≥ requested


def test_ramps_of_neighbours_sum_to_one_and_skip_the_padded_edge() -> None:
    tile, overlap = 64, 16
    a = blend_ramp(tile, overlap, before=False, after=True)
    b = blend_ramp(tile, overlap, before=True, after=False)
    shared = a[-overlap:] + b[:overlap]  # two tiles overlapping by exactly `overlap`
    torch.testing.assert_close(shared, torch.ones(overlap))
    assert torch.all(b[:overlap // 4] == 0) and torch.all(a[-(overlap // 4):] == 0)
    assert torch.all(a[:-overlap] == 1)  # no neighbour before a: full weight
    assert torch.all(blend_ramp(tile, 0, True, True) == 1)


def test_pointwise_denoiser_is_blended_exactly() -> None:
    """A partition of unity: for a per-pixel denoiser the tiled ε̂ equals the whole-canvas ε̂."""
    def pointwise(x, y_t, gamma):
        return torch.tanh(y_t) * gamma.view(-1, 1, 1, 1) + 0.5 * x

    g = torch.Generator().manual_seed(0)
    x, y_t = torch.randn(2, 3, 96, 160, generator=g), torch.randn(2, 3, 96, 160, generator=g)
    gamma = torch.tensor([0.3, 0.9])
    for batch in (1, 3, 64):
        tiled = TiledDenoiser(pointwise, tile=64, overlap=16, batch=batch)(x, y_t, gamma)
        torch.testing.assert_close(tiled, pointwise(x, y_t, gamma), rtol=1e-5, atol=1e-5)


class _Blur(nn.Module):
    """A fully convolutional stand-in for the U-Net with zero padding: exact on a linear gradient
    inside, wrong near its borders — the behaviour that makes naive tiles show seams."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 5, padding=2, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            for c in range(3):
                self.conv.weight[c, c].fill_(1 / 25)

    def forward(self, x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return self.conv(self.conv(x))


def _gradient(h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-0.8, 0.8, h), torch.linspace(-0.6, 0.7, w), indexing="ij")
    return torch.stack([xx, yy, (xx + yy) / 2])[None]  # (1, 3, h, w)


def _column_steps(out: torch.Tensor, starts: list[int], tile: int, scale: int) -> tuple[float, float]:
    """(largest mean |Δ| across a tile-border column, largest inside tiles), away from the image edge."""
    steps = (out[..., 1:] - out[..., :-1]).abs().mean(dim=tuple(range(out.dim() - 1)))
    borders = {e * scale - 1 for s in starts for e in (s, s + tile) if 0 < e * scale < out.shape[-1]}
    inside = [i for i in range(8, len(steps) - 8) if i not in borders]
    return steps[sorted(borders)].max().item(), steps[inside].max().item()


def test_a_smooth_gradient_upscaled_in_tiles_has_no_seams() -> None:
    model = SR3(preset("tiny", "regression")).eval()
    model.net = _Blur()
    lr = _gradient(24, 40)  # non-square, 3 × 2 tiles of 16
    with torch.no_grad():
        blended = super_resolve_any(model, lr, overlap=4)
        naive = super_resolve_any(model, lr, overlap=0)
    assert blended.shape == (1, 1, 3, 96, 160)
    border, inside = _column_steps(blended[0, 0], tile_starts(40, 16, 4), 16, 4)
    assert border <= inside * 1.001
    border, inside = _column_steps(naive[0, 0], tile_starts(40, 16, 0), 16, 4)
    assert border > 2 * inside  # the check sees seams when there are some


def test_real_unet_any_size_shapes_and_per_image_noise() -> None:
    torch.manual_seed(0)
    model = SR3(preset("tiny")).eval()
    schedule = model.inference_schedule(steps=3)
    lr = _gradient(20, 12).repeat(2, 1, 1, 1)  # taller than a tile, narrower than one

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    out = super_resolve_any(model, lr, sampler="ddpm", schedule=schedule, samples=2, generator=gens([1, 2, 3, 4]))
    assert out.shape == (2, 2, 3, 80, 48) and out.abs().max() <= 1
    alone = super_resolve_any(model, lr[1:], sampler="ddpm", schedule=schedule, samples=2, generator=gens([3, 4]))
    torch.testing.assert_close(out[1:], alone)  # an image's samples do not depend on its batch
    native = super_resolve_any(model, _gradient(16, 16).repeat(2, 1, 1, 1), sampler="ddim", schedule=schedule, generator=gens([5, 6]))
    assert native.shape == (2, 1, 3, 64, 64)
    with pytest.raises(ValueError, match="overlap"):
        super_resolve_any(model, lr, overlap=16)
