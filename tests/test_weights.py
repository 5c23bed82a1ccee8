"""Weights are config.json + safetensors; EMA is preferred; mismatches fail clearly."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sr3model import SR3, load_model, preset, save_model
from sr3model.ema import EMA


def _randomise(model):
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)


def test_round_trip_reproduces_outputs(tmp_path):
    model = SR3(preset("tiny"))
    _randomise(model)
    ema = EMA(model.net, decay=0.5)
    save_model(tmp_path, model, ema.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "ema.safetensors", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["name"] == "tiny"
    loaded = load_model(tmp_path, ema=False)
    x, g = torch.randn(2, 6, 64, 64), torch.rand(2)
    model.eval()
    assert torch.equal(model.net(x, g), loaded.net(x, g))
    assert loaded.config == model.config


def test_ema_weights_are_loaded_when_present(tmp_path):
    model = SR3(preset("tiny"))
    ema = EMA(model.net, decay=0.9)
    _randomise(model)
    ema.update(model.net)
    save_model(tmp_path, model, ema.state_dict())
    loaded = load_model(tmp_path)
    key = "conv_in.weight"
    assert torch.equal(loaded.net.state_dict()[key], ema.state_dict()[key])
    assert not torch.equal(loaded.net.state_dict()[key], model.net.state_dict()[key])


def test_mismatched_file_fails_with_a_clear_message(tmp_path):
    save_model(tmp_path, SR3(preset("tiny")))
    state = load_file(tmp_path / "model.safetensors")
    state.pop("conv_in.bias")
    state["conv_in.weight"] = torch.zeros(1, 1, 3, 3)
    state["extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing.*conv_in.bias.*unexpected.*extra.weight.*another shape"):
        load_model(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_ema_follows_the_weights_with_warmup():
    model = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.99)
    torch.nn.init.ones_(model.weight)
    ema.update(model)  # warm-up decay min(0.99, 2/11)
    assert torch.allclose(ema.state_dict()["weight"], torch.full((2, 2), 1 - 2 / 11))
