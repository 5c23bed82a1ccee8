"""Configs are frozen, round-trip through JSON, and `--set` overrides are checked."""

import dataclasses

import pytest

from sr3model.config import PRESETS, SR3Config, override, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name):
    config = PRESETS[name]
    assert SR3Config.from_json(config.to_json()) == config


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset("tiny").hr_size = 32


def test_override_sets_nested_fields_and_rejects_unknown_keys():
    config = override(preset("tiny"), ["train.lr=2e-4", "unet.channel_mult=1,2,4", "unet.dropout=0.1",
                                       "objective=residual", "unet.checkpointing=true"])
    assert config.train.lr == 2e-4 and config.unet.channel_mult == (1, 2, 4)
    assert config.objective == "residual" and config.unet.checkpointing is True
    for bad in ["train.nope=1", "nope=1", "unet=3", "train.lr"]:
        with pytest.raises(ValueError):
            override(config, [bad])
    with pytest.raises(ValueError, match="divisible"):
        override(config, ["unet.channel_mult=1,1,1,1,1,1,1,1"])  # ×128 > 64
    with pytest.raises(ValueError, match="objective"):
        override(config, ["objective=gan"])


def test_regression_preset_uses_the_papers_learning_rate():
    assert preset("faces-16-128", "regression").train.lr == 1e-5
    assert preset("faces-16-128").train.lr == 1e-4
    with pytest.raises(KeyError, match="tiny"):
        preset("huge")


def test_flat_params_cover_every_leaf():
    flat = preset("tiny").flat()
    assert flat["unet.channels"] == 16 and flat["diffusion.steps"] == 1000 and flat["objective"] == "residual"


def test_configs_written_before_prediction_existed_load_as_the_papers_eps():
    import json

    old = json.loads(preset("tiny").to_json())
    for field in ("prediction", "sample_schedule", "sample_consistency", "schedule"):  # the rest: at the top level
        del old["diffusion"][field]
    del old["regression_skip"], old["residual_scale"]
    config = SR3Config.from_dict(old)
    assert config.regression_skip is False  # an old regression model predicts HR itself
    assert config.diffusion.prediction == "eps"  # what an old checkpoint's network was trained for
    assert config.diffusion.sample_schedule == "log-snr"  # its sampling now respects the step budget
    assert config.residual_scale == 1.0 and config.diffusion.sample_consistency is False  # sampled as before
    assert config.diffusion.schedule == "linear"  # its p(γ) when it was trained (a resumed run keeps it)
    # new runs: what bench_quality chose (README "Quality"); the paper's method is one flag away
    assert all((p.objective, p.diffusion.prediction, p.diffusion.loss, p.diffusion.sample_sampler,
                p.diffusion.sample_consistency, p.diffusion.schedule) == ("residual", "x0", 1, "ddim", True, "log-snr")
               for p in PRESETS.values())
    paper = preset("faces-16-128", paper=True)
    assert (paper.objective, paper.diffusion.prediction, paper.diffusion.sample_sampler,
            paper.diffusion.sample_consistency, paper.residual_scale, paper.diffusion.schedule
            ) == ("sr3", "eps", "ddpm", False, 1.0, "linear")
    assert paper.unet == preset("faces-16-128").unet and paper.train == preset("faces-16-128").train
    for bad in ["diffusion.prediction=score", "diffusion.sample_schedule=cosine", "diffusion.sample_sampler=euler",
                "diffusion.schedule=cosine"]:
        with pytest.raises(ValueError):
            override(preset("tiny"), [bad])
