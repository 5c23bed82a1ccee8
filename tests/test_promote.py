"""The promotion gate cannot be won by blur, colour drift or grain; ties keep the holder (#24).

Two levels, both real:

1. The decision (`pipelines.train.compare`) on real photo crops: "good" outputs are the photos with
   a little noise (σ 2/255, a different draw per sample), and the candidates are what a bad model
   would give — the bicubic upsampling (blur), the good outputs shifted by 6/255 (colour), the good
   outputs with σ 10/255 noise (grain), and a copy. Scored with the one metric table
   (`sr3model.metrics.per_image`), compared by the paired bootstrap.
2. The gate itself (`pipelines.train.promote.gate`) on a real `mlflow server`: real registered
   versions, sampled by the evaluation path, alias moved by compare-and-set. The models cost no
   training: the "good" one is a residual x0-prediction SR3 with a random output head whose noise
   input is switched off (conv_in's y_t weights zero), so it is deterministic, and the val pairs'
   HR images are its own outputs on their LR images — by construction it is exactly right on them.
   The blurrier one outputs the bicubic upsampling (a regression model with its zero-initialised
   head); the colour-shifted one is the good one with +0.05 on its output head's bias; the grainier
   one is the good one with its noise input switched back on (its output then carries the sampler's
   noise, in flat regions too); the copy is the good weights registered again.

Margins are stated next to each assertion; each comparison is far from its tolerance
(`pipelines.train.compare.GUARDS`), so the verdicts do not hang on one CPU's rounding.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_train_e2e import mlflow_server  # noqa: F401  (a real `mlflow server` on loopback)
from train_support import HR, SCALE, photo_crops, tiny_config, write_pairs

from pipelines.eval.measures import Running
from pipelines.train import compare as C
from sr3model.resample import upsample


# -- 1. the decision on photos ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def photos() -> tuple[torch.Tensor, torch.Tensor]:
    crops = photo_crops(16, rng=3)
    hr = torch.stack([torch.from_numpy(np.array(c)).permute(2, 0, 1).float() / 127.5 - 1 for c in crops])
    lr = torch.stack([torch.from_numpy(np.array(c.resize((HR // SCALE,) * 2, Image.BICUBIC))).permute(2, 0, 1)
                      .float() / 127.5 - 1 for c in crops])
    return hr, lr


def _table(outputs: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor) -> dict[str, np.ndarray]:
    running = Running()
    running.add(outputs.clamp(-1, 1), hr, lr)
    return running.per_pair(len(hr))


def _noisy(hr: torch.Tensor, sigma_255: float, seed: int, samples: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return hr[:, None] + torch.randn((len(hr), samples, *hr.shape[1:]), generator=g) * sigma_255 * 2 / 255


def _decide(new: torch.Tensor, holder: torch.Tensor, photos, single: str | None = None) -> C.Verdict:
    hr, lr = photos
    wanted = [single] if single else list(C.GUARDS)
    return C.decide(C.compare(_table(new, hr, lr), _table(holder, hr, lr), wanted, resamples=500), single=single)


def test_blur_colour_and_grain_lose_to_a_good_holder_and_a_copy_ties(photos) -> None:
    hr, lr = photos
    good = _noisy(hr, 2, seed=0)
    blur = upsample(lr, (HR, HR))[:, None].expand(-1, 2, -1, -1, -1)
    verdicts = {"blur": _decide(blur, good, photos), "colour": _decide(good + 12 / 255, good, photos),
                "grain": _decide(_noisy(hr, 10, seed=1), good, photos), "copy": _decide(good.clone(), good, photos)}
    assert not any(v.moved for v in verdicts.values()), {k: v.reason for k, v in verdicts.items()}
    # blur: |log detail ratio| grows by ~3 (ratio ~0.04 vs ~1.1), tolerance 0.1
    assert verdicts["blur"].comparisons["detail_ratio"].low > 1.0
    assert "detail_ratio" in verdicts["blur"].reason
    # colour: +6/255 on every channel, tolerance 0.5/255
    assert verdicts["colour"].comparisons["colour_error"].low > 5.0 and "colour_error" in verdicts["colour"].reason
    # grain: σ 10/255 noise raises the detail ratio from ~1.0 to ~1.4: |log| up by ~0.3 (95% low end
    # ~0.24), tolerance 0.1
    assert verdicts["grain"].comparisons["detail_ratio"].low > 0.15
    # a copy: every Δ is exactly 0, so nothing is better — the holder keeps the alias
    copy = verdicts["copy"]
    assert all(c.delta == 0 and c.low == 0 and c.high == 0 for c in copy.comparisons.values())
    assert "tie" in copy.reason


def test_a_better_model_moves(photos) -> None:
    hr, _ = photos
    good, better = _noisy(hr, 2, seed=0), _noisy(hr, 1, seed=2)
    moved = _decide(better, good, photos)
    # half the noise: LR-PSNR up ~2.7 dB, colour and detail closer to the photo's, nothing worse
    assert moved.moved, moved.reason
    assert moved.comparisons["lr_psnr"].high < 0 and not any(c.worse for c in moved.comparisons.values())


def test_the_interval_is_paired_and_covers_the_truth_for_noisy_ties(photos) -> None:
    """Two independent draws of the same good model: a tie in expectation. The 95% interval of each
    Δ must contain 0 and stay within its tolerance, so an equal retrained model is not called
    worse; and the decision keeps the holder unless something is better."""
    hr, lr = photos
    a, b = _noisy(hr, 2, seed=10), _noisy(hr, 2, seed=11)
    found = C.compare(_table(a, hr, lr), _table(b, hr, lr), list(C.GUARDS), resamples=1000)
    for metric, c in found.items():
        assert c.low <= 0 <= c.high or abs(c.delta) < 1e-3, c.describe()
        assert not c.worse, c.describe()


# -- 2. the gate on a real MLflow server --------------------------------------------------------------

def _good_model(bias: float = 0.0, noise_input: float = 0.0):
    """The deterministic texture model of the module docstring (+ a colour bias, or its noise input)."""
    from sr3model.model import SR3

    torch.manual_seed(0)
    # LR-consistent sampling off: the projection would remove the colour shift the gate must catch
    model = SR3(tiny_config("objective=residual", "diffusion.prediction=x0", "diffusion.sample_sampler=dpmpp-2m",
                            "diffusion.sample_steps=4", consistency=False)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        head = model.net.out[-1]
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.05)
        head.bias.fill_(bias)
        model.net.conv_in.weight[:, 3:] *= noise_input  # the y_t channels
    return model


@pytest.fixture(scope="module")
def gate_world(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str):  # noqa: F811
    """Val pairs whose HR images are the good model's outputs, and the candidates' model folders."""
    from sr3model.model import SR3
    from sr3model.weights import save_model

    root = tmp_path_factory.mktemp("gate")
    crops = photo_crops(8, rng=5)
    lrs = [c.resize((HR // SCALE,) * 2, Image.BICUBIC) for c in crops]
    lr = torch.stack([torch.from_numpy(np.array(x)).permute(2, 0, 1).float() / 127.5 - 1 for x in lrs])
    with torch.no_grad():
        out = _good_model().super_resolve(lr, generator=torch.Generator().manual_seed(0))[:, 0]
    hrs = [Image.fromarray(a) for a in ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()]
    pairs = write_pairs(root / "pairs", n_train=1, val=list(zip(hrs, lrs)))
    models = {"good": _good_model(), "colour": _good_model(bias=0.05), "grain": _good_model(noise_input=1.0),
              "blur": SR3(tiny_config("objective=regression", consistency=False))}
    folders = {name: save_model(root / name, model) for name, model in models.items()}
    return pairs, folders, root


def _register(uri: str, name: str, folder: Path) -> str:
    from pipelines import tracking
    from pipelines.registry.pyfunc import log_model

    run_id, _ = tracking.start_or_resume(uri, "gate-tests", f"{name}-{folder.name}-{id(folder)}")
    return log_model(folder, run_id, uri, register=name, alias=None)[1]


def _gate(uri: str, name: str, version: str, pairs: str, root: Path, **config):
    from pipelines.train import promote

    gate_config = promote.GateConfig(limit=8, samples=2, resamples=500, on_cluster=False,
                                     report_root=str(root / "reports"), **config)
    return promote.gate(uri, name, version, "champion", pairs, gate_config, say=lambda _: None)


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["blur", "colour", "grain"])
def test_a_blurrier_colour_shifted_or_grainier_version_does_not_take_the_alias(
        mlflow_server: str, gate_world, bad: str) -> None:  # noqa: F811
    from mlflow import MlflowClient

    from pipelines.train import promote

    pairs, folders, root = gate_world
    name = f"sr3-gate-{bad}"
    good = _register(mlflow_server, name, folders["good"])
    assert _gate(mlflow_server, name, good, pairs, root).moved  # no holder yet
    candidate = _register(mlflow_server, name, folders[bad])
    decision = _gate(mlflow_server, name, candidate, pairs, root)
    client = MlflowClient(mlflow_server)
    assert not decision.moved, decision.reason
    assert client.get_model_version_by_alias(name, "champion").version == good
    tags = client.get_model_version(name, candidate).tags
    assert tags[promote.DECISION_TAG] == "kept" and tags[promote.REASON_TAG] == decision.reason[:5000]
    comparisons = decision.comparisons
    if bad == "blur":  # the bicubic upsampling: ~30% of the HR's detail; more LR-consistent than the holder
        assert comparisons["detail_ratio"]["low"] > 0.5 and "detail_ratio" in decision.reason
        assert comparisons["lr_psnr"]["delta"] < -5  # > 5 dB better on LR-PSNR: the old gate would have moved
    if bad == "colour":  # +0.05 on the head: ~6/255 on every channel, tolerance 0.5
        assert comparisons["colour_error"]["low"] > 4 and "colour_error" in decision.reason
    if bad == "grain":  # noise through the network: more energy than the photo where it is smooth
        flat = comparisons["flat_noise_ratio"]  # grain where the photo is flat: the guard that names it
        assert flat["low"] > flat["tolerance"] and "flat_noise_ratio" in decision.reason, flat
    report = Path(decision.report) / "promotion.json"
    assert report.exists() and '"moved": false' in report.read_text()


@pytest.mark.slow
def test_copies_tie_and_the_holder_keeps_the_alias_a_better_one_takes_it(
        mlflow_server: str, gate_world) -> None:  # noqa: F811
    from mlflow import MlflowClient

    pairs, folders, root = gate_world
    name = "sr3-gate-tie"
    holder = _register(mlflow_server, name, folders["good"])
    assert _gate(mlflow_server, name, holder, pairs, root).moved
    copy = _register(mlflow_server, name, folders["good"])
    tie = _gate(mlflow_server, name, copy, pairs, root)
    assert not tie.moved and "tie" in tie.reason  # the same outputs: every Δ is exactly 0
    assert all(c["delta"] == 0 for c in tie.comparisons.values())
    assert MlflowClient(mlflow_server).get_model_version_by_alias(name, "champion").version == holder

    name = "sr3-gate-better"  # the grainy one holds; the good one is better on grain, colour and detail
    grainy = _register(mlflow_server, name, folders["grain"])
    assert _gate(mlflow_server, name, grainy, pairs, root).moved
    good = _register(mlflow_server, name, folders["good"])
    better = _gate(mlflow_server, name, good, pairs, root)
    assert better.moved, better.reason
    assert MlflowClient(mlflow_server).get_model_version_by_alias(name, "champion").version == good


@pytest.mark.slow
def test_alias_moves_are_compare_and_set(mlflow_server: str, gate_world) -> None:  # noqa: F811
    """`move_alias` refuses when the holder changed since it was read, and of 6 threads racing from
    the same holder exactly one wins (the registry lock)."""
    from mlflow import MlflowClient

    from pipelines.train import promote

    _, folders, _ = gate_world
    name = "sr3-gate-cas"
    versions = [_register(mlflow_server, name, folders["good"]) for _ in range(8)]
    assert promote.move_alias(mlflow_server, name, "champion", None, versions[0]) == (True, None)
    assert promote.move_alias(mlflow_server, name, "champion", versions[0], versions[1]) == (True, versions[0])
    lost = promote.move_alias(mlflow_server, name, "champion", versions[0], versions[2])  # stale expectation
    assert lost == (False, versions[1])
    client = MlflowClient(mlflow_server)
    assert client.get_model_version_by_alias(name, "champion").version == versions[1]

    results: dict[str, bool] = {}
    start = threading.Barrier(6)

    def race(version: str) -> None:
        start.wait()
        results[version] = promote.move_alias(mlflow_server, name, "champion", versions[1], version)[0]
    threads = [threading.Thread(target=race, args=(v,)) for v in versions[2:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [v for v, won in results.items() if won]
    assert len(winners) == 1, results
    assert client.get_model_version_by_alias(name, "champion").version == winners[0]
    assert not [m for m in client.search_registered_models() if m.name.startswith(promote.LOCK_PREFIX)]
