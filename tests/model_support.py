"""Helpers for tests that need a model without training one: a `tiny`-shaped model with random
(non-zero) output weights saved as a model directory, and the same registered in MLflow."""

from __future__ import annotations

from pathlib import Path

import torch

from sr3model.model import SR3
from sr3model.weights import save_model
from train_support import tiny_config


def make_tiny(objective: str = "sr3", seed: int = 0, *extra: str) -> SR3:
    """A small `tiny` variant whose zero-initialised output layer is randomised, so its output
    depends on its input (a fresh SR3 predicts ε̂ = 0 everywhere)."""
    torch.manual_seed(seed)
    model = SR3(tiny_config(f"objective={objective}", *extra)).eval()
    with torch.no_grad():
        for parameter in model.net.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.normal_(std=0.02)
    return model


def save_tiny(directory: Path, objective: str = "sr3", seed: int = 0, *extra: str) -> Path:
    return save_model(directory, make_tiny(objective, seed, *extra))


def register_tiny(directory: Path, tracking_uri: str, name: str, alias: str = "champion",
                  experiment: str = "tests") -> tuple[str, str]:
    """Log the model directory as this project's pyfunc in a new run and register it with `alias`.
    Returns (models:/NAME@ALIAS, version)."""
    from pipelines import tracking
    from pipelines.registry.pyfunc import log_model

    run_id, _ = tracking.start_or_resume(tracking_uri, experiment, f"register-{name}")
    uri, version = log_model(directory, run_id, tracking_uri, register=name, alias=alias)
    tracking.end_run(tracking_uri, run_id)
    return uri, str(version)
