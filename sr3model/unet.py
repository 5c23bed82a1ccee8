"""The SR3 U-Net f(x, y_t, γ) (SR3 §2.4, Appendix A, Table A.1).

Input: the bicubic-upsampled LR image x concatenated with y_t on channels (B, 6, H, W) for the
conditional objectives, y_t alone (B, 3, H, W) for the unconditional base model, x alone for the
regression baseline. Output: (B, 3, H, W) — ε̂ for the diffusion objectives, ŷ0 for regression.

Layout, for `channel_mult` = (m_0 .. m_{L−1}) and base width C:

    conv3×3 → for each level i: num_res_blocks × ResBlock(C·m_i) [+ attention at the listed
    resolutions], then a down-sampling ResBlock (except at the last level)
    → middle: ResBlock, attention, ResBlock
    → for each level, deepest first: (num_res_blocks + 1) × ResBlock on concat(h, skip) [+ attn],
      then an up-sampling ResBlock (except at level 0)
    → GroupNorm → SiLU → zero-initialised conv3×3

Every skip feature map pushed on the way down is consumed once on the way up, as in DDPM.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import SR3Config, UNetConfig
from .layers import AttentionBlock, NoiseLevelEmbedding, ResBlock, group_norm, zero_init


class UNet(nn.Module):
    def __init__(self, config: UNetConfig, image_size: int, in_channels: int = 6, out_channels: int = 3):
        super().__init__()
        if image_size % config.downsampling_factor:
            raise ValueError(f"image size {image_size} is not divisible by {config.downsampling_factor}")
        self.config = config
        self.in_channels = in_channels
        c, groups, drop = config.channels, config.norm_groups, config.dropout
        emb_dim = 4 * c
        self.embed = NoiseLevelEmbedding(c, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, c, 3, padding=1)

        def res(i: int, o: int, resample: str | None = None) -> ResBlock:
            return ResBlock(i, o, emb_dim, dropout=drop, groups=groups, resample=resample)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, config.attention_head_channels, groups)

        self.down = nn.ModuleList()
        skips, ch, size = [c], c, image_size
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                self.down.append(res(ch, c * mult))
                ch = c * mult
                if size in config.attention_resolutions:
                    self.down.append(attn(ch))
                skips.append(ch)
            if level < len(config.channel_mult) - 1:
                self.down.append(res(ch, ch, "down"))
                size //= 2
                skips.append(ch)

        self.middle = nn.ModuleList([res(ch, ch), attn(ch), res(ch, ch)])

        self.up = nn.ModuleList()
        self._concat = []  # per up module: whether it takes a skip feature first
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for _ in range(config.num_res_blocks + 1):
                self.up.append(res(ch + skips.pop(), c * mult))
                self._concat.append(True)
                ch = c * mult
                if size in config.attention_resolutions:
                    self.up.append(attn(ch))
                    self._concat.append(False)
            if level > 0:
                self.up.append(res(ch, ch, "up"))
                self._concat.append(False)
                size *= 2
        assert not skips

        self.out = nn.Sequential(group_norm(ch, groups), nn.SiLU(),
                                 zero_init(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def _run(self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.config.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def forward(self, inputs: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """inputs (B, in_channels, H, W), gamma (B,) → (B, out_channels, H, W)."""
        emb = self.embed(gamma)  # (B, 4C)
        h = self.conv_in(inputs)  # (B, C, H, W)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            if not isinstance(block, AttentionBlock):
                skips.append(h)
            else:
                skips[-1] = h  # attention refines the feature map its residual block pushed
        for block in self.middle:
            h = self._run(block, h, emb)
        for block, concat in zip(self.up, self._concat):
            if concat:
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, emb)
        return self.out(h)


def build_unet(config: SR3Config) -> UNet:
    """The U-Net for a model config: input channels follow the objective."""
    in_channels = {"sr3": 6, "residual": 6, "regression": 3, "unconditional": 3}[config.objective]
    return UNet(config.unet, config.hr_size, in_channels=in_channels)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
