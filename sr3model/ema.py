"""Exponential moving average of weights (SR3 Appendix A: EMA decay 0.9999), used for sampling.

θ_ema ← d·θ_ema + (1 − d)·θ after each optimiser step, with the decay warmed up as
min(d, (1 + n) / (10 + n)) so that early averages are not dominated by the random init.
Buffers (none in the U-Net) are copied.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    def _params(self, model: nn.Module):
        return [(name, p) for name, p in model.state_dict().items() if p.dtype.is_floating_point]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        pairs = self._params(model)
        shadows = [self.shadow[n] for n, _ in pairs]
        torch._foreach_lerp_(shadows, [p.detach().float() for _, p in pairs], 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int = 0) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        self.shadow = {k: v.detach().clone().float() for k, v in state.items()}
        self.updates = updates

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})
