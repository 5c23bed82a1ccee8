"""sr3model stays pure PyTorch: the GPU machine has no Ray or MLflow, and the layers flow one way."""

import subprocess
import sys
from pathlib import Path


def test_importing_sr3model_loads_no_ray_mlflow_or_fsspec():
    code = ("import sys, sr3model, sr3model.training, sr3model.metrics, sr3model.weights; "
            "print([m for m in ('ray', 'mlflow', 'fsspec', 'gcsfs', 'pipelines') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_no_sr3model_file_imports_the_cluster_stack():
    root = Path(__file__).resolve().parents[1] / "sr3model"
    for path in root.glob("*.py"):
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                assert words[1].split(".")[0] not in {"ray", "mlflow", "fsspec", "gcsfs", "s3fs", "pipelines"}, \
                    f"{path.name}: {line}"


def test_config_and_imageio_load_without_torch():
    """Ray Data decode workers import these; torch (~3 s) comes only with the model code."""
    code = ("import sys, sr3model, sr3model.config, sr3model.imageio; assert 'torch' not in sys.modules; "
            "from sr3model import SR3; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "True"  # the lazy names still resolve
