"""Image-quality metrics of the paper, per image, on tensors in [-1, 1] (B, 3, H, W).

- `psnr`, `ssim`: torchmetrics, on images mapped to [0, 1] (data range 1).
- `consistency`: SR3 Table 2 — MSE between the SR output downsampled to LR size (bicubic,
  anti-aliased) and the LR input, on [0, 1] images, in units of 1e-5 (the table reports ×1e-5).
- `lr_psnr`: the same comparison in dB.
- `colour_error`: mean |Δ| between the output's and the HR's per-channel means, in 8-bit levels
  (/255): the global colour shift open SR3 implementations are reported for; 0 = same colours.
- `detail_energy` / `detail_ratio`: the energy (mean square) of what bicubic down-then-up removes,
  image − bicubic(down(image)), on [0, 1] images: the high-frequency detail an SR model must invent.
  The ratio output/HR is 1 for an output as detailed as the photo; bicubic's own output sits far
  below (its detail is what the round trip keeps), grain above. Over a set, the ratio of summed
  energies (`detail_ratio` of the means), so flat patches do not dominate.
- `flat_mask` / `flat_noise` / `flat_noise_ratio`: grain where the photo is flat. The same
  high-frequency residual as the detail energy, summed only over the pixels where the HR is locally
  flat: the HR's luminance gradient (central differences, [0, 1] units per pixel) stays below
  `FLAT_GRADIENT` = 0.03 (≈ 7.7/255 per pixel) everywhere within the round trip's reach (a
  (2·scale + 1)² window, so an edge's own ringing is not counted). The ratio output/HR is 1 for
  the photo by definition, below 1 for smoother outputs (bicubic ≈ 0.1), above for grain the photo
  does not have — which the detail ratio, dominated by the photo's textured parts, counts as
  detail. Over a set, the ratio of summed energies, as `detail_ratio`.
- `per_image` / `summarise`: the table every stage reports (training validation, the evaluate job,
  the promotion gate, benchmarks): per-output values, then set-level means (`detail_ratio` as a
  ratio of summed energies). `BASE_METRICS` names its columns.
- `diversity`: SRDiff's σ — per-pixel standard deviation across N samples of one input, averaged,
  on [0, 1] images; samples (B, N, 3, H, W).
- `LPIPS` / `load_lpips`: LPIPS v0.1 with the AlexNet backbone (Zhang et al. 2018), the same
  computation as torchmetrics' `learned_perceptual_image_patch_similarity(net_type="alex")`, but
  without torchvision: the backbone's weights come from a local file (torchvision's AlexNet
  state dict, e.g. `alexnet-owt-7be5be79.pth`), the linear calibration layers from the file
  torchmetrics ships (`lpips_models/alex.pth`). Nothing is downloaded.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from .config import BASE_METRICS
from .resample import downsample, upsample


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1], clamped, float32."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def psnr(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image (B,)."""
    return peak_signal_noise_ratio(to_unit(sr), to_unit(hr), data_range=1.0, reduction="none",
                                   dim=(1, 2, 3))


def ssim(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """SSIM per image (B,), Gaussian window 11, σ 1.5 (the standard setting)."""
    return structural_similarity_index_measure(to_unit(sr), to_unit(hr), data_range=1.0,
                                               reduction="none")


def _lr_mse(sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    down = downsample(to_unit(sr), tuple(lr.shape[-2:])).clamp(0, 1)
    return (down - to_unit(lr)).square().mean(dim=(1, 2, 3))


def consistency(sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """MSE(downsample(sr), lr) on [0, 1] images, ×1e5 (Table 2's unit), per image (B,)."""
    return _lr_mse(sr, lr) * 1e5


def lr_psnr(sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """PSNR in dB between the downsampled output and the LR input, per image (B,)."""
    return -10 * torch.log10(_lr_mse(sr, lr).clamp_min(1e-12))


def colour_error(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Mean over R, G, B of |mean(sr_c) − mean(hr_c)|, in 8-bit levels, per image (B,)."""
    delta = to_unit(sr).mean(dim=(2, 3)) - to_unit(hr).mean(dim=(2, 3))  # (B, 3)
    return delta.abs().mean(dim=1) * 255


def detail_energy(images: torch.Tensor, lr_size: int | tuple[int, int]) -> torch.Tensor:
    """Mean square of image − bicubic_up(bicubic_down(image)) on [0, 1] images, per image (B,)."""
    unit = to_unit(images)
    smooth = upsample(downsample(unit, lr_size), tuple(unit.shape[-2:]))
    return (unit - smooth).square().mean(dim=(1, 2, 3))


def detail_ratio(sr: torch.Tensor, hr: torch.Tensor, lr_size: int | tuple[int, int]) -> torch.Tensor:
    """High-frequency energy of the output relative to the HR's, per image (B,); 1 = as detailed."""
    return detail_energy(sr, lr_size) / detail_energy(hr, lr_size).clamp_min(1e-12)


FLAT_GRADIENT = 0.03  # [0, 1] luminance units per pixel: below it everywhere in the window = flat


def flat_mask(hr: torch.Tensor, lr_size: int | tuple[int, int], threshold: float = FLAT_GRADIENT) -> torch.Tensor:
    """(B, 1, H, W) bool: where the HR (B, 3, H, W) is locally flat — its luminance gradient
    magnitude is below `threshold` at every pixel of the (2·scale + 1)² window around."""
    lum = to_unit(hr).mean(dim=1, keepdim=True)  # (B, 1, H, W)
    pad = F.pad(lum, (1, 1, 1, 1), mode="replicate")
    gx = (pad[..., 1:-1, 2:] - pad[..., 1:-1, :-2]) / 2
    gy = (pad[..., 2:, 1:-1] - pad[..., :-2, 1:-1]) / 2
    scale = max(1, round(hr.shape[-2] / (lr_size if isinstance(lr_size, int) else lr_size[0])))
    window = 2 * scale + 1
    steepest = F.max_pool2d((gx.square() + gy.square()).sqrt(), window, stride=1, padding=scale)
    return steepest < threshold


def flat_noise(images: torch.Tensor, mask: torch.Tensor, lr_size: int | tuple[int, int]) -> torch.Tensor:
    """Mean square of image − bicubic_up(bicubic_down(image)) on [0, 1] images over the pixels of
    `mask` (B, 1, H, W), divided by all the image's pixels (so a set's sums weigh pixels equally), (B,)."""
    unit = to_unit(images)
    smooth = upsample(downsample(unit, lr_size), tuple(unit.shape[-2:]))
    return ((unit - smooth).square() * mask).mean(dim=(1, 2, 3))


def flat_noise_ratio(sr: torch.Tensor, hr: torch.Tensor, lr_size: int | tuple[int, int]) -> torch.Tensor:
    """Grain of the output where the HR is flat, relative to the HR's own, per image (B,); 1 = the
    photo's; NaN for an image without flat pixels (`summarise` pools a set instead)."""
    mask = flat_mask(hr, lr_size)
    hr_noise = flat_noise(hr, mask, lr_size)
    ratio = flat_noise(sr, mask, lr_size) / hr_noise.clamp_min(1e-12)
    return torch.where(mask.flatten(1).any(dim=1), ratio, torch.full_like(ratio, float("nan")))


def diversity(samples: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel std across samples (B, N, 3, H, W) → (B,); needs N ≥ 2."""
    if samples.ndim != 5 or samples.shape[1] < 2:
        raise ValueError("diversity needs samples shaped (B, N>=2, C, H, W)")
    return to_unit(samples).std(dim=1, unbiased=True).mean(dim=(1, 2, 3))


# -- the per-image table ---------------------------------------------------------------------------
LOWER_IS_BETTER = frozenset({"consistency", "colour_error", "fid", "lpips"})
# Per-output energies whose set-level ratios are `detail_ratio` and `flat_noise_ratio` (a mean of
# per-image ratios would be dominated by the flattest patches): summed by `summarise`, never
# reported on their own.
DETAIL_SR, DETAIL_HR = "_detail_sr", "_detail_hr"
FLAT_SR, FLAT_HR = "_flat_sr", "_flat_hr"
RATIOS = {"detail_ratio": (DETAIL_SR, DETAIL_HR), "flat_noise_ratio": (FLAT_SR, FLAT_HR)}


def badness(metric: str, value: float) -> float:
    """A set-level metric turned into "lower is better": the value for error-like metrics
    (`LOWER_IS_BETTER`), |log ratio| for ratios whose ideal is the photo's own 1 (`detail_ratio`),
    log of the ratio above 1 for grain (`flat_noise_ratio`: smoother than the photo is no fault),
    minus the value otherwise (PSNR-like)."""
    if metric == "detail_ratio":
        return abs(math.log(value)) if value > 0 else math.inf
    if metric == "flat_noise_ratio":
        return max(0.0, math.log(value)) if value > 0 else 0.0
    return value if metric in LOWER_IS_BETTER else -value


def per_image(images: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs (B, N, 3, H, W) of LR (B, 3, h, w) against HR (B, 3, H, W): PSNR, SSIM, consistency,
    LR-PSNR, colour error per output (B·N,), the detail energies of output and HR (`DETAIL_SR`,
    `DETAIL_HR`) and their energies where the HR is flat (`FLAT_SR`, `FLAT_HR`), and diversity
    per pair (B,) when N > 1."""
    b, n = images.shape[:2]
    flat = images.reshape(b * n, *images.shape[2:])
    hr_n, lr_n = hr.repeat_interleave(n, dim=0), lr.repeat_interleave(n, dim=0)
    lr_size = tuple(lr.shape[-2:])
    scores = {"psnr": psnr(flat, hr_n), "ssim": ssim(flat, hr_n), "consistency": consistency(flat, lr_n),
              "lr_psnr": lr_psnr(flat, lr_n), "colour_error": colour_error(flat, hr_n),
              DETAIL_SR: detail_energy(flat, lr_size), DETAIL_HR: detail_energy(hr_n, lr_size)}
    mask = flat_mask(hr, lr_size).repeat_interleave(n, dim=0)
    scores[FLAT_SR], scores[FLAT_HR] = flat_noise(flat, mask, lr_size), flat_noise(hr_n, mask, lr_size)
    if n > 1:
        scores["diversity"] = diversity(images)
    return scores


def summarise(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Set-level metrics from per-output values (of `per_image`, concatenated over batches): means,
    and `detail_ratio` / `flat_noise_ratio` as ratios of the summed energies (NaN for a set without
    a flat pixel)."""
    hidden = {key for pair in RATIOS.values() for key in pair}
    out = {k: float(v.double().mean()) for k, v in values.items() if k not in hidden}
    for name, (sr_key, hr_key) in RATIOS.items():
        if sr_key in values:
            below = values[hr_key].double().mean()
            if name == "detail_ratio":  # as before: a detail-free HR set divides by 1e-12
                below = below.clamp_min(1e-12)
            out[name] = float(values[sr_key].double().mean() / below) if below > 0 else float("nan")
    return out


def scores(images: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor) -> dict[str, float]:
    """Set-level metrics (`summarise`) of outputs (B, N, 3, H, W) in one call."""
    return summarise(per_image(images, hr, lr))


# -- LPIPS (AlexNet) ------------------------------------------------------------------------------
LPIPS_SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))  # AlexNet `features` indices per tap
LPIPS_CHANNELS = (64, 192, 384, 256, 256)
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS' ScalingLayer, on [-1, 1] images
_LPIPS_SCALE = (0.458, 0.448, 0.450)


def _alexnet_features() -> nn.Sequential:
    """torchvision's `AlexNet().features`, same layer indices (so its state dict loads as is)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))


class LPIPS(nn.Module):
    """LPIPS distance per image pair (B,) for images in [-1, 1]; lower = more alike, 0 if equal."""

    def __init__(self, backbone: dict[str, torch.Tensor], linear: dict[str, torch.Tensor]):
        super().__init__()
        features = _alexnet_features()
        features.load_state_dict({k.removeprefix("features."): v for k, v in backbone.items()
                                  if not k.startswith("classifier.")})
        self.slices = nn.ModuleList(features[a:b] for a, b in LPIPS_SLICES)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
        for k, lin in enumerate(self.lins):
            lin.weight.data.copy_(linear[f"lin{k}.model.1.weight"])
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT)[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE)[None, :, None, None], persistent=False)
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h0, h1 = ((t.float().clamp(-1, 1) - self.shift) / self.scale for t in (a, b))  # (B, 3, H, W)
        total = torch.zeros(a.shape[0], device=a.device)
        for tap, lin in zip(self.slices, self.lins):
            h0, h1 = tap(h0), tap(h1)
            f0 = h0 / torch.sqrt(1e-8 + h0.square().sum(dim=1, keepdim=True))  # unit-normalised channels
            f1 = h1 / torch.sqrt(1e-8 + h1.square().sum(dim=1, keepdim=True))
            total = total + lin((f0 - f1).square()).mean(dim=(1, 2, 3))
        return total


def lpips_linear_file() -> Path:
    """The LPIPS linear calibration weights that torchmetrics ships (AlexNet backbone)."""
    import torchmetrics.functional.image.lpips as tm_lpips

    return Path(tm_lpips.__file__).parent / "lpips_models" / "alex.pth"


def load_lpips(backbone_path: str | Path, device: str | torch.device = "cpu") -> LPIPS:
    """LPIPS with torchvision's AlexNet weights from `backbone_path` (a local file)."""
    backbone = torch.load(backbone_path, map_location="cpu", weights_only=True)
    linear = torch.load(lpips_linear_file(), map_location="cpu", weights_only=True)
    return LPIPS(backbone, linear).to(device)
