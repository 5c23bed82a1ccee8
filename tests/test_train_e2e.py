"""End to end: `ray job submit --working-dir . -- python jobs/train.py ...` against a real
`ray start --head`, tracking to a real `mlflow server` on loopback, registering the model with an
alias; then `models:/NAME@ALIAS` is loaded as a pyfunc and must give the same output as the
in-memory model (checkpoint EMA weights) for the same seed.

The head gets its own ports and temp dir (so it cannot collide with the test session's local Ray or
anyone else's cluster) and runs as `ray start --head --block` in its own process group, which the
test stops by that group's id (never `ray stop`, which would stop every Ray on the machine). The
MLflow server runs in its own process group too. Resuming by --run-name through the CLI is covered
in-process by tests/test_train.py; here the job runs once.

The promotion gate (pipelines.train.promote) runs against the same MLflow server with one metric
deciding (`--promote-metric lr_psnr`): versions of a regression model that outputs the bicubic
upsampling and one that adds +1 to it (a colour shift), evaluated by `pipelines.eval.run.evaluate`
in this process (its sampling on a cluster is tests/test_evaluate.py's). The default decision (the
guards) is tests/test_promote.py's.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cluster_support import free_ports, stop_group
from train_support import HR, write_pairs

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    root = Path(f"/tmp/sr3h{os.getpid()}")  # short: Ray's unix socket paths are length-limited
    gcs, dashboard, node, objects, agent, agent_grpc, metrics, env_agent, client = free_ports(9)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # A job's `python` is whatever the node's PATH finds, as on a cluster image: make it this
    # interpreter, also when the tests run without an activated virtual environment (CI).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    log = open(tmp_path_factory.mktemp("ray-head") / "head.log", "wb")
    process = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs), "--temp-dir", str(root),
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--node-manager-port", str(node), "--object-manager-port", str(objects),
         "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(env_agent),
         "--ray-client-server-port", str(client), "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while True:  # the job agent answers some seconds after `ray start` returns
            probe = subprocess.run([RAY, "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray head did not start: {probe.stderr[-2000:]}")
            time.sleep(2)
        yield address, env
    finally:
        stop_group(process, grace_s=5)  # a clean Ray shutdown takes ~30 s; the group is ours alone
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    (port,) = free_ports(1)
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop_group(process, grace_s=10)  # the server and its uvicorn worker: our own group


def _submit(address: str, env: dict[str, str], runtime_env: dict, args: list[str]) -> str:
    command = [RAY, "job", "submit", "--address", address, "--working-dir", ".",
               "--runtime-env-json", json.dumps(runtime_env), "--", "python", "jobs/train.py", *args]
    for _ in range(10):  # the job agent may answer "No available agent" for a few more seconds
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode == 0 or "No available agent" not in done.stdout + done.stderr:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_job_submit_trains_registers_and_pyfunc_matches_in_memory_model(
        ray_head: tuple[str, dict[str, str]], mlflow_server: str, tmp_path: Path) -> None:
    import mlflow

    from pipelines.pairs.store import read_part
    from pipelines.registry.pyfunc import super_resolve_frame
    from sr3model.weights import load_model

    address, env = ray_head
    pairs = write_pairs(tmp_path / "pairs", n_train=8, n_val=2)
    storage = tmp_path / "runs"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server, "RAY_USAGE_STATS_ENABLED": "0"}}
    printed = _submit(address, env, runtime_env, [
        "--pairs", pairs, "--preset", "tiny", "--steps", "2", "--batch-size", "4", "--num-workers", "2",
        "--storage", str(storage), "--run-name", "e2e", "--experiment", "e2e", "--register", "sr3-e2e",
        "--val-images", "2", "--val-steps", "2", "--log-every", "1",
        "--set", "unet.channels=8", "--set", "unet.norm_groups=4", "--set", "unet.attention_head_channels=8"])
    assert "run e2e: 2 steps" in printed
    assert "model: models:/sr3-e2e@champion (version 1)" in printed
    assert "alias champion: moved: no version held @champion" in printed

    client = mlflow.MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias("sr3-e2e", "champion")
    assert version.version == "1"
    run = client.get_run(version.run_id)
    assert run.info.run_name == "e2e" and run.info.status == "FINISHED"
    assert run.data.params["unet.channels"] == "8"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert {"val_psnr", "val_ssim", "val_consistency", "images_per_s"} <= set(run.data.metrics)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "validation")] == ["validation/step_00000002.png"]

    mlflow.set_tracking_uri(mlflow_server)
    served = mlflow.pyfunc.load_model("models:/sr3-e2e@champion")
    frame = pd.DataFrame({"lr": read_part(pairs, "val", columns=["lr"]).column("lr").to_pylist()})
    params = {"seed": 7, "steps": 3, "sampler": "ddim"}
    out = served.predict(frame, params=params)
    assert list(out.columns) == ["sr", "height", "width"] and len(out) == 2
    image = np.asarray(Image.open(io.BytesIO(out["sr"][0])))
    assert image.shape == (HR, HR, 3) and image.dtype == np.uint8

    checkpoint = max(p for p in (storage / "e2e").glob("checkpoint_*") if p.is_dir())
    local = super_resolve_frame(load_model(checkpoint, ema=True), frame, params)
    assert list(out["sr"]) == list(local["sr"])  # same weights (EMA), same seed -> same pixels
    other = served.predict(frame, params={**params, "seed": 8})
    assert list(other["sr"]) != list(out["sr"])  # the seed matters: the comparison above can fail


@pytest.mark.slow
def test_promotion_gate_on_one_metric_moves_the_alias_only_to_a_better_version(mlflow_server: str, tmp_path: Path) -> None:
    import mlflow

    from pipelines import tracking
    from pipelines.train import promote
    from pipelines.registry.pyfunc import log_model
    from sr3model.model import SR3
    from sr3model.weights import save_model
    from train_support import tiny_config

    pairs = write_pairs(tmp_path / "pairs", n_train=1, n_val=2)
    client = mlflow.MlflowClient(mlflow_server)

    def register(kind: str, index: int) -> tuple[str, str]:
        """A regression model (HR − x head) registered without the alias: "plain" outputs x, the
        bicubic upsampling (its head is zero-initialised); "bright" adds +1 to every pixel. A linear
        sampling schedule, because evaluation of a log-SNR one fails on main at 8602477
        (pipelines/infer/scoring.work_item: float(None) for its β)."""
        model = SR3(tiny_config("objective=regression", "diffusion.sample_schedule=linear",
                                "diffusion.sample_steps=20", "diffusion.sample_beta_end=0.9",
                                consistency=False))  # the projection would undo the shift
        if kind == "bright":
            model.net.out[-1].bias.data.fill_(1.0)
        folder = save_model(tmp_path / f"{kind}-{index}", model)
        run_id, _ = tracking.start_or_resume(mlflow_server, "gate", f"train-{kind}-{index}")
        _, version = log_model(folder, run_id, mlflow_server, register="sr3-gate", alias=None)
        return version, run_id

    # one metric decides here (--promote-metric lr_psnr); the default guards: tests/test_promote.py
    config = promote.GateConfig(metric="lr_psnr", limit=2, report_root=str(tmp_path / "reports"), on_cluster=False)
    v1, _ = register("plain", 1)
    first = promote.gate(mlflow_server, "sr3-gate", v1, "champion", pairs, config)
    assert first.moved and first.reason == "no version held @champion" and first.new_score is None

    v2, run2 = register("bright", 2)
    said: list[str] = []
    worse = promote.gate(mlflow_server, "sr3-gate", v2, "champion", pairs, config, run_id=run2, say=said.append)
    assert not worse.moved and worse.holder == v1
    assert worse.new_score < worse.holder_score - 10  # a colour shift: far from the LR input (dB)
    assert worse.reason.startswith("worse on lr_psnr")
    assert said[-1].startswith(f"@champion stays on v{v1}, not moved to v{v2}: worse on lr_psnr")
    assert client.get_model_version_by_alias("sr3-gate", "champion").version == v1
    assert client.get_model_version("sr3-gate", v2).tags[promote.DECISION_TAG] == "kept"
    assert client.get_run(run2).data.tags[promote.REASON_TAG] == worse.reason
    assert {"sr3.data.id", "sr3.data.fingerprint"} <= set(
        client.search_runs([client.get_experiment_by_name(promote.EXPERIMENT).experiment_id])[0].data.tags)

    forced = promote.gate(mlflow_server, "sr3-gate", v2, "champion", pairs,
                          promote.GateConfig(**{**config.__dict__, "force": True}))
    assert forced.moved and forced.reason.startswith("--force-alias")
    assert client.get_model_version_by_alias("sr3-gate", "champion").version == v2

    v3, _ = register("plain", 3)  # plain again against the bright holder: better, so it moves
    better = promote.gate(mlflow_server, "sr3-gate", v3, "champion", pairs, config)
    assert better.moved and better.reason.startswith("better on lr_psnr")
    assert better.new_score == pytest.approx(worse.holder_score, abs=1e-6)  # the same output as v1
    assert client.get_model_version_by_alias("sr3-gate", "champion").version == v3
