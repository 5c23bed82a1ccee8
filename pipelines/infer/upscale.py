"""Batch super-resolution of a bucket with Ray Data: list → plan → decode → sample → encode + write.

    driver: resolve --model (pinned version, weights → object store), list INPUT (with each file's
            fingerprint), plan against OUTPUT/_manifest and _rejects (pipelines.infer.manifest:
            done, stale, changed, retried)
    from_items(to do) ─map_batches(bucket.decode_batch)──── CPU tasks: fetch (threads) + decode: the
                                                            model's sRGB input and what the output
                                                            keeps (pipelines.images.fidelity)
      ─map_batches(actors.Upscaler, actor pool)──────────── actors: the model loaded once each; GPU
                                                            actors (min 1 … max the cluster can
                                                            scale to) or single-threaded CPU actors
                                                            (pipelines.infer.placement)
      ─map_batches(bucket.write_batch)───────────────────── CPU tasks: encode (alpha, depth, profile,
                                                            metadata put back), atomic writes, manifest
    driver: iterates the small status rows (progress); inputs that came back from no batch (their
            batch was lost with a dead actor or node after its bounded retries: Ray Data is told to
            drop such blocks and go on) are sampled again, each alone, by a fresh pool; what still
            does not come back is rejected as `crashed`; outputs of inputs that did not end up
            written are deleted unless the manifest lists them; compacts the manifest, writes
            _SUMMARY.json

Memory stays bounded: Ray Data streams blocks between the stages with backpressure; inside an
actor, outputs are sampled in batches grouped by size and capped by output pixels
(`max_batch_pixels`), and each finished batch's rows leave the actor at once; only status rows
come back to the driver.

Sampling: `pipelines.registry.models.sampling_for` (flags, else the schedule stored by the search job for
these steps, else the model config) through `pipelines.sampling` — the path the pyfunc and
the evaluation share. A failed image (out of memory, a sampling error) is rejected with its
reason and retried on the next run; the summary counts it under `failed`.

Cluster scale: the actors are sized per node (`pipelines.infer.placement`: threads, memory budget,
fractional GPUs) with bounded restarts and retries; an input too large for an actor's memory budget
is rejected as `too_large` before sampling; encoding and writing run in `Placement.write_tasks`
tasks with PUT threads inside each (`bucket.write_batch`). On a multi-node cluster a local
--input/--output is refused unless `shared_fs` (`pipelines.runtime.refuse_node_local`).

Fidelity (`pipelines.images.fidelity.Fidelity`): outputs keep their input's alpha, bit depth, ICC
profile, EXIF/XMP and greyscale as the options say. An input whose output format cannot hold what
it has (16 bits in JPEG/WebP, transparency in JPEG) is rejected as `would_lose` unless
`fallback="convert"`; the summary's `refused` counts those — also the ones an earlier run refused
under the same format and fallback — and `refused_message` is the job's one error line for them.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from pipelines import storage
from pipelines.infer import bucket, manifest
from pipelines.infer.actors import Upscaler
from pipelines.images.fidelity import Fidelity
from pipelines.infer.layout import SUMMARY_NAME, UnsafeName, output_names
from pipelines.infer.placement import ACTOR_RESTARTS, TASK_MAX_RETRIES, Placement, input_blocks, sampling_placement
from pipelines.sampling import Layout, Sampling
from pipelines.registry.models import ModelRef, parse_schedule, resolve_model, sampling_for
from pipelines.runtime import SamplingOptions, init_ray, refuse_node_local

DEFAULT_MAX_OUTPUT_PIXELS = 8192 * 8192
ISOLATE_MAX = 256  # inputs lost with their batch retried one by one (or a quarter of the run's); beyond, rejected


@dataclass(frozen=True)
class UpscaleOptions(SamplingOptions):
    """What `jobs/upscale.py` lets a user choose (field names are its flags; `fmt` is --format)."""

    samples: int = 1  # samples per image
    seed: int = 0
    tile: int | None = None  # LR tile size for other sizes (default: the model's LR size)
    overlap: int | None = None  # LR pixels shared by neighbouring tiles (default: tile / 4)
    fmt: str = "png"
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS  # larger outputs are rejected (too_large)
    max_batch_pixels: int | None = None  # output pixels sampled together (default: from the device's memory)
    redo_stale: bool = False  # redo outputs of another model version or other settings
    shared_fs: bool = False  # a plain local --input/--output is on a file system every node mounts
    kill_actor_on: tuple[str, str] | None = None  # test hook: (relpath, log): sampling it SIGKILLs the actor
    alpha: str = "keep"  # a fully opaque alpha: keep | drop (pipelines.images.fidelity)
    colour: str | None = None  # keep | srgb (default: keep; srgb with strip_metadata)
    strip_metadata: bool = False  # no EXIF, XMP or ICC profile in the outputs
    fallback: str = "refuse"  # what an output format cannot hold: refuse (would_lose) | convert


def upscale(model_uri: str, input_uri: str, output_uri: str, options: UpscaleOptions | None = None, *,
            progress: Callable[[str], None] = print, **fields: Any) -> dict[str, Any]:
    """Super-resolve every new (or changed, or with `redo_stale` stale) image under `input_uri`
    into `output_uri`; returns the summary (also OUTPUT/_SUMMARY.json). `fields` override `options`
    (e.g. `upscale(m, i, o, steps=2)`); `alpha`, `colour`, `strip_metadata`, `fallback`: what outputs
    keep (`Fidelity.resolve`). Connects to Ray (`ray_address`) once the flags are checked."""
    started = time.perf_counter()
    o = replace(options or UpscaleOptions(), **fields)
    fidelity = Fidelity.resolve(o.fmt, alpha=o.alpha, colour=o.colour, strip_metadata=o.strip_metadata,
                                fallback=o.fallback)
    _check(o)
    ref = resolve_model(model_uri, o.tracking_uri)
    config = ref.config()
    if not config.conditional:
        raise ValueError(f"{model_uri} is an unconditional model: use jobs/cascade.py --base")
    chosen = sampling_for(ref, sampler=o.sampler, steps=o.steps, schedule=parse_schedule(o.schedule),
                          consistency=o.consistency)
    layout = Layout(o.batch_size, o.max_batch_pixels, o.tile, o.overlap)
    tile_px, overlap_px = layout.tiling(config)
    if not 0 <= overlap_px < tile_px:
        raise ValueError(f"--overlap {overlap_px}: must be in [0, tile = {tile_px})")
    progress(f"model {ref.label} ({config.name}, {config.objective}, ×{config.scale}); "
             f"{chosen.sampler}, {chosen.steps} steps, schedule {chosen.schedule_text} "
             f"(from {chosen.source}), LR consistency {'on' if chosen.consistency else 'off'}")

    listed = storage.list_files(input_uri)
    if not listed and not storage.exists(input_uri):
        raise FileNotFoundError(f"--input {input_uri}: no such file, folder or prefix")
    init_ray(o.ray_address)
    refuse_node_local({"--input": input_uri, "--output": output_uri}, shared_fs=o.shared_fs)
    record = {**ref.record(), **chosen.record(), "run_seed": o.seed, "tile": tile_px, "overlap": overlap_px,
              **fidelity.record()}
    exclude = _listed_style(output_uri) if _inside(output_uri, input_uri) else None
    plan = manifest.plan(listed, output_uri, o.fmt, o.samples,
                         manifest.Current(record, o.max_output_pixels, fidelity.settings),
                         exclude=exclude, redo_stale=o.redo_stale)
    counts = plan.counts
    manifest.write_parts(output_uri, plan.refresh, plan.rejects)
    progress(f"listed {counts['listed']} files under {input_uri}: {len(plan.todo)} to do "
             f"({counts['changed']} changed, {counts['redone_stale']} stale redone, {counts['retried']} retried), "
             f"{counts['skipped_done']} already done ({counts['touched']} rewritten unchanged), "
             f"{counts['stale']} stale (another model or settings; "
             f"--redo-stale redoes them), {counts['skipped_rejected']} rejected before, "
             f"{len(plan.rejects)} rejected by name")
    statuses: Counter[str] = Counter()
    reasons: Counter[str] = Counter(r["reason"] for r in plan.rejects)
    examples: dict[str, str] = {}
    placement = None
    if plan.todo:
        placement = sampling_placement(o.num_gpus_per_worker, o.workers, device=o.device,
                                       model_bytes=len(ref.weights), blocks=input_blocks(len(plan.todo), o.batch_size))
        progress(f"sampling on {placement.device}: {placement.min_actors}–{placement.max_actors} actors")
        statuses, more = _run(ref, chosen, layout, o, plan.todo, output_uri, fidelity, placement, record,
                              progress, examples)
        reasons.update(more)
    files = manifest.compact(output_uri)
    failed = {r: n for r, n in reasons.items() if r in bucket.FAILED}
    refused = reasons[manifest.REFUSED] + counts["refused_before"]
    summary = {
        "model": ref.pinned, "model_name": ref.name, "model_version": ref.version, **chosen.record(),
        "input": input_uri, "output": output_uri, "format": o.fmt, "samples": o.samples, "seed": o.seed,
        "tile": tile_px, "overlap": overlap_px, "listed": counts["listed"], "done": statuses["done"],
        "skipped": counts["skipped_done"], "stale": counts["stale"], "redone_stale": counts["redone_stale"],
        "changed": counts["changed"], "touched": counts["touched"], "retried": counts["retried"],
        "skipped_rejected": counts["skipped_rejected"],
        "rejected": sum(reasons.values()) - sum(failed.values()),
        "rejected_by_reason": dict(sorted((r, n) for r, n in reasons.items() if r not in failed)),
        "failed": sum(failed.values()), "failed_by_reason": dict(sorted(failed.items())),
        **fidelity.record(), "refused": refused,
        "refused_message": _refused_message(fidelity, reasons[manifest.REFUSED], counts["refused_before"],
                                            examples.get(manifest.REFUSED)) if refused else "",
        "placement": asdict(placement) if placement else None, "manifest_files": files,
        "elapsed_s": round(time.perf_counter() - started, 3), "finished_at": manifest.now(),
    }
    storage.write_bytes(storage.join(output_uri, SUMMARY_NAME), json.dumps(summary, indent=2).encode())
    return summary


def _check(o: UpscaleOptions) -> None:
    if o.samples < 1 or o.batch_size < 1:
        raise ValueError("--samples and --batch-size must be ≥ 1")
    if o.tile is not None and o.tile < 1:
        raise ValueError(f"--tile {o.tile}: must be ≥ 1")
    if o.max_batch_pixels is not None and o.max_batch_pixels < 1:
        raise ValueError(f"--max-batch-pixels {o.max_batch_pixels}: must be ≥ 1")


def _refused_message(fidelity: Fidelity, now: int, before: int, example: str | None) -> str:
    """The job's one error line for inputs the chosen output cannot hold (would_lose)."""
    what = f"{now + before} input(s) hold what --format {fidelity.format} cannot"
    if before:
        what += f" ({before} refused by an earlier run under the same --format and --fallback)"
    example = f" (first: {example})" if example else ""
    return (f"{what}{example}; they were rejected as would_lose (OUTPUT/_rejects), the rest written: "
            f"--format png or tiff keeps them, --fallback convert writes them converted")


def _run(ref: ModelRef, chosen: Sampling, layout: Layout, o: UpscaleOptions, todo: list[dict[str, Any]],
         output: str, fidelity: Fidelity, placement: Placement, record: dict[str, Any],
         progress: Callable[[str], None], examples: dict[str, str]) -> tuple[Counter, Counter]:
    """Stream `todo` through the actors; then the inputs lost with their batch, each alone; then
    reject what is still lost (`crashed`) and delete outputs that no manifest row lists."""
    import ray

    model = ray.put((ref.config_json, ref.weights))
    seen: dict[str, tuple[str, str]] = {}  # source → (status, reason): once each, however often it came back
    said: Counter[str] = Counter()  # reasons printed so far
    _stream(model, ref, chosen, layout, o, todo, output, fidelity, placement, record, progress, seen, said, examples)
    lost = [item for item in todo if item["source"] not in seen]
    isolate = len(lost) <= max(ISOLATE_MAX, len(todo) // 4)
    if lost and isolate:
        progress(f"{len(lost)} input(s) came back from no batch (their actor or its node died, or a task failed "
                 f"after its retries): sampling each alone")
        alone = sampling_placement(o.num_gpus_per_worker, o.workers, device=o.device,  # on the nodes left now
                                   model_bytes=len(ref.weights), blocks=len(lost))
        _stream(model, ref, chosen, layout, o, lost, output, fidelity, alone, record, progress, seen, said, examples,
                alone=True)
        lost = [item for item in todo if item["source"] not in seen]
    if lost:
        detail = (f"no result in its batch nor alone: the process sampling or writing it died each time (out of "
                  f"memory? a crash? a lost node?); actors restart ≤ {ACTOR_RESTARTS} times, tasks retry "
                  f"≤ {TASK_MAX_RETRIES}" if isolate else
                  f"lost with its batch, one of {len(lost)} of {len(todo)} (too many to retry one by one: is a "
                  f"service the job needs down?)")
        rejects = [manifest.reject_row(item["source"], "crashed", detail, item["input_bytes"],
                                       item["input_fingerprint"]) for item in lost]
        manifest.write_parts(output, [], rejects)
        for item in lost:
            seen[item["source"]] = ("failed", "crashed")
            _report(progress, said, item["source"], "crashed", "crashed")
    _sweep(output, [item for item in todo if seen[item["source"]][0] == "failed"], fidelity.format, o.samples)
    statuses = Counter(status for status, _ in seen.values())
    reasons = Counter(reason for _, reason in seen.values() if reason)
    return statuses, reasons


def _stream(model, ref: ModelRef, chosen: Sampling, layout: Layout, o: UpscaleOptions, todo: list[dict[str, Any]],
            output: str, fidelity: Fidelity, placement: Placement, record: dict[str, Any],
            progress: Callable[[str], None], seen: dict[str, tuple[str, str]], said: Counter,
            examples: dict[str, str], alone: bool = False) -> None:
    """One pass of the Ray Data pipeline over `todo`; fills `seen`. A block whose task fails after
    its retries is dropped (the pass goes on); its inputs are simply not in `seen`. `alone`: each
    input in its own block, and each actor running one block at a time (an actor that dies then
    loses that input alone, not the next one queued behind it)."""
    import ray.data

    batch = layout.batch_size
    options = {"samples": o.samples, "seed": o.seed, "batch_size": batch, "max_batch_pixels": layout.max_batch_pixels,
               "tile": layout.tile, "overlap": layout.overlap, "device": placement.device,
               "threads": placement.threads, "gpus": placement.gpus, "memory_bytes": placement.memory_bytes,
               "kill_actor_on": o.kill_actor_on}
    per_block = 1 if alone else batch
    dataset = (
        ray.data.from_items(todo, override_num_blocks=input_blocks(len(todo), per_block))
        .map_batches(bucket.decode_batch, fn_kwargs={"max_output_pixels": o.max_output_pixels,
                                                     "scale": ref.config().scale, "fidelity": fidelity},
                     batch_size=per_block, batch_format="numpy", **placement.decode_kwargs())
        .map_batches(Upscaler, fn_constructor_kwargs={"model": [model], "sampling": asdict(chosen),
                                                         "options": options},
                     batch_size=per_block, batch_format="numpy", **placement.map_kwargs(alone))
        .map_batches(bucket.write_batch, fn_kwargs={"output": output, "fmt": fidelity.format, "record": record,
                                                    "max_output_pixels": o.max_output_pixels, "fidelity": fidelity},
                     batch_size=None, batch_format="numpy", **placement.write_kwargs())
    )
    dataset.context.max_errored_blocks = -1  # a lost block must not end the job: the driver retries its inputs
    shown = time.perf_counter()
    for rows in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for source, status, reason, detail in zip(rows["source"], rows["status"], rows["reason"], rows["detail"]):
            source, status, reason, detail = str(source), str(status), str(reason), str(detail)
            if source in seen:
                continue
            seen[source] = (status, reason)
            if reason:
                examples.setdefault(reason, f"{source}: {detail}")
                _report(progress, said, source, f"{reason}: {detail}" if reason == manifest.REFUSED else reason,
                        reason)
        if time.perf_counter() - shown > 10:
            here = [seen[item["source"]][0] for item in todo if item["source"] in seen]  # this pass's inputs
            progress(f"{len(here)}/{len(todo)} processed ({here.count('done')} written, "
                     f"{here.count('failed')} failed)")
            shown = time.perf_counter()


def _report(progress: Callable[[str], None], said: Counter, source: str, text: str, reason: str) -> None:
    said[reason] += 1
    if said[reason] <= 3:  # the first few of each reason; the summary counts them all
        progress(f"{'failed' if reason in bucket.FAILED else 'rejected'} {source}: {text}")


def _sweep(output: str, items: list[dict[str, Any]], fmt: str, samples: int) -> None:
    """Delete outputs of inputs that failed (a task that died between its PUTs and its manifest
    part, a row whose second sample could not be written) unless a manifest row lists them (an
    earlier run's output stays)."""
    if not items:
        return
    listed = set(manifest.read_table(output, manifest.MANIFEST_DIR, ["output"]).column("output").to_pylist())
    for item in items:
        try:
            names = output_names(item["relpath"], fmt, samples)
        except UnsafeName:
            continue
        for name in names:
            if name not in listed and storage.exists(storage.join(output, name)):
                storage.remove(storage.join(output, name))


def _listed_style(uri: str) -> str:
    """`uri` as `storage.list_files` spells its files (absolute local paths)."""
    return os.path.abspath(storage.resolve(uri)[1]) if storage.protocol(uri) in ("file", "local") else uri


def _inside(output: str, input_uri: str) -> bool:
    """Whether the output prefix lies inside the input (then its files are not inputs)."""
    if storage.protocol(output) != storage.protocol(input_uri):
        return False
    out, inp = storage.resolve(output)[1].rstrip("/"), storage.resolve(input_uri)[1].rstrip("/")
    if storage.protocol(output) in ("file", "local"):
        out, inp = os.path.abspath(out), os.path.abspath(inp)
    return out == inp or out.startswith(inp + "/")
