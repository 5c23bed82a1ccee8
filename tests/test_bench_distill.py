"""benchmarks/bench_distill.py caches what it trains and samples under --out; a cache made from
another teacher or other training crops must not be reused (the figures in the README would then
describe a different run than the command next to them)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench_support import load_bench
from model_support import make_tiny


def _bench():
    return load_bench("bench_distill")


def _args(out: Path, **changes) -> argparse.Namespace:
    values = dict(out=out, teacher=None, teacher_train_steps=1, teacher_steps=2, outputs_per_pair=1, seed=0,
                  patches=1, fresh=False, device="cpu")
    values.update(changes)
    return argparse.Namespace(**values)


def test_teacher_outputs_are_reused_only_for_the_same_teacher_and_crops(tmp_path):
    bench = _bench()
    teacher = make_tiny("residual", 0)
    lr = torch.rand(4, 3, 16, 16) * 2 - 1
    first = bench.teacher_outputs(_args(tmp_path), teacher, lr)
    again = bench.teacher_outputs(_args(tmp_path), teacher, lr)
    assert again["tag"] == first["tag"] and torch.equal(again["teacher"], first["teacher"])  # reused

    # Another teacher with the same config (e.g. retrained with other --teacher-train-steps).
    other = make_tiny("residual", 1)
    assert other.config.to_json() == teacher.config.to_json()
    made = bench.teacher_outputs(_args(tmp_path), other, lr)
    assert made["tag"] != first["tag"]
    assert not torch.equal(made["teacher"], first["teacher"])

    # Other crops, as many of them (what another --patches or crop seed gives at the same count).
    made = bench.teacher_outputs(_args(tmp_path), teacher, lr.flip(-1))
    assert made["tag"] != first["tag"]

    # Another --patches is another key even where the crops' count came out the same.
    made = bench.teacher_outputs(_args(tmp_path, patches=2), teacher, lr)
    assert made["tag"] != first["tag"]


def test_the_teacher_is_retrained_for_other_patches(tmp_path, capsys):
    bench = _bench()
    hr1, lr1 = bench.photo_pairs(bench.TRAIN_PHOTOS[:2], 1, 0)
    bench.teacher_model(_args(tmp_path, patches=1), hr1, lr1)
    stamp = (tmp_path / "teacher" / "stamp").read_text()
    capsys.readouterr()
    bench.teacher_model(_args(tmp_path, patches=1), hr1, lr1)
    assert "reusing the teacher" in capsys.readouterr().out  # same settings: reused
    hr2, lr2 = bench.photo_pairs(bench.TRAIN_PHOTOS[:2], 2, 0)
    bench.teacher_model(_args(tmp_path, patches=2), hr2, lr2)
    assert "training the teacher" in capsys.readouterr().out
    assert (tmp_path / "teacher" / "stamp").read_text() != stamp  # trained again on the other crops
