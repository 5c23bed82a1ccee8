"""jobs/evaluate.py: metrics against hand-computed values, LPIPS without torchvision, the notes for
perceptual metrics that cannot run, the report folder, and a run end to end (registered tiny model,
a regression baseline directory, N = 2 samples) checked in metrics.json, index.html and MLflow —
sampled by actors of a local Ray, with the metrics of sampling in the driver as before."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from job_support import load_job
from pipelines import eval as E
from pipelines.eval import report
from sr3model import metrics as M
from sr3model.resample import downsample



pytestmark = pytest.mark.usefixtures("no_weight_env", "one_torch_thread")


@pytest.fixture
def photo() -> torch.Tensor:
    """A 64×64 photo patch in [-0.6, 0.6] (room for ±0.2 shifts without clamping), (1, 3, 64, 64)."""
    from skimage import data

    image = torch.from_numpy(data.chelsea()[:256, :256].copy()).permute(2, 0, 1).float()[None] / 127.5 - 1
    return downsample(image, 64).clamp(-1, 1) * 0.6


def test_scores_of_identical_images_and_of_a_constant_shift(photo):
    lr = downsample(photo, 16)
    same = E.base_scores(photo[:, None], photo, lr)
    assert math.isinf(same["psnr"]) or same["psnr"] > 100
    assert same["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert same["consistency"] == pytest.approx(0.0, abs=1e-3)  # HR downsampled *is* the LR input
    assert "diversity" not in same  # one sample
    assert same["colour_error"] == 0 and same["detail_ratio"] == pytest.approx(1.0, rel=1e-6)
    shifted = E.base_scores((photo - 0.2)[:, None], photo, lr)  # 0.1 in [0, 1] units: MSE 1e-2
    assert shifted["psnr"] == pytest.approx(20.0, abs=1e-3)
    assert shifted["consistency"] == pytest.approx(1e-2 * 1e5, rel=1e-3)  # downsampling keeps the shift
    assert shifted["lr_psnr"] == pytest.approx(20.0, abs=1e-3)
    assert shifted["colour_error"] == pytest.approx(0.1 * 255, rel=1e-4)  # every channel 25.5 levels darker
    assert shifted["detail_ratio"] == pytest.approx(1.0, rel=1e-3)  # a shift adds no detail
    two = torch.stack([photo + 0.1, photo - 0.1], dim=1)  # (1, 2, 3, H, W): ±0.05 in [0, 1] units
    pair = E.base_scores(two, photo, lr)
    assert pair["psnr"] == pytest.approx(-10 * math.log10(0.05**2), abs=1e-3)  # 26.02 dB, both samples
    assert pair["diversity"] == pytest.approx(0.1 / math.sqrt(2), rel=1e-4)  # std of two values 0.1 apart


def test_bicubic_baseline_is_nearly_consistent_with_its_own_lr(tmp_path):
    from train_support import write_pairs

    data = E.load_val(write_pairs(tmp_path / "pairs", n_train=1, n_val=3))
    hr, lr = data.batch(0, len(data))
    assert data.keys == sorted(data.keys) and hr.shape == (3, 3, 64, 64) and lr.shape == (3, 3, 16, 16)
    up = E.bicubic(lr, (64, 64))  # (B, 1, 3, 64, 64)
    scores = E.base_scores(up, hr, lr)
    by_hand = ((downsample(M.to_unit(up[:, 0]), 16).clamp(0, 1) - M.to_unit(lr)) ** 2).mean(dim=(1, 2, 3))
    assert scores["consistency"] == pytest.approx(float(by_hand.mean()) * 1e5, rel=1e-4)
    assert scores["consistency"] < 50 and scores["lr_psnr"] > 35  # up then down nearly returns the LR
    blank = E.base_scores(torch.zeros_like(up), hr, lr)
    assert blank["consistency"] > 20 * scores["consistency"] and blank["psnr"] < scores["psnr"]
    running = E.Running()  # batch by batch (as the job runs) = all at once
    for _, _, hr_b, lr_b in data.batches(2):
        running.add(E.bicubic(lr_b, (64, 64)), hr_b, lr_b)
    assert running.result() == pytest.approx(scores, rel=1e-6)
    assert len(E.load_val(str(tmp_path / "pairs"), limit=2)) == 2


def _random_alexnet(path: Path) -> Path:
    torch.manual_seed(0)
    features = M._alexnet_features()
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


def test_lpips_is_zero_for_identical_images_symmetric_and_grows_with_noise(tmp_path, photo):
    net = M.load_lpips(_random_alexnet(tmp_path / "alexnet.pth"))
    noise = torch.randn(photo.shape, generator=torch.Generator().manual_seed(0))
    a, b = photo.repeat(2, 1, 1, 1), torch.cat([photo + 0.05 * noise, photo + 0.3 * noise]).clamp(-1, 1)
    assert torch.equal(net(a, a), torch.zeros(2))
    d = net(a, b)
    assert torch.allclose(d, net(b, a)) and 0 < d[0] < d[1]


def test_lpips_matches_torchmetrics_with_the_same_weights(tmp_path, photo):
    pytest.importorskip("torchvision")  # torchmetrics' LPIPS builds its backbone with torchvision
    from torchmetrics.functional.image.lpips import _LPIPS

    reference = _LPIPS(pretrained=True, net="alex", pnet_rand=True).eval()  # random backbone, real linear
    backbone = {f"features.{k.split('.', 1)[1]}": v for k, v in reference.net.state_dict().items()}
    path = tmp_path / "alexnet.pth"
    torch.save(backbone, path)
    other = (photo + 0.2 * torch.randn(photo.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    assert float(M.load_lpips(path)(photo, other)) == pytest.approx(float(reference(photo, other)), rel=1e-4)


def test_perceptual_metrics_without_weights_name_the_flag_and_the_variable(tmp_path):
    notes = E.Perceptual(["fid", "is", "lpips"]).notes
    assert any("FID/IS skipped" in n and "--fid-weights" in n and E.FID_ENV in n for n in notes)
    assert any("LPIPS skipped" in n and "--lpips-weights" in n and E.LPIPS_ENV in n for n in notes)
    assert E.Perceptual().available == [] and E.Perceptual().notes == []  # nothing asked, nothing said
    missing = E.Perceptual(lpips_weights=str(tmp_path / "nope.pth"))
    assert missing.available == [] and "cannot load" in missing.notes[0]
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        dummy = tmp_path / "inception.pth"
        dummy.write_bytes(b"not used")
        (note,) = E.Perceptual(fid_weights=str(dummy)).notes  # weights given imply FID and IS
        assert "torch-fidelity" in note and "pip install" in note
    with pytest.raises(ValueError, match="unknown metrics"):
        E.Perceptual(["kid"])


class _Pooled(torch.nn.Module):
    """A stand-in feature extractor (per-channel mean and std): torchmetrics' FID and IS accept
    any module, so the bookkeeping around them runs here without torch-fidelity's Inception."""

    num_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_fid_and_is_compare_each_method_with_hr_features_collected_once():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore

    perceptual = E.Perceptual()
    perceptual.fid = FrechetInceptionDistance(feature=_Pooled(), normalize=True, reset_real_features=False)
    perceptual.inception = InceptionScore(feature=_Pooled(), normalize=True)
    hr = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lr = downsample(hr, 8)
    oracle = E.Running(perceptual)  # outputs = HR: FID 0
    for start in (0, 4):
        oracle.add(hr[start:start + 4, None], hr[start:start + 4], lr[start:start + 4])
    first = oracle.result()
    assert first["fid"] == pytest.approx(0.0, abs=1e-3) and first["is"] >= 1.0 - 1e-6
    washed = E.Running(perceptual)  # a second method: half the contrast
    washed.add((hr * 0.5)[:, None], hr, lr)
    mean_gap = (_Pooled()(M.to_unit(hr)).mean(0) - _Pooled()(M.to_unit(hr * 0.5)).mean(0)).square().sum()
    assert washed.result()["fid"] == pytest.approx(float(mean_gap), rel=0.2)  # ≈ 3·(σ − σ/2)², σ ≈ 0.29
    assert int(perceptual.fid.real_features_num_samples) == 8  # HR features were not added twice
    single = E.Running(perceptual)
    single.add(hr[:1, None], hr[:1], lr[:1])
    assert single.result()["fid"] is None  # one image has no covariance


def test_report_goes_to_any_storage_uri():
    import fsspec

    with report.staged("memory://sr3-reports/run-1") as folder:
        (folder / "index.html").write_text("<p>hi</p>")
        (folder / "images").mkdir()
        (folder / "images" / "a.png").write_bytes(b"png")
    fs = fsspec.filesystem("memory")
    assert fs.cat_file("/sr3-reports/run-1/images/a.png") == b"png"
    assert not folder.exists()  # the local staging folder is gone


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Pairs, a registered tiny SR3 model and a regression model directory, one MLflow store."""
    from model_support import register_tiny, save_tiny
    from train_support import write_pairs

    root = tmp_path_factory.mktemp("evaluate")
    tracking_uri = f"sqlite:///{root}/mlflow.db"
    pairs = write_pairs(root / "pairs", n_train=1, n_val=3)
    regression = save_tiny(root / "regression-baseline", "regression", 1)
    uri, version = register_tiny(save_tiny(root / "sr3"), tracking_uri, "tiny-eval")
    return root, tracking_uri, pairs, regression, uri, version


def test_evaluate_job_end_to_end(ray_local, registered, tmp_path, monkeypatch, capsys):
    import os

    from mlflow import MlflowClient

    from pipelines.sampling import image_seed
    from pipelines.registry.models import resolve_model

    root, tracking_uri, pairs, regression, uri, version = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    out = tmp_path / "report"
    code = load_job("evaluate").main(["--model", uri, "--pairs", pairs, "--steps", "2", "--samples", "2", "--baseline",
                     str(regression), "--report", str(out), "--metrics", "fid", "lpips",
                     "--lpips-weights", str(_random_alexnet(tmp_path / "alexnet.pth"))])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "FID/IS skipped" not in printed and "FID skipped" in printed and "--fid-weights" in printed

    found = json.loads((out / "metrics.json").read_text())
    model = "tiny-eval v1"
    assert set(found) == {"bicubic", model, "regression-baseline", "_meta"}
    assert set(found[model]) == {"psnr", "ssim", "consistency", "lr_psnr", "colour_error", "detail_ratio",
                                "flat_noise_ratio", "diversity", "lpips"}
    assert set(found["regression-baseline"]) == set(found["bicubic"]) == {
        "psnr", "ssim", "consistency", "lr_psnr", "colour_error", "detail_ratio", "flat_noise_ratio", "lpips"}
    assert found["bicubic"]["detail_ratio"] < 0.6  # bicubic restores little high-frequency detail
    assert found[model]["diversity"] > 0  # two samples of a stochastic sampler differ
    assert found["bicubic"]["lr_psnr"] > 35
    meta = found["_meta"]
    assert (meta["model_uri"], meta["steps"], meta["samples"], meta["n_images"]) == (f"models:/tiny-eval/{version}",
                                                                                  2, 2, 3)
    # Sampled in the actors of the local Ray, not here; the metrics are those of sampling here as
    # main's evaluate did (one generator per (pair key, sample), `per_image`, `summarise`).
    assert meta["sampled_by"] and all(w["pid"] != os.getpid() and w["device"] == "cpu" for w in meta["sampled_by"])
    sr3 = resolve_model(uri, tracking_uri).load()
    data = E.load_val(pairs)
    hr, lr = data.batch(0, len(data))
    generators = [torch.Generator().manual_seed(image_seed(0, key, k)) for key in data.keys for k in range(2)]
    here = sr3.super_resolve(lr, schedule=sr3.inference_schedule(2), samples=2, generator=generators)
    for metric, value in E.base_scores(here, hr, lr).items():
        assert found[model][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), metric
    assert any("--fid-weights" in n for n in meta["notes"])

    page = (out / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 3 * 6  # 3 pairs × (LR, bicubic, baseline, 2 samples, HR)
    assert all((out / s).is_file() and (out / s).read_bytes()[:4] == b"\x89PNG" for s in sources)
    assert "regression-baseline" in page and "tiny-eval v1 s2" in page

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sr3-eval").experiment_id])
    assert run.data.tags["sr3.model_name"] == "tiny-eval" and run.data.tags["sr3.model_version"] == version
    assert run.data.tags["sr3.model_uri"] == f"models:/tiny-eval/{version}"
    from train_support import tiny_config

    default_sampler = tiny_config().diffusion.sample_sampler  # the model's own: no --sampler given
    assert run.data.params["sampler"] == default_sampler and run.data.params["steps"] == "2"
    assert run.data.params["schedule"] == "log-snr"  # the config's default schedule, nothing stored yet
    assert run.data.metrics["tiny-eval v1/diversity"] == pytest.approx(found[model]["diversity"])
    assert run.data.metrics["bicubic/psnr"] == pytest.approx(found["bicubic"]["psnr"])
    assert "regression-baseline/lpips" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/index.html", "report/metrics.json", "report/images"} <= artifacts
