"""The inference stage's policies without a Ray run: output names that cannot escape OUTPUT, the
rerun rules and compaction of the manifest (real parquet files), the placement of sampling actors
(an autoscaling cluster without GPU workers yet included), batches capped by output pixels, and
the sampling path's imports (the pyfunc ships it; a GPU machine without Ray runs it), and the
fidelity settings as settings columns (manifests from before them still plan)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import storage
from pipelines.infer import layout, manifest

REPO = Path(__file__).resolve().parents[1]


def test_names_cannot_escape_the_output_prefix_and_the_rerun_rules(tmp_path: Path) -> None:
    for bad in ("../x.png", "a/../../x.png", "/etc/x.png", "a//b.png", "a\\..\\b.png", "_manifest/x.png", "./a.png"):
        with pytest.raises(layout.UnsafeName):
            layout.safe_relpath(bad)
    output = str(tmp_path / "out")
    current = manifest.Current({"model_uri": "models:/m/2", "model_digest": "d2", "sampler": "ddpm", "steps": 4,
                                "schedule": "0.0001,0.2", "run_seed": 0, "tile": 16, "overlap": 4}, 1000)

    def listed(*names: str, size: int = 10, version: str = "crc32c=A") -> list[storage.ListedFile]:
        return [storage.ListedFile(f"gs://b/in/{n}", "gs://b/in", n, size, version) for n in names]

    found = manifest.plan(listed("a.jpg", "a.png", "../up.png", "ok/b.png"), output, "png", 1, current)
    assert [item["relpath"] for item in found.todo] == ["a.jpg", "ok/b.png"]
    assert sorted(r["reason"] for r in found.rejects) == ["output_collision", "unsafe_name"]
    assert found.counts["listed"] == 4 and found.todo[0]["input_fingerprint"] == "10:crc32c=A"

    # What earlier runs left: outputs of this model, of version 1, of another schedule; and rejects.
    done = [{"source": f"gs://b/in/{n}", "output": n, "input_bytes": 10, "input_fingerprint": "10:crc32c=A",
             "finished_at": manifest.now(), **current.record} for n in ("same.png", "v1.png", "sched.png", "new.png")]
    done[1].update(model_uri="models:/m/1", model_digest="d1")
    done[2].update(schedule="0.001,0.5")
    legacy = {**done[0], "source": "gs://b/in/old.png", "output": "old.png", "input_fingerprint": None,
              "model_digest": None, "run_seed": None, "tile": None, "overlap": None}  # a row from before
    rejected = [manifest.reject_row(f"gs://b/in/{n}", reason, "", 10, "10:crc32c=A", limit)
                for n, reason, limit in (("txt.png", "not_an_image", None), ("net.png", "read_error", None),
                                         ("oom.png", "out_of_memory", None), ("big.png", "too_large", 1000),
                                         ("bigger.png", "too_large", 500), ("bad.png", "corrupt", None))]
    manifest.write_parts(output, done + [legacy], rejected)
    everything = listed("same.png", "v1.png", "sched.png", "old.png", "txt.png", "net.png", "oom.png", "big.png",
                        "bigger.png") + listed("new.png", "bad.png", version="crc32c=B")  # same sizes, new content
    found = manifest.plan(everything, output, "png", 1, current)
    assert sorted(item["relpath"] for item in found.todo) == ["bad.png", "bigger.png", "net.png", "new.png",
                                                              "oom.png"]
    assert {k: found.counts[k] for k in ("skipped_done", "stale", "changed", "skipped_rejected", "retried")} == {
        "skipped_done": 2, "stale": 2, "changed": 1, "skipped_rejected": 2, "retried": 3}
    again = manifest.plan(everything, output, "png", 1, current, redo_stale=True)
    assert sorted(item["relpath"] for item in again.todo) == sorted(
        [item["relpath"] for item in found.todo] + ["sched.png", "v1.png"])
    # Compaction: each run's parts become one run file; past `max_files` files, one file, latest rows.
    files = []
    for parts in (3, 2, 1):
        for _ in range(parts):
            manifest.write_parts(output, done[:1], [])
        files.append(manifest.compact(output, max_files=2)[manifest.MANIFEST_DIR])
    assert files == [1, 2, 1] and len(manifest.read_table(output, manifest.MANIFEST_DIR)) == 5


def test_sampling_actors_placement_on_gpus_cpus_and_an_autoscaling_cluster_without_gpus_yet() -> None:
    from pipelines.infer.placement import Placement, place_sampling_actors

    gib = 2 ** 30
    assert place_sampling_actors({"CPU": 16, "GPU": 4, "memory": 64 * gib}) == Placement("cuda", 1, 1, 4, 4, 0)
    assert place_sampling_actors({"CPU": 16, "GPU": 4}, 0.5) == Placement("cuda", 0.5, 1, 8, 8, 0)
    cpu = {"CPU": 8, "memory": 64 * gib}
    assert place_sampling_actors(cpu, model_bytes=10 ** 6, blocks=100) == Placement("cpu", 0, 8, 8, 8, 1, 8 * gib)
    assert place_sampling_actors(cpu, model_bytes=10 ** 6, blocks=3).max_actors == 3  # few batches: 2 threads each
    assert place_sampling_actors(cpu, model_bytes=4 * gib, blocks=100).max_actors == 2  # 32 GiB / 16 GiB
    assert place_sampling_actors(cpu, model_bytes=40 * gib, blocks=100).max_actors == 1  # never 0
    assert place_sampling_actors(cpu, None, 3, model_bytes=10 ** 6, blocks=100).max_actors == 3  # --workers wins
    # An autoscaling cluster whose GPU group is at zero workers: the head has no CPU and no GPU,
    # its autoscaler can add 8 GPUs. GPU actors: one to start (so the group scales up), up to 8.
    head = {"CPU": 0, "memory": 16 * gib}
    scalable = {"CPU": 96, "GPU": 8}
    assert place_sampling_actors(head, scalable=scalable, blocks=100) == Placement("cuda", 1, 1, 1, 8, 0)
    assert place_sampling_actors(head, scalable=scalable, blocks=3).max_actors == 3  # no more than the work
    assert place_sampling_actors(head, None, 4, scalable=scalable).max_actors == 4  # --workers caps the pool
    assert place_sampling_actors(head, scalable=scalable, device="cpu") == Placement("cpu", 0, 1, 1, 1, 1, 16 * gib)
    assert place_sampling_actors(head, device="cuda") == Placement("cuda", 1, 1, 1, 1, 0)  # asked for, none seen
    assert place_sampling_actors(head) == Placement("cpu", 0, 1, 1, 1, 1, 16 * gib)  # no GPU now or ever
    with pytest.raises(ValueError):
        place_sampling_actors(head, 1, device="cpu")
    strategy = Placement("cuda", 1, 1, 1, 8, 0).map_kwargs()
    assert (strategy["compute"].min_size, strategy["compute"].max_size, strategy["num_gpus"]) == (1, 8, 1)


def test_actors_are_sized_per_node_with_bounded_restarts_and_writers_that_scale_with_them() -> None:
    """Cluster totals would put 3-thread actors on 2-CPU nodes and give each actor a share of all
    the cluster's memory; an actor lives on one node."""
    from pipelines.infer.placement import (ACTOR_RESTARTS, TASK_MAX_RETRIES, TASK_RETRIES, Placement,
                                           place_sampling_actors)

    gib = 2 ** 30
    nodes = [{"CPU": 2, "memory": 8 * gib}] * 3
    totals = {"CPU": 6, "memory": 24 * gib}
    two = place_sampling_actors(totals, None, 2, nodes=nodes)
    assert (two.threads, two.max_actors, two.memory_bytes) == (2, 2, 8 * gib)  # not 6 // 2 = 3 threads
    assert two.map_kwargs()["num_cpus"] == 2  # the actor reserves the CPUs its threads use
    one_each = place_sampling_actors(totals, nodes=nodes, blocks=100)
    assert (one_each.max_actors, one_each.threads, one_each.memory_bytes) == (6, 1, 4 * gib)  # half a node each
    big, small = {"CPU": 8, "memory": 64 * gib}, {"CPU": 4, "memory": 8 * gib}
    mixed = place_sampling_actors({"CPU": 12, "memory": 72 * gib}, None, 3, nodes=[big, small])
    assert mixed.threads == 4 and mixed.memory_bytes == 8 * gib  # 2 + 1 actors; the small node's share
    # model copies per node: 12 GiB nodes hold one 1 GiB model (×4 of it in half the memory), not 36/2/4 = 4
    assert place_sampling_actors({"CPU": 12, "memory": 36 * gib}, model_bytes=gib, blocks=100,
                                 nodes=[{"CPU": 4, "memory": 12 * gib}] * 3).max_actors == 3
    # GPUs: an actor's GPUs lie on one node: 0.75 GPU per actor on three 1-GPU nodes is 3 actors (not 3 / 0.75)
    assert place_sampling_actors({"GPU": 3}, 0.75, nodes=[{"GPU": 1}] * 3) == Placement("cuda", 0.75, 1, 3, 3, 0)
    assert place_sampling_actors({"GPU": 4}, 0.5, nodes=[{"GPU": 2}] * 2) == Placement("cuda", 0.5, 1, 8, 8, 0)
    bounded = Placement("cpu", 0, 2, 2, 2, 1, gib)
    assert (bounded.map_kwargs()["max_restarts"], bounded.map_kwargs()["max_task_retries"]) == (ACTOR_RESTARTS,
                                                                                                TASK_RETRIES)
    assert bounded.write_kwargs()["max_retries"] == TASK_MAX_RETRIES
    # the one-by-one retry of lost inputs: one task per actor, so a death takes no other input with it
    assert bounded.map_kwargs(alone=True)["compute"].max_tasks_in_flight_per_actor == 1
    assert bounded.map_kwargs()["compute"].max_tasks_in_flight_per_actor is None  # Ray Data's default queue
    # finite: Ray Data's defaults are -1 (forever) for all three
    assert 0 <= ACTOR_RESTARTS < 10 and 0 <= TASK_RETRIES < 10 and 0 <= TASK_MAX_RETRIES < 10
    assert [Placement("cuda", 1, 1, 1, n, 0).write_tasks for n in (1, 2, 3, 8)] == [1, 1, 2, 4]
    # Before CPU actors (which hold every CPU) decode tasks must reserve none (one that asked for a
    # CPU would wait forever) and be bounded in number and retries; they cannot carry the actors'
    # `max_restarts` (Ray refuses it for a task, so Ray Data cannot fuse the two steps).
    decode = bounded.decode_kwargs()
    assert (decode["num_cpus"], decode["max_retries"], decode["compute"].size) == (0, TASK_MAX_RETRIES, 2)
    assert "max_restarts" not in decode and "max_task_retries" not in decode
    gpu = Placement("cuda", 1, 1, 1, 2, 0)
    assert gpu.decode_kwargs() == {"num_cpus": 1, "max_retries": TASK_MAX_RETRIES}


def test_memory_budget_of_an_actor_caps_its_batches_and_its_largest_output() -> None:
    from pipelines.sampling import (BYTES_PER_OUTPUT_PIXEL, budget_max_batch_pixels, largest_output_pixels,
                                    memory_budget)

    gib = 2 ** 30
    assert memory_budget("cpu", memory_bytes=4 * gib) == 4 * gib
    assert budget_max_batch_pixels(4 * gib) == gib // BYTES_PER_OUTPUT_PIXEL  # a quarter for the canvases
    assert largest_output_pixels(4 * gib) == 2 * gib // BYTES_PER_OUTPUT_PIXEL  # 17.9 M pixels: 4230²
    assert largest_output_pixels(4 * gib) < 8192 * 8192  # the default --max-output-pixels would need ~7.5 GiB


def test_batches_grouped_by_size_and_capped_by_output_pixels() -> None:
    from pipelines.sampling import plan_batches

    sizes = [(16, 16), (20, 36), (16, 16), (16, 16), (20, 36)]  # LR; ×4 → 4096 and 11520 output pixels
    batches = plan_batches(sizes, 2, 4, 8, 9000)
    assert batches[:3] == [[(0, 0), (0, 1)], [(2, 0), (2, 1)], [(3, 0), (3, 1)]]  # 2 × 4096 ≤ 9000
    assert batches[3:] == [[(1, 0)], [(1, 1)], [(4, 0)], [(4, 1)]]  # one 11520-pixel output alone
    assert plan_batches(sizes, 2, 4, 3, 10 ** 9)[0] == [(0, 0), (0, 1), (2, 0)]  # --batch-size still caps


def test_the_shared_sampling_path_needs_no_ray_mlflow_or_fsspec() -> None:
    """The pyfunc ships pipelines/sampling.py, and a GPU machine without Ray can run it."""
    code = ("import sys, pipelines.sampling; "
            "print([m for m in ('ray', 'mlflow', 'fsspec', 'gcsfs') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_fidelity_settings_make_outputs_stale_and_manifests_from_before_them_still_plan(tmp_path: Path) -> None:
    """The settings that change an output's bytes (format, alpha, colour, strip_metadata, fallback)
    are settings columns: another value makes an output stale. A manifest written before these
    columns existed plans as before (its rows are compared on what they have); a would_lose reject
    holds while --format and --fallback are the same and is retried when they change."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.images.fidelity import Fidelity

    output = str(tmp_path / "out")
    model = {"model_uri": "models:/m/2", "model_digest": "d2", "sampler": "ddpm", "steps": 4, "schedule": "0.0001,0.2",
             "run_seed": 0, "tile": 16, "overlap": 4}

    def current(**options) -> manifest.Current:
        chosen = Fidelity.resolve(**options)
        return manifest.Current({**model, **chosen.record()}, 1000, chosen.settings)

    def listed(*names: str) -> list[storage.ListedFile]:
        return [storage.ListedFile(f"gs://b/in/{n}", "gs://b/in", n, 10, "crc32c=A") for n in names]

    row = {"source": "gs://b/in/new.png", "output": "new.png", "input_bytes": 10, "input_fingerprint": "10:crc32c=A",
           "finished_at": manifest.now(), **current().record}
    manifest.write_parts(output, [row], [manifest.reject_row("gs://b/in/big16.png", "would_lose", "16-bit", 10,
                                                             "10:crc32c=A", settings=current(fmt="jpeg").refusal)])
    before = pa.schema([f for f in manifest.MANIFEST_SCHEMA if f.name not in
                        ("format", "alpha_mode", "colour_mode", "strip_metadata", "fallback", "input_mode")])
    old = pa.Table.from_pylist([{**{k: v for k, v in row.items() if k in before.names}, "source": "gs://b/in/old.png",
                                 "output": "old.png"}], schema=before)
    pq.write_table(old, tmp_path / "out" / manifest.MANIFEST_DIR / "run-before.parquet")

    found = manifest.plan(listed("new.png", "old.png"), output, "png", 1, current())
    assert (found.todo, found.counts["skipped_done"], found.counts["stale"]) == ([], 2, 0)
    for options in (dict(alpha="drop"), dict(colour="srgb"), dict(strip_metadata=True), dict(fallback="convert")):
        found = manifest.plan(listed("new.png", "old.png"), output, "png", 1, current(**options))
        assert (found.counts["stale"], found.counts["skipped_done"]) == (1, 1), options  # old.png: not compared
    refused = manifest.plan(listed("big16.png"), output, "jpg", 1, current(fmt="jpeg"))
    assert (refused.todo, refused.counts["skipped_rejected"], refused.counts["refused_before"]) == ([], 1, 1)
    for options in (dict(fmt="jpeg", fallback="convert"), dict(fmt="png")):
        again = manifest.plan(listed("big16.png"), output, "png", 1, current(**options))
        assert [item["relpath"] for item in again.todo] == ["big16.png"] and again.counts["retried"] == 1, options


def test_a_change_of_lr_consistency_makes_outputs_stale_and_rows_from_before_count_as_off(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    record = {"model_uri": "models:/m/2", "model_digest": "d2", "sampler": "ddpm", "steps": 4, "schedule": "log-snr",
              "run_seed": 0, "tile": 16, "overlap": 4}
    rows = [{"source": f"gs://b/in/{n}", "output": n, "input_bytes": 10, "input_fingerprint": "10:crc32c=A",
             "finished_at": manifest.now(), **record, "consistency": flag}
            for n, flag in (("on.png", True), ("off.png", False), ("before.png", None))]
    manifest.write_parts(output, rows, [])
    listed = [storage.ListedFile(f"gs://b/in/{n}", "gs://b/in", n, 10, "crc32c=A")
              for n in ("on.png", "off.png", "before.png")]
    with_it = manifest.plan(listed, output, "png", 1, manifest.Current({**record, "consistency": True}, 1000))
    assert (with_it.counts["skipped_done"], with_it.counts["stale"]) == (1, 2)
    without = manifest.plan(listed, output, "png", 1, manifest.Current({**record, "consistency": False}, 1000))
    assert (without.counts["skipped_done"], without.counts["stale"]) == (2, 1)


def test_lr_consistency_is_chosen_flag_then_stored_then_config() -> None:
    from pipelines.sampling import choose_sampling
    from sr3model import override, preset

    off, on = (override(preset("tiny"), [f"diffusion.sample_consistency={v}"]) for v in ("false", "true"))
    stored = {20: {"sampler": "ddim", "beta_start": 1e-4, "beta_end": 0.9, "consistency": False}}
    assert choose_sampling(on, {}, steps=20).consistency is True  # the config's
    assert choose_sampling(off, {}, steps=20).consistency is False
    assert choose_sampling(on, stored, steps=20, sampler="ddim").consistency is False  # stored beats config
    assert choose_sampling(on, stored, steps=20, sampler="ddpm").consistency is True  # stored for another sampler
    assert choose_sampling(on, stored, steps=20, sampler="ddim", consistency=True).consistency is True  # the flag
    assert choose_sampling(off, {}, steps=20, consistency=True).record()["consistency"] is True
