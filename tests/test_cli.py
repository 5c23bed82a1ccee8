"""Every job's input errors end as one `JOB: error: …` line on stderr with exit status 2, no traceback
(pipelines.cli); real bugs keep their traceback. No Ray is started: each error comes first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from job_support import ROOT, load_job
from pipelines.cli import UserError, run_job
from train_support import write_pairs


def _one_line(capsys, job: str, argv: list[str]) -> str:
    assert load_job(job).main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{job}: error: "), captured.err
    return lines[0]


def test_a_bad_input_is_one_line_in_a_real_process(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--pairs", str(tmp_path / "missing"),
                           "--preset", "tinyy"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "train: error: unknown preset 'tinyy'; choose from ['faces-16-128', 'faces-256-1024', 'faces-64-512', "
        "'natural-64-256', 'peer-128', 'tiny']"]


def test_train_job_input_errors(capsys, tmp_path: Path) -> None:
    pairs = write_pairs(tmp_path / "pairs", n_train=4, n_val=1)
    assert "not a committed pairs dataset (nothing there)" in _one_line(
        capsys, "train", ["--pairs", str(tmp_path / "nonexistent"), "--preset", "tiny"])
    assert "unknown config key 'unet.chanels'" in _one_line(
        capsys, "train", ["--pairs", pairs, "--preset", "tiny", "--set", "unet.chanels=8"])
    assert "--set expects key=value" in _one_line(capsys, "train", ["--pairs", pairs, "--preset", "tiny", "--set", "x"])
    assert "pairs have (hr_size, scale) [(64, 4)]" in _one_line(
        capsys, "train", ["--pairs", pairs, "--preset", "faces-16-128"])
    assert "--promote-metric 'psnrr'" in _one_line(
        capsys, "train", ["--pairs", pairs, "--preset", "tiny", "--promote-metric", "psnrr"])
    (Path(pairs) / "_SUMMARY.json").unlink()  # a build that died before its commit
    assert "no committed _SUMMARY.json" in _one_line(capsys, "train", ["--pairs", pairs, "--preset", "tiny"])


def test_other_jobs_refuse_missing_or_uncommitted_pairs(capsys, tmp_path: Path, no_weight_env) -> None:
    pairs = write_pairs(tmp_path / "pairs", n_train=1, n_val=1)
    (Path(pairs) / "_SUMMARY.json").unlink()
    line = _one_line(capsys, "evaluate", ["--model", str(tmp_path / "no-model"), "--pairs", pairs,
                                          "--report", str(tmp_path / "report")])
    assert "not a committed pairs dataset" in line
    assert "error: " in _one_line(capsys, "search_schedule", ["--model", str(tmp_path / "no-model"), "--pairs", pairs,
                                                              "--steps", "2", "--report", str(tmp_path / "r")])
    assert f"--input {tmp_path / 'no-photos'}: nothing there" in _one_line(
        capsys, "build_pairs", ["--input", str(tmp_path / "no-photos"), "--output", str(tmp_path / "out"),
                                "--recipe", "faces", "--hr-size", "64", "--scale", "4"])
    assert "hr_size 66 must be a positive multiple of scale 4" in _one_line(
        capsys, "build_pairs", ["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--recipe", "faces",
                                "--hr-size", "66", "--scale", "4"])


def test_only_input_errors_become_one_line(capsys) -> None:
    def bad_input(argv):
        raise UserError("pairs\nmissing")

    def bug(argv):
        raise ZeroDivisionError("a real bug")

    assert run_job("job", bad_input, []) == 2
    assert capsys.readouterr().err == "job: error: pairs missing\n"
    with pytest.raises(ZeroDivisionError):
        run_job("job", bug, [])


def test_node_local_paths_are_refused_on_several_nodes_unless_shared() -> None:
    """The policy of `pipelines.runtime.refuse_node_local` (on a real cluster:
    tests/test_cluster_faults.py)."""
    from pipelines.cli import UserError
    from pipelines.runtime import refuse_node_local

    flags = {"--storage": "/data/runs", "--pairs": "gs://b/pairs", "--val-pairs": None}
    refuse_node_local(flags, nodes=1)  # one node: every path is shared
    refuse_node_local({"--output": "gs://b/out", "--input": "s3://b/in"}, nodes=3)
    with pytest.raises(UserError, match=r"^--storage /data/runs: a local path on a 3-node cluster .* --shared-fs"):
        refuse_node_local(flags, nodes=3)
    with pytest.raises(UserError, match=r"^--output file:///x: a local path"):
        refuse_node_local({"--output": "file:///x"}, nodes=2)
    refuse_node_local(flags, shared_fs=True, nodes=3)
    with pytest.raises(UserError, match=r"^--storage not given: its default /root/ray_results is a local path"):
        refuse_node_local({"--storage": "/root/ray_results"}, shared_fs=True, defaulted={"--storage"}, nodes=2)


def test_consistency_flag_reaches_the_options_as_a_bool_or_the_models_default() -> None:
    """`--consistency on|off` is parsed once (pipelines.cli) and carried by `from_args` like any flag;
    not given, it is None and the model's stored choice holds."""
    from pipelines.cli import OneLineParser, add_consistency_flag, from_args
    from pipelines.eval.run import EvalOptions

    parser = OneLineParser(prog="evaluate")
    add_consistency_flag(parser)
    assert [from_args(EvalOptions, parser.parse_args(argv)).consistency
            for argv in (["--consistency", "on"], ["--consistency", "off"], [])] == [True, False, None]
    with pytest.raises(UserError, match="invalid choice: 'yes'"):
        parser.parse_args(["--consistency", "yes"])
