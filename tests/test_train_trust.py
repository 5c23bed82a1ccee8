"""Training decisions that cannot lose work (#24): checkpoint before validation, validation errors
that never fail or rewind the run, pre-flight refusal of schedules the run would need, dataset
versions leased while a run lives, registration that a crash cannot duplicate.

Real parts: a local Ray (2 DDP workers), MLflow in a sqlite file, pair datasets committed the way
`jobs/build_pairs.py` commits them (pipelines.pairs.store)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from pipelines import tracking
from pipelines.cli import UserError
from pipelines.pairs import store as pair_store
from train_support import tiny_config, write_pairs


def _common(tmp_path: Path) -> dict:
    return dict(num_workers=2, storage_uri=str(tmp_path / "runs"), experiment="trust", val_images=2, val_steps=2,
                tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", log_pyfunc=False)


def test_preflight_refuses_a_schedule_the_run_would_need_before_ray_starts(tmp_path: Path) -> None:
    """The presets' own β with the paper's linear inference schedule cannot make 10 or 100 steps that
    start from pure noise (`sr3model.schedules.check_start`): refused up front, naming the flag —
    before the MLflow run exists and before Ray is asked for (the pre-flight runs first)."""
    from pipelines.train import train

    pairs = write_pairs(tmp_path / "pairs", n_train=4, n_val=1)
    with pytest.raises(UserError, match=r"--val-steps 10: inference schedule .* starts at γ_K"):
        train(pairs, tiny_config("diffusion.sample_schedule=linear"), steps=1, val_steps=10, **{
            k: v for k, v in _common(tmp_path).items() if k != "val_steps"})
    from pipelines.train.promote import GateConfig

    # β_K 0.9: 100 steps reach the start noise, 10 do not — the gate's steps are checked too
    linear = tiny_config("diffusion.sample_schedule=linear", "diffusion.sample_beta_end=0.9",
                         "diffusion.sample_steps=100")
    common = {**_common(tmp_path), "val_steps": 100}
    with pytest.raises(UserError, match=r"--promote-steps 10: inference schedule"):
        train(pairs, linear, steps=1, register="x", gate=GateConfig(steps=10), **common)
    assert not (tmp_path / "mlflow.db").exists()  # refused before the run was even created (and Ray)


@pytest.mark.slow
def test_a_failing_validation_costs_nothing(ray_local: str, tmp_path: Path) -> None:
    """Every validation raises (test hook): the run still reaches its last step, its final checkpoint
    is there, the error is on the run (tag + artifact) and no worker restarted."""
    from mlflow import MlflowClient

    from pipelines.train import train
    from pipelines.train.checkpoints import STATE_FILE

    import torch

    pairs = write_pairs(tmp_path / "pairs", n_train=8, n_val=2)
    result = train(pairs, tiny_config(), steps=4, run_name="val-fails", val_every=2, checkpoint_every=2,
                   fail_validation=True, max_failures=0, **_common(tmp_path))
    assert result.steps == 4
    assert torch.load(Path(result.checkpoint) / STATE_FILE, weights_only=True)["step"] == 4
    client = MlflowClient(_common(tmp_path)["tracking_uri"])
    run = client.get_run(result.run_id)
    assert "injected validation failure at step 4" in run.data.tags["sr3.validation_error"]
    errors = [a.path for a in client.list_artifacts(result.run_id, "validation")]
    assert errors == ["validation/error_step_00000002.txt", "validation/error_step_00000004.txt"]
    assert [s for s, _ in tracking.run_metrics(_common(tmp_path)["tracking_uri"], result.run_id, "loss")] == [1, 2, 3, 4]
    assert result.metrics.get("val_failed") == 1.0  # the final report says so, too


@pytest.mark.slow
def test_a_pinned_dataset_version_survives_two_rebuilds_during_the_run(ray_local: str, tmp_path: Path) -> None:
    """While a run trains on version A, the dataset is rebuilt twice (B, then C, keeping 2 versions):
    without the run's lease C's commit would prune A. A stays while the run lives; the run finishes
    on A; its lease is gone afterwards and the next commit prunes A."""
    from pipelines.train import train

    pairs = write_pairs(tmp_path / "pairs", n_train=8, n_val=2)
    pinned = pair_store.read_summary(pairs)["version"]
    leases = Path(pairs) / pair_store.LEASES_DIR / pinned
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = train(pairs, tiny_config(), steps=12, run_name="leased", checkpoint_every=12,
                                      **_common(tmp_path))
        except BaseException as error:  # noqa: BLE001 — reported by the main thread
            outcome["error"] = error
    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 300
    while not (leases.exists() and any(leases.iterdir())):
        assert thread.is_alive() and time.time() < deadline, outcome
        time.sleep(0.2)
    lease = json.loads(next(leases.iterdir()).read_text())
    assert lease["version"] == pinned and "train run leased" in lease["holder"]
    for seed in (1, 2):  # two rebuilds while the run trains
        write_pairs(tmp_path / "pairs", n_train=8, n_val=2, seed=seed)
    history = pair_store.read_summary(pairs)["history"]
    assert pinned not in history  # kept only because of the lease ...
    assert (Path(pairs) / pair_store.VERSIONS_DIR / pinned / "_SUMMARY.json").exists()  # ... and kept it is
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].steps == 12
    assert not any(leases.iterdir())  # released
    write_pairs(tmp_path / "pairs", n_train=8, n_val=2, seed=3)
    assert not (Path(pairs) / pair_store.VERSIONS_DIR / pinned).exists()  # now pruned


def test_expired_leases_are_dropped_and_live_ones_kept(tmp_path: Path) -> None:
    pairs = write_pairs(tmp_path / "pairs", n_train=2, n_val=1)
    version = pair_store.read_summary(pairs)["version"]
    with pair_store.Lease(pairs, version, "test", ttl_s=0.5) as lease:
        assert pair_store.leased(pairs) == {version}
        assert pair_store.leased(pairs, now=time.time() + 1) == set()  # as seen after it lapsed: deleted
        lease.renew()
        assert pair_store.leased(pairs) == {version}
    assert pair_store.leased(pairs) == set()


@pytest.mark.slow
def test_registration_carries_its_step_tag_from_creation_so_a_rerun_finds_it(tmp_path: Path) -> None:
    """`log_model(..., version_tags=)` creates the version with its (run, step) tag in one registry
    call, so `registered_version` always finds a version a crashed run registered."""
    from mlflow import MlflowClient

    from pipelines.registry.pyfunc import log_model
    from pipelines.train import promote
    from sr3model.model import SR3
    from sr3model.weights import save_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    folder = save_model(tmp_path / "model", SR3(tiny_config()))
    run_id, _ = tracking.start_or_resume(uri, "trust", "registered")
    _, version = log_model(folder, run_id, uri, register="sr3-once", alias=None,
                           version_tags={promote.STEP_TAG: "7"})
    assert MlflowClient(uri).get_model_version("sr3-once", version).tags[promote.STEP_TAG] == "7"
    assert promote.registered_version(uri, "sr3-once", run_id, 7) == version
    assert promote.registered_version(uri, "sr3-once", run_id, 8) is None
