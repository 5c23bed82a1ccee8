"""SR3 science core, pure PyTorch (no Ray, MLflow or fsspec): see each module's docstring.

    config      frozen dataclasses, Table A.1 presets, JSON round trip, `--set` overrides
    schedules   β/α/γ noise schedules (training and inference)
    diffusion   forward process, p(γ), ε-loss, ŷ0, posterior, Algorithm 2's mean
    layers/unet the paper's U-Net (BigGAN residual blocks, attention, FiLM on γ)
    model       `SR3`: objectives sr3 | residual | regression | unconditional
    samplers    `ddpm` (Algorithm 2), `ddim`; one signature, a registry
    training    Algorithm 1's step: Adam + warm-up, clipping, EMA, augmentation
    ema, weights, metrics, resample, imageio
"""

from .config import PRESETS, SR3Config, override, preset
from .model import SR3
from .samplers import SAMPLERS, get_sampler
from .weights import load_model, save_model

__all__ = ["PRESETS", "SR3", "SR3Config", "SAMPLERS", "get_sampler", "load_model", "override",
           "preset", "save_model"]
