"""cluster/ is declarative: every file parses, and every entrypoint names a real job and its flags."""

import importlib.util
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "cluster").rglob("*.yaml"))


def _job_parser(script: str):
    spec = importlib.util.spec_from_file_location(f"job_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


def _entrypoints(document) -> list[str]:
    """`entrypoint:` values, and the command after `--` of any `ray job submit` string."""
    found = []
    if isinstance(document, str) and "ray job submit" in document:
        found.append(document.split(" -- ", 1)[1])
    if isinstance(document, dict):
        for key, value in document.items():
            if key == "entrypoint" and isinstance(value, str):
                found.append(value)
            else:
                found.extend(_entrypoints(value))
    elif isinstance(document, list):
        for value in document:
            found.extend(_entrypoints(value))
    return found


def test_there_are_cluster_configs():
    names = {p.relative_to(ROOT / "cluster").as_posix() for p in FILES}
    assert {"gcp-gpu.yaml", "runtime-env.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml",
            "kuberay/raycronjob-upscale.yaml", "kuberay/cronjob-upscale.yaml"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_config_parses_and_its_entrypoints_name_real_jobs_and_flags(path):
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents
    for entrypoint in _entrypoints(documents):
        words = shlex.split(entrypoint)
        assert words[0] == "python" and words[1].startswith("jobs/"), entrypoint
        assert (ROOT / words[1]).exists(), f"{path.name}: no such job {words[1]}"
        _job_parser(words[1])(words[2:])  # argparse exits on an unknown or malformed flag


def test_launcher_config_has_autoscaling_gpu_workers():
    config = yaml.safe_load((ROOT / "cluster" / "gcp-gpu.yaml").read_text())
    gpu = config["available_node_types"]["gpu_worker"]
    assert config["provider"]["type"] == "gcp" and gpu["resources"]["GPU"] >= 1
    assert gpu["min_workers"] < gpu["max_workers"]


def test_kuberay_manifests_are_ray_io_v1():
    for name in ("raycluster.yaml", "rayjob-train.yaml"):
        manifest = yaml.safe_load((ROOT / "cluster" / "kuberay" / name).read_text())
        assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] in ("RayCluster", "RayJob")


def test_scheduled_upscaling_runs_the_upscale_job_nightly_never_twice_at_once():
    cron = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycronjob-upscale.yaml").read_text())
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert len(cron["spec"]["schedule"].split()) == 5 and cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert shlex.split(cron["spec"]["jobTemplate"]["entrypoint"])[1] == "jobs/upscale.py"
    plain = yaml.safe_load((ROOT / "cluster" / "kuberay" / "cronjob-upscale.yaml").read_text())
    assert (plain["kind"], plain["spec"]["concurrencyPolicy"]) == ("CronJob", "Forbid")
    (command,) = _entrypoints(plain)
    assert command.split()[1] == "jobs/upscale.py"
    for entrypoint in (cron["spec"]["jobTemplate"]["entrypoint"], command):  # GPU actors even from zero GPU workers
        assert "--device cuda" in entrypoint
