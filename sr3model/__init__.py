"""SR3 science core, pure PyTorch (no Ray, MLflow or fsspec): see each module's docstring.

    config      frozen dataclasses, Table A.1 presets, JSON round trip, `--set` overrides
    schedules   β/α/γ noise schedules (training and inference)
    diffusion   forward process, p(γ), ε-loss, ŷ0, posterior, Algorithm 2's mean
    layers/unet the paper's U-Net (BigGAN residual blocks, attention, FiLM on γ)
    model       `SR3`: objectives sr3 | residual | regression | unconditional
    samplers    `ddpm` (Algorithm 2), `ddim`, `dpmpp-2m`; one signature, a registry; ŷ0 clipping
    tiling      any image size: joint denoising of overlapping tiles, blended ε̂
    training    Algorithm 1's step: Adam + warm-up, clipping, EMA, augmentation
    ema, weights, resample, imageio
    metrics     PSNR, SSIM, consistency, colour, detail; `per_image`: the one table every stage reports

The torch-backed names are imported on first use (PEP 562), so `sr3model.config` and
`sr3model.imageio` load without torch: Ray Data decode workers start without its ~3 s import.
"""

from importlib import import_module

from .config import PRESETS, SR3Config, override, preset

_LAZY = {"SR3": "model", "SAMPLERS": "samplers", "get_sampler": "samplers", "load_model": "weights",
         "save_model": "weights", "load_model_bytes": "weights", "super_resolve_any": "tiling"}

__all__ = ["PRESETS", "SR3", "SR3Config", "SAMPLERS", "get_sampler", "load_model", "load_model_bytes", "override",
           "preset", "save_model", "super_resolve_any"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
