"""Weight I/O: a model directory is `config.json` + `model.safetensors` (+ `ema.safetensors`).

Never a pickle: safetensors files hold tensors only, and the config says how to rebuild the
network. `load_model` checks every tensor name and shape against the network the config builds and
fails with a message naming the differences, so a file and a config that disagree cannot load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save_file

from .config import SR3Config
from .model import SR3

CONFIG_FILE, MODEL_FILE, EMA_FILE = "config.json", "model.safetensors", "ema.safetensors"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_model(directory: str | Path, model: SR3, ema_state: dict[str, torch.Tensor] | None = None,
               metadata: dict[str, str] | None = None) -> Path:
    """Write config.json, model.safetensors and (if given) ema.safetensors into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(model.config.to_json())
    meta = {"format": "sr3", **(metadata or {})}
    save_file(_contiguous(model.net.state_dict()), directory / MODEL_FILE, metadata=meta)
    if ema_state is not None:
        save_file(_contiguous(ema_state), directory / EMA_FILE, metadata=meta)
    return directory


def load_config(directory: str | Path) -> SR3Config:
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a model directory holds {CONFIG_FILE} + {MODEL_FILE}")
    return SR3Config.from_json(path.read_text())


def check_state(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Raise ValueError naming missing, unexpected and mis-shaped tensors."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: file {tuple(found[k].shape)} vs config {tuple(v.shape)}"
              for k, v in expected.items() if k in found and found[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {shapes[:2]})")
        raise ValueError(f"{source} does not match its config.json: " + "; ".join(parts))


def load_model(directory: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> SR3:
    """Rebuild the model from config.json and load EMA weights when present (else the raw ones)."""
    directory = Path(directory)
    config = load_config(directory)
    path = directory / (EMA_FILE if ema and (directory / EMA_FILE).exists() else MODEL_FILE)
    return _build(config, load_file(path), str(path), device)


def load_model_bytes(config_json: str, weights: bytes, *, device: str | torch.device = "cpu") -> SR3:
    """The model from a config.json text and the bytes of one safetensors file (e.g. shipped to
    remote workers through an object store instead of a shared file system)."""
    return _build(SR3Config.from_json(config_json), load(weights), "the given weights", device)


def _build(config: SR3Config, state: dict[str, torch.Tensor], source: str, device) -> SR3:
    model = SR3(config)
    check_state(model.net.state_dict(), state, source)
    model.net.load_state_dict(state)
    return model.to(device).eval()
