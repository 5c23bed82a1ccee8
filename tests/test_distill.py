"""Distillation's science and contracts (sr3model.distill), without Ray: the student's levels, its
sampler is the rollout it trains on, its loss goes down and brings it closer to the teacher than
the untrained student (and than a student fed the wrong noise), its sampling is fixed by its config,
and the job's bad inputs are one `distill: error:` line."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from job_support import load_job
from model_support import make_tiny, save_tiny
from sr3model.config import SR3Config
from sr3model.distill import sampled_y0, student_config, student_step, teacher_noise
from sr3model.imageio import lr_from_hr, random_patches, to_tensor_batch, to_uint8_batch
from sr3model.metrics import psnr
from sr3model.model import SR3
from sr3model.schedules import GAMMA_MAX, start_limit, student_schedule
from sr3model.training import make_optimizer, train_step
from train_support import write_pairs


def _teacher() -> SR3:
    return make_tiny("residual", 0)  # the presets' science (x0-prediction, LR-consistent sampling), output layer randomised


def _student(teacher: SR3, k: int, *extra: str) -> SR3:
    from sr3model.config import override

    config = override(student_config(teacher.config, k, teacher_uri="models:/t/1"),
                      ["train.lr=1e-3", "train.warmup_steps=1", "train.ema_decay=0", *extra])
    student = SR3(config)
    student.net.load_state_dict(teacher.net.state_dict())
    return student


@pytest.mark.parametrize("k", [1, 2, 4])
def test_student_levels_start_at_pure_noise_and_leave_out_the_clean_end(k):
    diffusion = _teacher().config.diffusion
    schedule = student_schedule(k, GAMMA_MAX, start_limit(diffusion))
    gammas = schedule.gammas
    assert len(schedule) == k
    assert float(gammas[-1]) == pytest.approx(start_limit(diffusion), rel=1e-9)  # the first level sampled
    assert bool((gammas[:-1] > gammas[1:]).all()) and float(gammas[0]) < 0.99  # no pass at γ ≈ 1
    lam = torch.logit(gammas).flip(0)
    spacing = torch.diff(torch.cat([lam, torch.logit(torch.tensor([GAMMA_MAX], dtype=torch.float64))]))
    assert torch.allclose(spacing, spacing[0].expand_as(spacing))  # uniform in log-SNR


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("consistency", [False, True])
def test_the_distilled_sampler_is_the_rollout_the_student_trains_on(k, consistency, one_torch_thread):
    """`distilled` under the wrappers super_resolve applies (clipping; clipping + LR projection)
    is step for step the rollout `distill_loss` trains on, residual_scale included."""
    teacher = make_tiny("residual", 0, "residual_scale=0.5", f"diffusion.sample_consistency={str(consistency).lower()}")
    student = _student(teacher, k).eval()
    assert student.config.diffusion.sample_sampler == "distilled" and student.config.diffusion.sample_steps == k
    assert student.config.diffusion.sample_consistency is consistency  # the teacher's setting carries over
    lr = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) - 0.5  # inside the image range
    seeds = [5, 6, 7]
    sampled = student.super_resolve(lr, generator=[torch.Generator().manual_seed(s) for s in seeds])[:, 0]
    x = student.condition(lr)
    towards = sampled_y0(student.config, x, lr if consistency else None)
    y, schedule = teacher_noise(seeds, (3, 64, 64)), student.inference_schedule()
    passes = 0
    with torch.no_grad():
        for t in reversed(range(len(schedule))):
            out = student.net(student.network_input(x, y), schedule.gammas[t].float().expand(3))
            _, y = student_step(out, student.config.diffusion.prediction, y, schedule.gammas[t],
                                schedule.gammas_prev[t], towards)
            passes += 1
    assert passes == k
    assert torch.allclose(sampled, student.to_image(y, x).clamp(-1, 1), atol=1e-4)
    if consistency:  # and the output is consistent with its LR input, as the teacher's are
        from sr3model.metrics import lr_psnr

        assert float(lr_psnr(sampled, lr).min()) > 40


def _distillation_set(teacher: SR3, n: int = 8):
    """n HR/LR patches of a photo and the teacher's DPM-Solver++(2M) outputs for seeds 100…"""
    from PIL import Image
    from skimage import data

    crops = random_patches(Image.fromarray(data.astronaut()), 64, n, 0)
    hr, lr = to_tensor_batch(crops), to_tensor_batch([lr_from_hr(c, 4) for c in crops])
    seeds = torch.arange(100, 100 + n)
    with torch.no_grad():
        out = teacher.super_resolve(lr, sampler="dpmpp-2m", schedule=teacher.inference_schedule(8),
                                    generator=[torch.Generator().manual_seed(int(s)) for s in seeds])[:, 0]
    quantised = torch.from_numpy(to_uint8_batch(out)).permute(0, 3, 1, 2).float() / 127.5 - 1  # as stored
    return hr, lr, seeds, quantised


def _closeness(student: SR3, lr, seeds, teacher_out) -> float:
    """Mean PSNR of the student's outputs against the teacher's for the same start noise."""
    with torch.no_grad():
        out = student.eval().super_resolve(lr, generator=[torch.Generator().manual_seed(int(s)) for s in seeds])
    return float(psnr(out[:, 0], teacher_out).mean())


def _train(student: SR3, hr, lr, seeds, teacher_out, steps: int) -> list[float]:
    optimizer = make_optimizer(student, student.config.train)
    student.train()
    losses = []
    for step in range(steps):
        stats = train_step(student, optimizer, hr, lr, step=step, config=student.config.train,
                           extra={"teacher": teacher_out, "seed": seeds})
        losses.append(float(stats["loss"]))
    return losses


def _noisy_teacher() -> SR3:
    """A teacher whose output depends on its start noise: v-prediction (the random tiny network
    with x0-prediction, the presets', returns nearly the same image for any noise: 42 dB apart,
    so a student fed the wrong noise could not be told from one fed the right one); LR-consistent
    sampling as the presets have it, so the student trains through the projection."""
    return make_tiny("residual", 0, "diffusion.prediction=v")


def test_distillation_loss_goes_down_and_the_student_gets_closer_to_the_teacher(one_torch_thread):
    """A 1-step student trained on the teacher's outputs for their seeds: its loss falls, and its
    outputs for those noises come closer to the teacher's than the untrained student's (the
    teacher's one-step ŷ0) — and than a student trained on the same outputs with the seeds
    shuffled, which must learn the outputs without the noise that made them (what a loop that
    regenerated the wrong z would do)."""
    teacher = _noisy_teacher()
    assert teacher.config.diffusion.sample_consistency
    hr, lr, seeds, teacher_out = _distillation_set(teacher)
    untrained = _closeness(_student(teacher, 1), lr, seeds, teacher_out)

    student = _student(teacher, 1)
    losses = _train(student, hr, lr, seeds, teacher_out, 40)
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses
    trained = _closeness(student, lr, seeds, teacher_out)

    shuffled = _student(teacher, 1)
    _train(shuffled, hr, lr, seeds.roll(1), teacher_out, 40)
    wrong_noise = _closeness(shuffled, lr, seeds, teacher_out)
    assert trained > untrained + 2.0, (untrained, trained)
    assert trained > wrong_noise + 1.0, (wrong_noise, trained)


def test_a_student_config_round_trips_and_old_configs_are_not_students():
    student = student_config(_teacher().config, 2, teacher_uri="models:/t/3", teacher_steps=20)
    again = SR3Config.from_json(student.to_json())
    assert again == student and again.student and again.distill.teacher == "models:/t/3"
    assert student.flat()["distill.teacher"] == "models:/t/3"  # logged as an MLflow param
    old = student.to_dict()
    del old["distill"]
    assert not SR3Config.from_dict(old).student  # configs written before the field: ordinary models


def test_what_cannot_be_distilled_or_trained_as_a_student_is_refused():
    with pytest.raises(ValueError, match="unconditional"):
        student_config(make_tiny("unconditional", 0).config, 1)
    with pytest.raises(ValueError, match="regression"):
        student_config(make_tiny("regression", 0).config, 1)
    with pytest.raises(ValueError, match="ε-prediction"):
        student_config(make_tiny("sr3", 0, "diffusion.prediction=eps").config, 1)
    student = student_config(_teacher().config, 1)
    with pytest.raises(ValueError, match="without flips"):
        dataclasses.replace(student, train=dataclasses.replace(student.train, hflip=True))


def test_a_student_samples_only_as_it_was_trained():
    from pipelines.sampling import choose_sampling

    student = student_config(_teacher().config, 4)
    chosen = choose_sampling(student, {})
    assert (chosen.sampler, chosen.steps, chosen.schedule_text) == ("distilled", 4, "student")
    assert chosen.consistency is True  # the teacher's (the presets') LR consistency carries over
    for flag in (False, True):  # a denoiser wrapper: the flag applies to a student as to any model
        assert choose_sampling(student, {}, consistency=flag).consistency is flag
        assert choose_sampling(student, {}, consistency=flag, lenient=True, steps=20).consistency is flag
    assert choose_sampling(student, {}, sampler="distilled", steps=4) == chosen
    for flags in ({"steps": 20}, {"sampler": "ddim"}, {"schedule": (1e-4, 0.2)}):
        with pytest.raises(ValueError, match="4-step distilled student"):
            choose_sampling(student, {}, **flags)
        assert choose_sampling(student, {}, lenient=True, **flags) == chosen  # an evaluation's baseline
    teacher = _teacher().config
    with pytest.raises(ValueError, match="not one"):
        choose_sampling(teacher, {}, sampler="distilled")
    assert choose_sampling(teacher, {}, sampler="distilled", lenient=True).sampler == teacher.diffusion.sample_sampler


# -- the job's input errors: one line, status 2, before Ray starts ---------------------------------

def _one_line(capsys, argv: list[str]) -> str:
    assert load_job("distill").main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distill: error: "), captured.err
    return lines[0]


def test_distill_job_bad_inputs_are_one_line(capsys, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    MlflowClient().search_registered_models()  # an empty registry (its creation logs to stderr)
    capsys.readouterr()
    pairs = write_pairs(tmp_path / "pairs", n_train=4, n_val=1)
    teacher = save_tiny(tmp_path / "teacher", "residual")
    base = ["--pairs", pairs, "--register", "student", "--storage", str(tmp_path / "runs")]
    assert "--student-steps: invalid choice: 3" in _one_line(capsys, ["--teacher", str(teacher), "--student-steps", "3",
                                                                      *base])
    assert "not found in the MLflow registry" in _one_line(
        capsys, ["--teacher", "models:/no-such-teacher@champion", "--student-steps", "1", *base])
    assert "not a model URI" in _one_line(capsys, ["--teacher", str(tmp_path / "nothing"), "--student-steps", "1", *base])
    unconditional = save_tiny(tmp_path / "base", "unconditional")
    assert "unconditional model" in _one_line(capsys, ["--teacher", str(unconditional), "--student-steps", "2", *base])
    assert "ε-prediction" in _one_line(capsys, ["--teacher", str(save_tiny(tmp_path / "eps", "sr3", 0,
                                                                            "diffusion.prediction=eps")),
                                                "--student-steps", "1", *base])
    assert "--teacher-sampler ddpm" in _one_line(capsys, ["--teacher", str(teacher), "--student-steps", "1",
                                                          "--teacher-sampler", "ddpm", *base])
    assert "not a committed pairs dataset" in _one_line(
        capsys, ["--teacher", str(teacher), "--student-steps", "1", "--pairs", str(tmp_path / "none"),
                 "--register", "student"])
    assert "the following arguments are required: --register" in _one_line(
        capsys, ["--teacher", str(teacher), "--student-steps", "1", "--pairs", pairs])
