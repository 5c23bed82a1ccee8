"""Building blocks of the SR3 U-Net (SR3 Appendix A; BigGAN residual blocks; DDPM attention).

- `NoiseLevelEmbedding`: sinusoidal features of the continuous noise level (SR3 §2.5 and WaveGrad
  §3: the network is conditioned on √γ, scaled by 5000, never on an integer step), then an MLP.
- `ResBlock`: BigGAN residual block (Brock et al. 2019, Fig. 15b; as in SR3 and Song et al. 2021):
  GroupNorm → SiLU → [up/down-sample] → conv3×3 → FiLM(γ) → SiLU → dropout → conv3×3, plus a skip
  path (resampled, 1×1 conv if channels change); the sum is rescaled by 1/√2 ("skip ×1/√2").
  Up-sampling is nearest ×2 and down-sampling is average-pool ×2 *inside* the block.
- `AttentionBlock`: multi-head self-attention over all positions of a feature map, through
  `torch.nn.functional.scaled_dot_product_attention`; residual also rescaled by 1/√2.

The last convolution of each residual branch is zero-initialised, so every block starts as a
(scaled) identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SKIP_SCALE = 1 / math.sqrt(2)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with at most `groups` groups, fewer when `channels` is not divisible."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class NoiseLevelEmbedding(nn.Module):
    """γ (B,) → embedding (B, dim): sinusoids of 5000·√γ (WaveGrad's scale), then Linear-SiLU-Linear."""

    SCALE = 5000.0

    def __init__(self, channels: int, dim: int):
        super().__init__()
        half = channels // 2
        freqs = torch.exp(-math.log(1e4) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, gamma: torch.Tensor) -> torch.Tensor:
        angles = self.SCALE * gamma.float().clamp(0, 1).sqrt()[:, None] * self.freqs[None]  # (B, half)
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))  # (B, dim)


class ResBlock(nn.Module):
    """BigGAN residual block with FiLM conditioning on the noise-level embedding."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, *, dropout: float = 0.0,
                 groups: int = 32, resample: str | None = None):
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.resample = resample
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * out_ch)  # → (scale, shift), FiLM (Perez et al. 2018)
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def _resample(self, t: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(t, scale_factor=2.0, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(t, 2)
        return t

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(x))  # (B, in, H, W)
        h = self.conv1(self._resample(h))  # (B, out, H', W')
        x = self._resample(x)
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, out, 1, 1) each
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        h = self.conv2(self.dropout(h))
        return (self.skip(x) + h) * SKIP_SCALE


class AttentionBlock(nn.Module):
    """Self-attention over the H·W positions of a feature map, `head_channels` channels per head."""

    def __init__(self, channels: int, head_channels: int = 64, groups: int = 32):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            raise ValueError(f"{channels} channels do not split into {self.heads} heads")
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, hgt * wid, c)  # (B, HW, C)
        q, k, v = self.qkv(tokens).reshape(b, hgt * wid, 3, self.heads, c // self.heads).permute(
            2, 0, 3, 1, 4)  # 3 × (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        out = self.proj(out.transpose(1, 2).reshape(b, hgt * wid, c))  # (B, HW, C)
        out = out.reshape(b, hgt, wid, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        return (x + out) * SKIP_SCALE
