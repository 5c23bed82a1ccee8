"""Faults a real multi-node cluster meets, each injected at a known point, the outcome asserted.

The cluster (`cluster` fixture, tests/cluster_support.py): a head without CPUs and two worker nodes
(`node_a`, `node_b`: 1 CPU, 2 GiB each) as separate `ray start` processes on this machine, storage
on a fake-gcs-server that can be stopped, MLflow as a real `mlflow server`. Jobs run as drivers on
the head (`python jobs/NAME.py` with RAY_ADDRESS), the way `ray job submit` runs them.

| fault (injected when)                                       | job         | test                                              |
| ----------------------------------------------------------- | ----------- | ------------------------------------------------- |
| local paths / default --storage on a multi-node cluster      | all         | test_node_local_paths_are_refused… (long)         |
| node_a killed (raylet, object store, workers) after the first batch is written | upscale | test_worker_node_killed_mid_upscale… |
| an input whose sampling SIGKILLs its actor (as the OOM killer does); one larger than an actor's memory budget | upscale | test_poison_inputs… |
| storage stopped 20 s after the first batch is written        | upscale     | test_storage_outage_mid_upscale… (long)           |
| storage stopped 20 s after the first shard is written        | build_pairs | test_storage_outage_mid_pair_build… (long)        |
| MLflow server stopped and started again after step 3         | train       | test_mlflow_restart_mid_training… (long)          |
| the node running training workers killed after 2 checkpoints | train       | test_worker_node_killed_mid_training… (long)      |

All seven run in `make test` and pass (`make test-cluster` runs only them: 7 passed in 423 s on 2
cores, the cluster's start included; each fault test 31–89 s). `long` marks the ones of about a
minute of job starts, which `-m "not long"` skips on a laptop (README "Faults survived").
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cluster_support import REPO, ClusterEnv, run_job, start_job, stop_group, wait_until
from pipelines import storage
from pipelines.infer import layout, manifest

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
PATCH = 16  # LR side of the tiny model: 16 → 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_support import save_tiny

    return save_tiny(tmp_path_factory.mktemp("model") / "tiny")


def _bucket(cluster: ClusterEnv, name: str) -> str:
    return cluster.gcs.bucket(f"{name}-{int(time.time() * 1000) % 10 ** 9}")


def _upload_patches(uri: str, photo: np.ndarray, count: int, size: int = PATCH) -> list[str]:
    names = []
    for i in range(count):
        y, x = (7 * i) % (photo.shape[0] - size), (11 * i) % (photo.shape[1] - size)
        buffer = io.BytesIO()
        Image.fromarray(photo[y:y + size, x:x + size]).save(buffer, format="PNG")
        names.append(f"p{i:02d}.png")
        storage.write_bytes(storage.join(uri, names[-1]), buffer.getvalue())
    return names


def _objects(output: str) -> dict[str, int]:
    """Output objects (relative name → size), the manifest, rejects and summary left out."""
    return {item.relpath: item.size for item in storage.list_files(output)
            if item.relpath.split("/")[0] not in layout.RESERVED}


def _assert_written_once(output: str, names: list[str]) -> None:
    """Every input's output is in the manifest exactly once (all rows ever written, after the run's
    compaction), as an object that decodes to 4× its input; and no object the manifest does not list."""
    rows = manifest.read_table(output, manifest.MANIFEST_DIR).to_pylist()
    assert sorted(row["output"] for row in rows) == sorted(names), "each output listed exactly once"
    assert set(_objects(output)) == set(names), "no partial or orphan objects"
    for name in names:
        with Image.open(io.BytesIO(storage.read_bytes(storage.join(output, name)))) as image:
            assert image.size == (4 * PATCH, 4 * PATCH)


def _summary(output: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(output, layout.SUMMARY_NAME)))


def _one_error_line(done: subprocess.CompletedProcess, job: str, starts: str) -> str:
    """The job failed with exit status 2 and one `JOB: error:` line, no traceback."""
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"{job}: error:")]
    assert done.returncode == 2 and len(lines) == 1, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert lines[0].startswith(f"{job}: error: {starts}"), lines[0]
    return lines[0]


def _succeeds(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _fault_midway(cluster: ClusterEnv, job: str, args: list[str], log: Path, ready, what: str, fault, *,
                  wait_s: float = 600, finish_s: float = 600) -> str:
    """`jobs/JOB.py ARGS` in the background; once `ready()` holds while it still runs, `fault(process)`
    (the fault injected at a known point); the job must then finish with exit status 0. Its log."""
    process = start_job(job, args, cluster.env(), log)
    try:
        wait_until(lambda: process.poll() is not None or ready(), wait_s, what, every_s=0.3)
        assert process.poll() is None, f"the job ended before {what}: the fault would test nothing"
        fault(process)
        process.wait(timeout=finish_s)
    finally:
        if process.poll() is None:
            stop_group(process, grace_s=5)
    said = log.read_text()
    assert process.returncode == 0, said[-4000:]
    return said


def _assert_all_written(output: str, names: list[str], args: list[str], cluster: ClusterEnv) -> None:
    """The summary counts every input done, none failed or rejected; each written exactly once;
    a rerun (with whatever nodes are alive now) does nothing and leaves the same objects."""
    summary = _summary(output)
    assert (summary["done"], summary["failed"], summary["rejected"]) == (len(names), 0, 0), summary
    _assert_written_once(output, names)
    _succeeds(run_job("upscale", args, cluster.env()))
    assert (_summary(output)["done"], _summary(output)["skipped"]) == (0, len(names)), _summary(output)
    _assert_written_once(output, names)


@pytest.mark.long  # 2–3 min of job starts; the policy itself: tests/test_cli.py (in `make test`)
def test_node_local_paths_are_refused_on_a_multi_node_cluster(cluster: ClusterEnv, model_dir: Path, photo_arrays,
                                                              tmp_path: Path) -> None:
    """A local path is another folder on every node: refused with one line naming the flag, unless
    --shared-fs says every node mounts it (true here: the nodes share this machine's disk)."""
    from train_support import write_pairs

    env = cluster.env()
    bucket = _bucket(cluster, "paths")
    local_in = tmp_path / "in"
    local_in.mkdir()
    for name in _upload_patches(storage.join(bucket, "in"), photo_arrays["astronaut"], 2):
        (local_in / name).write_bytes(storage.read_bytes(storage.join(bucket, "in", name)))
    common = ["--model", str(model_dir), "--steps", "2", "--batch-size", "2"]

    line = _one_error_line(run_job("upscale", [*common, "--input", str(local_in), "--output",
                                               storage.join(bucket, "out")], env), "upscale", f"--input {local_in}")
    assert "3-node cluster" in line and "--shared-fs" in line
    _one_error_line(run_job("upscale", [*common, "--input", storage.join(bucket, "in"), "--output",
                                        str(tmp_path / "out")], env), "upscale", f"--output {tmp_path / 'out'}")
    assert not (tmp_path / "out").exists()  # refused before anything was written

    pairs = write_pairs(tmp_path / "pairs", n_train=4, n_val=1)
    fs, root = storage.resolve(bucket)
    fs.put(pairs, f"{root}/pairs", recursive=True)
    train = ["--pairs", storage.join(bucket, "pairs"), "--preset", "tiny", "--steps", "1", "--batch-size", "4",
             "--run-name", "refused"]
    _one_error_line(run_job("train", train, env), "train", "--storage not given: its default")
    _one_error_line(run_job("train", [*train, "--storage", str(tmp_path / "runs")], env), "train",
                    f"--storage {tmp_path / 'runs'}: a local path on a 3-node cluster")
    _one_error_line(run_job("train", [*train, "--storage", str(tmp_path / "runs"), "--shared-fs"],
                            {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}), "train",
                    "MLFLOW_TRACKING_URI not given")
    _one_error_line(run_job("build_pairs", ["--input", storage.join(bucket, "in"), "--output", str(tmp_path / "p"),
                                            "--recipe", "faces", "--hr-size", "16", "--scale", "4"], env),
                    "build_pairs", f"--output {tmp_path / 'p'}")

    _succeeds(run_job("upscale", [*common, "--input", str(local_in), "--output", str(tmp_path / "out"), "--shared-fs"],
                      env))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["p00.png", "p01.png"]


def test_worker_node_killed_mid_upscale_every_input_is_written_once_and_a_rerun_does_nothing(
        cluster: ClusterEnv, model_dir: Path, photo_arrays, tmp_path: Path) -> None:
    """node_a (one of the two sampling actors, decode and write tasks) dies as a preempted VM does
    once the first batch is in the manifest; the job finishes on node_b."""
    bucket = _bucket(cluster, "nodeloss")
    names = _upload_patches(storage.join(bucket, "in"), photo_arrays["chelsea"], 24)
    output = storage.join(bucket, "out")
    args = ["--model", str(model_dir), "--input", storage.join(bucket, "in"), "--output", output, "--steps", "30",
            "--batch-size", "2"]

    def kill_node_a(_: subprocess.Popen) -> None:
        assert "node_a" in cluster.ray.hosting("ray::"), "node_a runs no Ray worker: killing it would test nothing"
        cluster.ray.kill("node_a")
        cluster.ray.wait_dead("node_a")
    _fault_midway(cluster, "upscale", args, tmp_path / "upscale.log",
                  lambda: manifest.parquet_files(output, manifest.MANIFEST_DIR), "the first manifest part", kill_node_a)
    _assert_all_written(output, names, args, cluster)  # the rerun while node_a is still gone


DRIVER = """
import json, sys
from pipelines.infer.upscale import upscale
summary = upscale(sys.argv[1], sys.argv[2], sys.argv[3], steps=2, batch_size=4, kill_actor_on=(sys.argv[4], sys.argv[5]))
print("SUMMARY " + json.dumps(summary))
"""


def _driver(cluster: ClusterEnv, log: Path, *args: str) -> dict:
    """The upscale stage with its test hook, as a driver of the cluster (no job flag sets hooks);
    its output appended to `log`."""
    done = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=REPO, env=cluster.env(), capture_output=True,
                          text=True, timeout=600)
    with open(log, "a") as handle:
        handle.write(f"{done.stdout}\n--- stderr\n{done.stderr}\n")
    _succeeds(done)
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("SUMMARY "))[8:])


def test_poison_inputs_are_rejected_after_bounded_restarts_and_the_job_goes_on(
        cluster: ClusterEnv, model_dir: Path, photo_arrays, tmp_path: Path) -> None:
    """p03.png kills its actor's process each time it is sampled (the test hook: SIGKILL, as the
    out-of-memory killer would); huge.png (1100² → 4400², ~2.2 GiB of canvases) exceeds what an
    actor on a 2 GiB, 1-CPU node may use and is rejected before sampling. The rest is written."""
    from pipelines.infer.placement import ACTOR_RESTARTS
    from pipelines.sampling import largest_output_pixels

    bucket = _bucket(cluster, "poison")
    names = _upload_patches(storage.join(bucket, "in"), photo_arrays["coffee"], 10)
    big = Image.fromarray(photo_arrays["astronaut"]).resize((1100, 1100), Image.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    storage.write_bytes(storage.join(bucket, "in", "huge.png"), buffer.getvalue())
    output, kills = storage.join(bucket, "out"), tmp_path / "kills.log"
    kills.touch()
    started = time.monotonic()
    run = (str(model_dir), storage.join(bucket, "in"), output, "p03.png", str(kills))
    summary = _driver(cluster, tmp_path / "driver.log", *run)
    assert time.monotonic() - started < 480
    written = [n for n in names if n != "p03.png"]
    assert (summary["done"], summary["failed_by_reason"], summary["rejected_by_reason"]) == (
        9, {"crashed": 1}, {"too_large": 1}), summary
    deaths = len(kills.read_text().splitlines())
    assert deaths == 2, deaths  # once in its batch, once alone: bounded, then rejected
    rejects = {row["source"].rsplit("/", 1)[-1]: row for row in
               manifest.latest(manifest.read_table(output, manifest.REJECTS_DIR), "source").to_pylist()}
    assert set(rejects) == {"p03.png", "huge.png"}
    assert rejects["p03.png"]["reason"] == "crashed" and f"restart ≤ {ACTOR_RESTARTS}" in rejects["p03.png"]["detail"]
    assert rejects["huge.png"]["reason"] == "too_large" and "memory budget" in rejects["huge.png"]["detail"]
    assert rejects["huge.png"]["max_output_pixels"] == largest_output_pixels(2 * 2 ** 30)  # the node's 2 GiB
    _assert_written_once(output, written)  # its batch-mates too

    again = _driver(cluster, tmp_path / "driver.log", *run)
    assert (again["done"], again["skipped"], again["retried"], again["failed"]) == (0, 9, 2, 1), again
    assert len(kills.read_text().splitlines()) == 4  # retried on the next run, bounded the same way
    _assert_written_once(output, written)


# -- long: about a minute each ----------------------------------------------------------------------

OUTAGE_S = 20


def _storage_outage(cluster: ClusterEnv):
    """The fault: the storage server stopped for OUTAGE_S seconds, then started again."""
    def fault(job: subprocess.Popen) -> None:
        cluster.gcs.stop()
        time.sleep(OUTAGE_S)
        assert job.poll() is None, "the job ended while its storage was down"
        cluster.gcs.start()
    return fault


@pytest.mark.long
def test_storage_outage_mid_upscale_is_ridden_out_and_nothing_is_committed_half(
        cluster: ClusterEnv, model_dir: Path, photo_arrays, tmp_path: Path) -> None:
    bucket = _bucket(cluster, "outage-up")
    names = _upload_patches(storage.join(bucket, "in"), photo_arrays["rocket"], 24)
    output = storage.join(bucket, "out")
    data = cluster.gcs.root / "data" / bucket[5:] / "out" / manifest.MANIFEST_DIR  # read without HTTP
    args = ["--model", str(model_dir), "--input", storage.join(bucket, "in"), "--output", output, "--steps", "30",
            "--batch-size", "2"]
    _fault_midway(cluster, "upscale", args, tmp_path / "upscale.log", lambda: data.exists() and any(data.iterdir()),
                  "the first manifest part", _storage_outage(cluster))
    _assert_all_written(output, names, args, cluster)


@pytest.mark.long
def test_storage_outage_mid_pair_build_is_ridden_out_and_commits_what_an_undisturbed_build_does(
        cluster: ClusterEnv, photo_arrays, tmp_path: Path) -> None:
    from pipelines.pairs.store import read_part, read_summary

    bucket = _bucket(cluster, "outage-pairs")
    photos = storage.join(bucket, "photos")
    for i in range(48):
        name = ("astronaut", "chelsea", "coffee", "rocket")[i % 4]
        photo = photo_arrays[name]
        crop = photo[(5 * i) % 64:(5 * i) % 64 + 256, (9 * i) % 64:(9 * i) % 64 + 256]
        buffer = io.BytesIO()
        Image.fromarray(crop).save(buffer, format="JPEG", quality=90)
        storage.write_bytes(storage.join(photos, f"{name}-{i:02d}.jpg"), buffer.getvalue())
    args = ["--input", photos, "--recipe", "patches", "--hr-size", "64", "--scale", "4", "--patches-per-image", "4"]
    _succeeds(run_job("build_pairs", [*args, "--output", storage.join(bucket, "reference")], cluster.env()))

    output = storage.join(bucket, "pairs")
    data = cluster.gcs.root / "data" / bucket[5:] / "pairs"
    _fault_midway(cluster, "build_pairs", [*args, "--output", output], tmp_path / "build.log",
                  lambda: data.exists() and any(data.glob("versions/*/train/*")), "the first train shard",
                  _storage_outage(cluster))
    built, expected = read_summary(output), read_summary(storage.join(bucket, "reference"))
    assert built["rejected"] == 0 and built["pairs"] == expected["pairs"] == 48 * 4, built
    assert built["fingerprint"] == expected["fingerprint"]  # the same rows: nothing lost, nothing twice
    assert read_part(output, "train").num_rows == built["train"]  # every listed shard is there, whole


@pytest.mark.long
def test_mlflow_restart_mid_training_loses_no_metric_step_and_does_not_stall_training(
        cluster: ClusterEnv, tmp_path: Path) -> None:
    """The server is stopped after step 3 is logged and started again (a restart takes ~10-20 s);
    the rank-0 worker buffers (pipelines.tracking.RunLogger(background=True)), so steps go on
    meanwhile: several losses carry a time inside the outage."""
    from mlflow import MlflowClient

    from train_support import FAST, write_pairs

    bucket = _bucket(cluster, "mlflow")
    pairs = write_pairs(tmp_path / "pairs")
    fs, root = storage.resolve(bucket)
    fs.put(pairs, f"{root}/pairs", recursive=True)
    steps = 60
    args = ["--pairs", storage.join(bucket, "pairs"), "--preset", "tiny", "--steps", str(steps), "--batch-size", "4",
            "--storage", storage.join(bucket, "runs"), "--run-name", "restart", "--experiment", "faults",
            "--log-every", "1", "--checkpoint-every", "20", "--val-images", "1", "--val-steps", "2",
            "--register", "sr3-faults", *[a for s in FAST for a in ("--set", s)]]
    client = MlflowClient(cluster.mlflow.url)
    outage: list[float] = []

    def logged_step() -> int:
        try:
            experiment = client.get_experiment_by_name("faults")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            return max((m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")), default=0) if runs else 0
        except Exception:  # noqa: BLE001 — not yet
            return 0

    def restart(_: subprocess.Popen) -> None:
        outage.append(time.time())
        cluster.mlflow.stop()
        time.sleep(5)
        cluster.mlflow.start()
        outage.append(time.time())
    _fault_midway(cluster, "train", args, tmp_path / "train.log", lambda: logged_step() >= 3, "step 3 in MLflow",
                  restart, finish_s=900)
    down, up = outage
    run = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert len(run) == 1 and run[0].info.status == "FINISHED"
    history = client.get_metric_history(run[0].info.run_id, "loss")
    assert sorted({m.step for m in history}) == list(range(1, steps + 1))  # every step, none lost
    inside = [m.step for m in history if down * 1000 < m.timestamp < up * 1000]
    assert len(inside) >= 3, (inside, up - down)  # training went on while the server was away
    version = client.get_model_version_by_alias("sr3-faults", "champion")
    assert version.run_id == run[0].info.run_id


@pytest.mark.long
def test_worker_node_killed_mid_training_resumes_in_the_same_run_and_matches_an_uninterrupted_run(
        cluster: ClusterEnv, tmp_path: Path) -> None:
    """The node running training workers dies once two checkpoints (steps 5, 10) are stored; Ray
    Train restarts the workers on the other node from the latest checkpoint, in the same MLflow
    run. The result must equal an uninterrupted run's within the resume test's tolerances
    (tests/test_train.py: losses rtol 1e-4, weights 1e-5 absolute)."""
    import torch
    from mlflow import MlflowClient
    from safetensors.torch import load

    from train_support import FAST, write_pairs

    bucket = _bucket(cluster, "train-loss")
    pairs = write_pairs(tmp_path / "pairs")
    fs, root = storage.resolve(bucket)
    fs.put(pairs, f"{root}/pairs", recursive=True)
    runs, steps = storage.join(bucket, "runs"), 30
    common = ["--pairs", storage.join(bucket, "pairs"), "--preset", "tiny", "--steps", str(steps), "--batch-size",
              "4", "--storage", runs, "--experiment", "node-loss", "--log-every", "1", "--checkpoint-every", "5",
              "--val-images", "1", "--val-steps", "2", "--max-failures", "2", *[a for s in FAST for a in ("--set", s)]]
    _succeeds(run_job("train", [*common, "--run-name", "straight"], cluster.env(), timeout_s=900))

    def checkpoints(name: str) -> list[str]:
        found = storage.list_files(storage.join(runs, name)) if storage.exists(storage.join(runs, name)) else []
        return sorted({item.relpath.split("/")[0] for item in found if item.relpath.endswith("trainer_state.pt")})

    def kill_training_node(_: subprocess.Popen) -> None:
        hosts = cluster.ray.hosting("RayTrainWorker")
        assert hosts, "no training worker found on a worker node"
        cluster.ray.kill(hosts[0])
    _fault_midway(cluster, "train", [*common, "--run-name", "killed"], tmp_path / "train.log",
                  lambda: len(checkpoints("killed")) >= 2, "2 checkpoints", kill_training_node, finish_s=900)

    client = MlflowClient(cluster.mlflow.url)
    experiment = client.get_experiment_by_name("node-loss").experiment_id
    found = {r.data.tags["sr3.run_name"]: r for r in client.search_runs([experiment])}
    assert set(found) == {"straight", "killed"}  # the same MLflow run went on: no new one
    killed, uninterrupted = found["killed"], found["straight"]
    assert killed.info.status == "FINISHED"
    history = client.get_metric_history(killed.info.run_id, "loss")
    assert sorted({m.step for m in history}) == list(range(1, steps + 1))
    assert len(history) > steps  # the steps after the checkpoint it resumed from ran (and logged) twice
    latest = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
    reference = {m.step: m.value for m in client.get_metric_history(uninterrupted.info.run_id, "loss")}
    np.testing.assert_allclose([latest[s] for s in range(1, steps + 1)], [reference[s] for s in range(1, steps + 1)],
                               rtol=1e-4)

    def weights(name: str) -> dict[str, torch.Tensor]:
        last = storage.join(runs, name, checkpoints(name)[-1])
        return {f"{part}/{key}": value for part in ("model", "ema")
                for key, value in load(storage.read_bytes(storage.join(last, f"{part}.safetensors"))).items()}
    after, reference_weights = weights("killed"), weights("straight")
    assert after.keys() == reference_weights.keys()
    worst = max(float((after[k] - reference_weights[k]).abs().max()) for k in after)
    assert worst <= 1e-5, worst
