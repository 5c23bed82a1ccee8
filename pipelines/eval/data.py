"""Held-out pairs for evaluation: the val/ split of a committed pairs dataset, decoded a batch at a time.

    PAIRS/val (pipelines.pairs.store.read_part) ──> `EvalSet` (PNG bytes by key) ──batch──> HR, LR in [-1, 1]

`bicubic` is the baseline every report starts with (the conditioning image x itself), and
`check_model` refuses a model that cannot be scored on these pairs (unconditional, another scale).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pipelines.pairs.store import read_part


@dataclass(frozen=True)
class EvalSet:
    """Held-out pairs sorted by key, kept as PNG bytes and decoded one batch at a time."""

    keys: list[str]
    hr_png: list[bytes]
    lr_png: list[bytes]
    shapes: tuple[tuple[int, ...], tuple[int, ...]]  # (HR, LR) shape of one pair, (3, H, W)

    def __len__(self) -> int:
        return len(self.keys)

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """HR (b, 3, H, W) and LR (b, 3, h, w) in [-1, 1] of pairs start..stop-1."""
        from sr3model.imageio import decode_png, to_tensor

        hr = [to_tensor(decode_png(b)) for b in self.hr_png[start:stop]]
        lr = [to_tensor(decode_png(b)) for b in self.lr_png[start:stop]]
        for key, h, l in zip(self.keys[start:stop], hr, lr):
            if (tuple(h.shape), tuple(l.shape)) != self.shapes:
                raise ValueError(f"pair {key}: HR/LR shapes {tuple(h.shape)}/{tuple(l.shape)} differ from the "
                                 f"first pair's {self.shapes[0]}/{self.shapes[1]}; evaluate one size at a time")
        return torch.stack(hr), torch.stack(lr)

    def batches(self, size: int) -> Iterator[tuple[int, list[str], torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), size):
            yield (start, self.keys[start:start + size], *self.batch(start, start + size))


def load_val(pairs: str, limit: int | None = None) -> EvalSet:
    """The first `limit` pairs (by key) of the val/ split of a build_pairs output."""
    from sr3model.imageio import decode_png, to_tensor

    rows = sorted(read_part(pairs, "val", columns=["key", "source", "hr", "lr"]).to_pylist(),
                  key=lambda row: row["key"])[:limit]
    if not rows:
        raise ValueError(f"{pairs}: no val/ pairs (build them with jobs/build_pairs.py --val-fraction > 0)")
    shapes = tuple(tuple(to_tensor(decode_png(rows[0][c])).shape) for c in ("hr", "lr"))
    return EvalSet([r["key"] for r in rows], [r["hr"] for r in rows], [r["lr"] for r in rows], shapes)


def bicubic(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The bicubic baseline = the conditioning image x, (B, 1, 3, H, W)."""
    from sr3model.resample import upsample

    return upsample(lr, size).clamp(-1, 1)[:, None]


def check_model(model, data: EvalSet, label: str) -> None:
    """`model`: an SR3 or a ModelRef (anything with `.config` or `.config()`)."""
    cfg = model.config() if callable(getattr(model, "config", None)) else model.config
    if not cfg.conditional:
        raise ValueError(f"{label}: an unconditional model cannot be evaluated on LR/HR pairs")
    lr_px, hr_px = data.shapes[1][-1], data.shapes[0][-1]
    if cfg.scale * lr_px != hr_px:
        raise ValueError(f"{label}: the model upscales ×{cfg.scale}, the pairs are {lr_px}→{hr_px} px")
