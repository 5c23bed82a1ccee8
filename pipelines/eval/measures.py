"""What a method's outputs score: the per-image table of `sr3model.metrics`, accumulated over batches
(`Running`), and the perceptual metrics that need local weights (`Perceptual`: FID, IS, LPIPS).

| key           | what                                                                   | better |
| ------------- | ---------------------------------------------------------------------- | ------ |
| `psnr` `ssim` | against HR, on [0, 1] images (torchmetrics)                            | ↑      |
| `consistency` | MSE(bicubic-downsampled output, LR input) ×1e-5 (SR3 Table 2)          | ↓      |
| `lr_psnr`     | the same comparison in dB                                              | ↑      |
| `colour_error`| mean |Δ| of per-channel means against HR, in 8-bit levels            | ↓      |
| `detail_ratio`| high-frequency energy (image − bicubic round trip) over the HR's; 1 = as detailed as the photo; ratio of the set's means | → 1 |
| `flat_noise_ratio` | the same energy only where the HR is locally flat, over the HR's there: grain the photo does not have (1 = the photo's, bicubic ≈ 0.1); ratio of the set's means | ↓ |
| `diversity`   | σ across the N samples of one input (only when N > 1; SRDiff)          |        |
| `fid`, `is`   | Fréchet Inception distance to the HR set; Inception score (torchmetrics + torch-fidelity) | ↓ ↑ |
| `lpips`       | LPIPS-AlexNet against HR (`sr3model.metrics.LPIPS`, no torchvision)    | ↓      |

FID, IS and LPIPS never download weights. Inception weights (torch-fidelity's
`pt_inception-2015-12-05-6726825d.pth`): `--fid-weights PATH` or `SR3_FID_WEIGHTS`; AlexNet
weights (torchvision's `alexnet-owt-7be5be79.pth`): `--lpips-weights PATH` or `SR3_LPIPS_WEIGHTS`.
They are computed when their weights are given, or when asked for (`--metrics fid lpips`); a
metric that cannot run (no weights, no torch-fidelity, unreadable file) is one clear note in the
output, the report and the run, and everything else is still computed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from sr3model import metrics as M

from sr3model.config import BASE_METRICS, EXTRA_METRICS  # noqa: E402  (the names, without torch)

LOWER_IS_BETTER = M.LOWER_IS_BETTER
METRICS = BASE_METRICS + EXTRA_METRICS
FID_ENV, LPIPS_ENV = "SR3_FID_WEIGHTS", "SR3_LPIPS_WEIGHTS"


def base_scores(images: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor) -> dict[str, float]:
    """Set-level metrics (`sr3model.metrics.summarise`) of outputs (B, N, 3, H, W)."""
    return M.scores(images, hr, lr)


def device_for(device: str | None) -> str:
    """The driver's device for the perceptual metrics (sampling runs where `--device` says)."""
    return device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")


def _weights(flag: str | None, env: str) -> str | None:
    return flag or os.environ.get(env) or None


class Perceptual:
    """FID / IS / LPIPS on local weight files; what cannot run becomes a note, never an error.

    Per method: `start()`, `update(outputs, hr)` for every batch, `compute()`. The real (HR)
    features of FID are collected during the first method's pass and kept for the others."""

    def __init__(self, wanted: Iterable[str] | None = None, *, fid_weights: str | None = None,
                 lpips_weights: str | None = None, device: str = "cpu", batch_size: int = 16):
        fid_path, lpips_path = _weights(fid_weights, FID_ENV), _weights(lpips_weights, LPIPS_ENV)
        wanted = set(wanted) if wanted is not None else (
            ({"fid", "is"} if fid_path else set()) | ({"lpips"} if lpips_path else set()))
        unknown = wanted - set(EXTRA_METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {list(EXTRA_METRICS)}")
        self.notes: list[str] = []
        self.device, self.batch_size = device, batch_size
        self.fid = self.inception = self.lpips = None
        self.real_done, self.real, self.fake = False, 0, 0
        if wanted & {"fid", "is"}:
            self._load_inception(wanted & {"fid", "is"}, fid_path)
        if "lpips" in wanted:
            self._load_lpips(lpips_path)

    @property
    def available(self) -> list[str]:
        return [name for name, obj in (("fid", self.fid), ("is", self.inception), ("lpips", self.lpips)) if obj]

    def _skip(self, names: Iterable[str], why: str) -> None:
        self.notes.append(f"{'/'.join(n.upper() for n in sorted(names))} skipped: {why}")

    def _load_inception(self, names: set[str], path: str | None) -> None:
        if not path:
            return self._skip(names, f"no Inception weights; pass --fid-weights PATH or set {FID_ENV} "
                                     "(torch-fidelity's pt_inception-2015-12-05-6726825d.pth)")
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            return self._skip(names, "FID and IS need the torch-fidelity package (pip install torch-fidelity); "
                                     f"the Inception weights {path} are unused")
        if not Path(path).is_file():
            return self._skip(names, f"--fid-weights / {FID_ENV}: no such file {path}")
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
            from torchmetrics.image.inception import InceptionScore

            if "fid" in names:
                self.fid = FrechetInceptionDistance(feature=2048, normalize=True, reset_real_features=False,
                                                    feature_extractor_weights_path=path).to(self.device)
            if "is" in names:
                net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"],
                                         feature_extractor_weights_path=path)
                self.inception = InceptionScore(feature=net, normalize=True).to(self.device)
        except Exception as error:  # a wrong or corrupt file: say so, go on with the rest
            self._skip(names, f"cannot load Inception weights {path}: {error}")

    def _load_lpips(self, path: str | None) -> None:
        if not path:
            return self._skip(["lpips"], f"no AlexNet weights; pass --lpips-weights PATH or set {LPIPS_ENV} "
                                         "(torchvision's alexnet-owt-7be5be79.pth)")
        try:
            self.lpips = M.load_lpips(path, self.device)
        except Exception as error:
            self._skip(["lpips"], f"cannot load AlexNet weights {path}: {error}")

    def _chunks(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        for start in range(0, len(images), self.batch_size):
            yield images[start:start + self.batch_size].to(self.device)

    def start(self) -> None:
        self.fake = 0
        for metric in (self.fid, self.inception):
            if metric is not None:
                metric.reset()  # FID keeps its real features (reset_real_features=False)

    def update(self, images: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feed outputs (b, N, 3, H, W) and their HR; returns per-output LPIPS (b·N,) if available."""
        flat = images.reshape(-1, *images.shape[2:])
        self.fake += len(flat)
        if self.fid is not None:
            if not self.real_done:
                self.real += len(hr)
                for chunk in self._chunks(hr):
                    self.fid.update(M.to_unit(chunk), real=True)
            for chunk in self._chunks(flat):
                self.fid.update(M.to_unit(chunk), real=False)
        if self.inception is not None:
            for chunk in self._chunks(flat):
                self.inception.update(M.to_unit(chunk))
        if self.lpips is None:
            return {}
        hr_n = hr.repeat_interleave(images.shape[1], dim=0)
        return {"lpips": torch.cat([self.lpips(a, b).cpu() for a, b in zip(self._chunks(flat), self._chunks(hr_n))])}

    def compute(self) -> dict[str, float | None]:
        """FID and IS of everything fed since `start()` (None with fewer than 2 images)."""
        self.real_done = self.real_done or self.fid is not None
        out: dict[str, float | None] = {}
        if self.fid is not None:
            out["fid"] = float(self.fid.compute()) if min(self.real, self.fake) >= 2 else None
        if self.inception is not None:
            self.inception.splits = max(1, min(10, self.fake))
            out["is"] = float(self.inception.compute()[0]) if self.fake >= 2 else None
        return out


class Running:
    """One method's metrics, accumulated batch by batch (memory stays one batch)."""

    def __init__(self, perceptual: Perceptual | None = None):
        self.values: dict[str, list[torch.Tensor]] = {}
        self.perceptual = perceptual
        if perceptual is not None:
            perceptual.start()

    def add(self, images: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor) -> None:
        self.add_values(M.per_image(images, hr, lr), images, hr)

    def add_values(self, found: dict[str, torch.Tensor], images: torch.Tensor | None = None,
                   hr: torch.Tensor | None = None) -> None:
        """Per-output values of `per_image` computed elsewhere (a sampling actor); the outputs and
        their HR are needed only for the perceptual metrics."""
        found = dict(found)
        if self.perceptual is not None and images is not None:
            found.update(self.perceptual.update(images, hr))
        for key, value in found.items():
            self.values.setdefault(key, []).append(value)

    def per_pair(self, pairs: int) -> dict[str, np.ndarray]:
        """Each per-output value averaged over the samples of its pair: {key: (pairs,)} in pair
        order, for paired comparisons (`pipelines.train.promote`). Energies (`DETAIL_SR`, …) stay
        separate, so a set-level ratio can be recomputed on any resample of the pairs."""
        out = {}
        for key, parts in self.values.items():
            value = torch.cat(parts).double()
            if len(value) % pairs:
                raise ValueError(f"{key}: {len(value)} values for {pairs} pairs")
            out[key] = value.reshape(pairs, -1).mean(dim=1).numpy()
        return out

    def result(self) -> dict[str, float | None]:
        out: dict[str, float | None] = dict(M.summarise({k: torch.cat(v) for k, v in self.values.items()}))
        if self.perceptual is not None:
            out.update(self.perceptual.compute())
        return out
