"""jobs/search_schedule.py: the grid, the metric choice, and a search on a tiny registered model
whose `--apply` makes `sampling_for` (what jobs/upscale.py calls) return a schedule of the grid."""

from __future__ import annotations

import json
import math

import pytest

from job_support import load_job
from pipelines.eval import search as S

pytestmark = pytest.mark.usefixtures("no_weight_env", "one_torch_thread")


LIMIT = 4.0e-5  # a training schedule's last level γ_T


def test_grid_is_log_spaced_and_every_schedule_starts_where_the_noise_matches():
    from sr3model.schedules import linear_schedule

    for k in (2, 10, 100):
        points = S.grid(5, k, S.gamma_k_range(LIMIT))
        starts = sorted({s for s, _ in points})
        assert starts == pytest.approx([1e-6, 1e-5, 1e-4, 1e-3, 1e-2]) and len(points) == 25
        levels = sorted(float(linear_schedule(k, s, e).gammas[-1]) for s, e in points)
        assert levels[-1] <= LIMIT * (1 + 1e-9) and levels[0] == pytest.approx(LIMIT / 100, rel=1e-6)
        distinct = sorted({round(g, 15) for g in levels})
        ratios = [b / a for a, b in zip(distinct, distinct[1:])]
        assert max(ratios) == pytest.approx(min(ratios), rel=1e-3)  # γ_K geometric
    few, many = S.grid(1, 10, (LIMIT, LIMIT)), S.grid(1, 100, (LIMIT, LIMIT))
    assert few[0][1] > 0.9 and many[0][1] < 0.2  # few steps need a large β_K, many a small one
    assert S.grid(3, 1, (1e-6, 1e-4)) == [(1 - g, 1 - g) for g in (1e-6, 1e-5, 1e-4)]  # one step, one β
    with pytest.raises(ValueError):
        S.grid(2, 10, (1e-2, 1e-4))
    assert S.better("ssim", 0.9, 0.8) and S.better("consistency", 1.0, 2.0) and not S.better("fid", 3.0, 2.0)


def test_metric_choice_defaults_to_ssim_and_refuses_fid_without_weights():
    metric, scorer, notes = S.choose_metric(None)
    assert (metric, scorer) == ("ssim", None) and "ssim" in notes[-1]
    assert S.choose_metric("consistency")[0] == "consistency"
    with pytest.raises(ValueError, match="--fid-weights"):
        S.choose_metric("fid")
    with pytest.raises(ValueError, match="choose from"):
        S.choose_metric("accuracy")


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    from model_support import register_tiny, save_tiny
    from train_support import write_pairs

    root = tmp_path_factory.mktemp("search")
    tracking_uri = f"sqlite:///{root}/mlflow.db"
    pairs = write_pairs(root / "pairs", n_train=1, n_val=3)
    uri, version = register_tiny(save_tiny(root / "sr3"), tracking_uri, "tiny-search")
    return root, tracking_uri, pairs, uri, version


def test_search_apply_stores_the_best_grid_schedule_that_upscale_then_uses(ray_local, registered, tmp_path,
                                                                          monkeypatch):
    """The job's trials are sampled by the actors of a local Ray (jobs connect to Ray first)."""
    from mlflow import MlflowClient

    from pipelines.registry.models import resolve_model, sampling_for

    root, tracking_uri, pairs, uri, version = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    before = sampling_for(resolve_model(uri), steps=3)
    assert before.source == "config"
    out = tmp_path / "search"
    code = load_job("search_schedule").main(["--model", uri, "--pairs", pairs, "--steps", "2", "3", "--grid", "2",
                                         "--limit", "2", "--apply", "--report", str(out)])
    assert code == 0

    found = json.loads((out / "search.json").read_text())
    assert found["metric"] == "ssim" and len(found["trials"]) == 2 * 4
    from sr3model.schedules import start_limit

    ref = resolve_model(uri)
    limit = start_limit(ref.config().diffusion)
    candidates = {k: S.grid(2, k, S.gamma_k_range(limit)) for k in (2, 3)}  # what jobs/upscale.py does, then sampling_for with its flags
    for k in (2, 3):
        trials = [t for t in found["trials"] if t["steps"] == k]
        winner = max(trials, key=lambda t: t["value"])
        chosen = sampling_for(ref, steps=k)
        assert chosen.source == "search" and chosen.sampler == ref.config().diffusion.sample_sampler
        assert (chosen.beta_start, chosen.beta_end) in candidates[k]
        assert (chosen.beta_start, chosen.beta_end) == (winner["beta_start"], winner["beta_end"])
        assert ref.sampling[k]["metric"] == "ssim" and ref.sampling[k]["value"] == pytest.approx(winner["value"])
    assert sampling_for(ref, steps=5).source == "config"  # a budget that was not searched
    other = "ddpm" if ref.config().diffusion.sample_sampler != "ddpm" else "ddim"
    assert sampling_for(ref, steps=2, sampler=other).source == "config"  # searched for the model's sampler only
    assert (out / "metric_vs_steps.png").read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("sr3-schedule-search").experiment_id
    runs = client.search_runs([experiment])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 8 and parent.data.tags["sr3.model_version"] == version
    assert {(c.data.params["steps"], float(c.data.params["beta_start"]), float(c.data.params["beta_end"]))
            for c in children} == {(str(k), s, e) for k in (2, 3) for s, e in candidates[k]}
    assert all({"ssim", "psnr", "consistency", "lr_psnr", "gamma_K"} <= set(c.data.metrics) for c in children)
    history = client.get_metric_history(parent.info.run_id, "best_ssim")
    assert sorted(m.step for m in history) == [2, 3]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "search")} >= {
        "search/search.json", "search/metric_vs_steps.png"}


def test_search_on_a_model_directory_stores_sampling_json(tmp_path):
    from model_support import save_tiny
    from train_support import write_pairs

    from pipelines.registry.models import resolve_model, sampling_for

    directory = save_tiny(tmp_path / "sr3")
    pairs = write_pairs(tmp_path / "pairs", n_train=1, n_val=2)
    result = S.search(str(directory), pairs, [2], metric="consistency", grid_n=1, limit=1, apply=True,
                      tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", report_uri=str(tmp_path / "search"),
                      on_cluster=False, say=lambda _: None)  # sampled in this process
    assert result.stored == str(directory / "sampling.json")
    chosen = sampling_for(resolve_model(str(directory)), steps=2)
    from sr3model.schedules import start_limit

    limit = start_limit(resolve_model(str(directory)).config().diffusion)
    assert (chosen.source, chosen.beta_start, chosen.beta_end) == ("search", *S.grid(1, 2, S.gamma_k_range(limit))[0])
    assert float(chosen.schedule(resolve_model(str(directory)).load("cpu")).gammas[-1]) <= limit * 1.01
