"""Exponential moving average of weights (SR3 Appendix A: EMA decay 0.9999), used for sampling.

θ_ema ← d·θ_ema + (1 − d)·θ after each optimiser step, with the decay warmed up as
min(d, (1 + n) / (10 + n)) so that early averages are not dominated by the random init.
Buffers (none in the U-Net) are copied.

`swapped(model)` lends the averaged weights to the training model for a while (validation
sampling) without a second copy of the model on the device: each parameter's tensor is exchanged
with its shadow and exchanged back on exit, so the training weights (and the optimizer, which
holds the same Parameter objects) come back bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block `model` holds the EMA weights; on exit its own weights, unchanged.

        A parameter whose shadow has its dtype, device and shape swaps tensors with it (no copy,
        no extra memory); anything else (buffers, other dtypes) is saved on the CPU, overwritten
        with the shadow and copied back. Nothing may train `model` inside the block."""
        swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for name, tensor in model.state_dict(keep_vars=True).items():
                    shadow = self.shadow[name]
                    if (isinstance(tensor, nn.Parameter) and shadow.dtype == tensor.dtype
                            and shadow.device == tensor.device and shadow.shape == tensor.shape):
                        swapped.append((tensor, tensor.data))
                        tensor.data = shadow
                    else:
                        saved.append((tensor, tensor.detach().to("cpu", copy=True)))
                        tensor.copy_(shadow)
            yield model
        finally:
            with torch.no_grad():
                for param, own in swapped:
                    param.data = own
                for tensor, own in saved:
                    tensor.copy_(own)
