"""`jobs/study.py create` on a local Ray (session fixture `created_study`): study.json records who
made what, every image is where it says and is what it says, and nothing in a file's name, size or
metadata tells the real photo apart. Bad settings and an existing study are one clear error."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from job_support import load_job
from pictures import assert_same_picture, picture_psnr
from pipelines import storage
from pipelines.pairs.store import read_part
from pipelines.study.images import decode

pytestmark = pytest.mark.slow


def _chunks(png: bytes) -> list[str]:
    names, at = [], 8
    while at < len(png):
        length, kind = struct.unpack(">I4s", png[at:at + 8])
        names.append(kind.decode())
        at += 12 + length
    return names


def _read(study, name: str) -> bytes:
    return storage.read_bytes(storage.join(study.uri, name))


def test_the_study_records_which_model_made_what(created_study):
    study = created_study.study()
    models = study.models
    assert list(models) == ["m0", "m1", "m2"]
    assert models["m0"] | {} == models["m0"] and models["m0"]["label"] == "tiny-study v1"
    assert (models["m0"]["uri"], models["m0"]["model_name"], models["m0"]["model_version"], models["m0"]["kind"]) == (
        "models:/tiny-study/1", "tiny-study", "1", "model")
    assert models["m0"]["given"] == created_study.model_uri and models["m0"]["steps"] == 2
    assert (models["m1"]["label"], models["m1"]["uri"], models["m1"]["kind"]) == ("bicubic", "bicubic", "baseline")
    assert (models["m2"]["label"], models["m2"]["kind"], models["m2"]["model_version"]) == ("regression", "baseline", "")
    assert study.task == 1 and study.display_seconds == 1.0 and len(study.doc["plan"]) == 60
    assert study.trials_per_rater == 4 + 2

    test, catch = study.images[:6], study.images[6:]
    assert len(catch) == 2 and all(i["catch"] and i["degraded"] and not i["outputs"] for i in catch)
    assert all(not i["catch"] and set(i["outputs"]) == {"m0", "m1", "m2"} and i["degraded"] is None for i in test)
    assert len({i["key"] for i in study.images}) == 8

    # exactly the listed files, no staging left behind
    listed = {f.relpath for f in storage.list_files(study.uri)}
    assert listed == {"study.json"} | study.all_names() and len(study.all_names()) == 6 * 5 + 2 * 3

    pairs = {row["key"]: row for row in read_part(created_study.pairs, "val").to_pylist()}
    hr_sizes, lr_sizes = set(), set()
    for image in study.images:
        pair = pairs[image["key"]]
        real, lr = _read(study, image["real"]), _read(study, image["lr"])
        assert np.array_equal(decode(real), decode(pair["hr"])) and np.array_equal(decode(lr), decode(pair["lr"]))
        others = [_read(study, n) for n in image["outputs"].values()] + (
            [_read(study, image["degraded"])] if image["degraded"] else [])
        hr_sizes |= {len(real)} | {len(o) for o in others}
        lr_sizes.add(len(lr))
        assert all(_chunks(data) == ["IHDR", "IDAT", "IEND"] for data in [real, lr, *others])
    assert len(hr_sizes) == 1 and len(lr_sizes) == 1, "real photos and outputs cannot be told apart by size"


def test_outputs_are_the_named_models_outputs(created_study):
    from pipelines.eval.data import bicubic
    from pipelines.registry.models import resolve_model
    from sr3model.imageio import to_tensor_batch, to_uint8_batch

    study = created_study.study()
    test = study.images[:6]
    lr = to_tensor_batch([decode(_read(study, i["lr"])) for i in test])
    real = [decode(_read(study, i["real"])) for i in test]
    expected_bicubic = to_uint8_batch(bicubic(lr, (64, 64))[:, 0])
    regression = resolve_model(created_study.regression).load()
    with torch.no_grad():
        expected_regression = to_uint8_batch(regression.super_resolve(lr)[:, 0])
    for k, image in enumerate(test):
        assert np.array_equal(decode(_read(study, image["outputs"]["m1"])), expected_bicubic[k])
        assert_same_picture(decode(_read(study, image["outputs"]["m2"])), expected_regression[k], "regression")
        sample = decode(_read(study, image["outputs"]["m0"]))
        assert picture_psnr(sample, expected_bicubic[k]) < 40 and picture_psnr(sample, real[k]) < 40


def test_create_refuses_an_existing_study_and_impossible_settings(created_study, tmp_path, capsys):
    job = load_job("study")
    common = ["--model", created_study.regression, "--pairs", created_study.pairs, "--steps", "2"]
    assert job.main(["create", *common, "--study", created_study.uri]) == 2
    assert "already holds a study" in capsys.readouterr().err
    assert job.main(["create", *common, "--study", str(tmp_path / "a"), "--images", "4", "--per-rater", "5"]) == 2
    assert "--per-rater 5" in capsys.readouterr().err
    assert job.main(["create", *common, "--study", str(tmp_path / "b"), "--images", "8", "--per-rater", "4",
                     "--catch", "2"]) == 2
    assert "has 8 pairs" in capsys.readouterr().err and not (tmp_path / "b").exists()
