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


# -- pipelines: stages and the arrows between them --------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path):
    """(line, imported module, names) for every import in a file, function-level ones included."""
    import ast

    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module, [a.name for a in node.names]


def _stage(module: str) -> str | None:
    """`pipelines.eval.run` → "eval"; a shared helper → "shared"; not pipelines → None."""
    import pipelines

    parts = module.split(".")
    if parts[0] != "pipelines" or len(parts) == 1:
        return None
    return "shared" if parts[1] in pipelines.SHARED else parts[1]


def _pipeline_files():
    for path in sorted((ROOT / "pipelines").rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        yield path, ".".join(p for p in relative.parts if p != "__init__")


def test_stages_import_only_along_the_listed_arrows():
    import pipelines

    wrong = []
    for path, module in _pipeline_files():
        own = _stage(module)
        if own is None:  # pipelines/__init__.py
            continue
        allowed = {own, "shared"} | set(() if own == "shared" else pipelines.ARROWS[own])
        for line, imported, _ in _imports(path):
            target = _stage(imported) if imported != "pipelines" else None
            if target is not None and target not in allowed:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports {imported} ({target})")
    assert not wrong, "imports against pipelines.ARROWS:\n" + "\n".join(wrong)


def test_every_stage_is_listed_and_shared_helpers_import_no_stage():
    import pipelines

    stages = {p.name for p in (ROOT / "pipelines").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    stages -= set(pipelines.SHARED)  # shared helper packages (images/)
    modules = {p.stem for p in (ROOT / "pipelines").glob("*.py") if p.stem != "__init__"}
    packages = {p.name for p in (ROOT / "pipelines").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert stages <= set(pipelines.ARROWS), f"stages missing from ARROWS: {stages - set(pipelines.ARROWS)}"
    assert modules | packages == set(pipelines.SHARED) | set(pipelines.ARROWS), "top-level modules unaccounted for"


def test_no_module_imports_a_private_name_of_another_module():
    """`from pipelines.x import _y` (or sr3model's) across modules: private names stay home. Tests and
    benchmarks are held to it too, and to attribute access like `manifest._files`."""
    import ast

    wrong = []
    files = [p for p, _ in _pipeline_files()] + sorted((ROOT / "jobs").glob("*.py")) + \
        sorted((ROOT / "benchmarks").glob("*.py"))
    for path in files:
        for line, imported, names in _imports(path):
            if imported.split(".")[0] in ("pipelines", "sr3model"):
                wrong += [f"{path.relative_to(ROOT)}:{line} from {imported} import {n}" for n in names
                          if n.startswith("_") and not n.startswith("__")]
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for a in node.names if (getattr(node, "module", None) or a.name).split(".")[0]
                   in ("pipelines", "sr3model")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases):
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value.id}.{node.attr}")
    assert not wrong, "private names used across modules:\n" + "\n".join(wrong)


def test_jobs_are_thin():
    """Flags → options → one pipeline call → where the results went: no job over ~150 lines, and no
    job connects to Ray itself (the stages do, through pipelines.runtime.init_ray)."""
    for path in sorted((ROOT / "jobs").glob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= 150, f"{path.name}: {len(text.splitlines())} lines"
        assert "ray.init(" not in text, f"{path.name} connects to Ray itself"
