"""`jobs/study.py create`: val pairs + models → a study folder on any storage URI.

    PAIRS/val ─seeded choice of N test + C catch pairs─> STUDY/_staging-*/lr/NNNNN.png (test LR)
      ─pipelines.infer.upscale.upscale (Ray Data actor pool), once per model / model baseline─>
      STUDY/_staging-*/out-mK/NNNNN.png        bicubic baseline: sr3model.resample.upsample
    every image re-encoded (pipelines.study.images) under an opaque name ─> STUDY/images/*.png
    STUDY/study.json (written last: protocol, models, images, plan); the staging folder removed

A study is created once: an existing `study.json` is an error (its answers refer to its names).
"""

from __future__ import annotations

import json
import random
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import storage
from pipelines.pairs.store import read_part
from pipelines.runtime import SamplingOptions, init_ray
from pipelines.study import images as I
from pipelines.study.plan import FORMAT_VERSION, QUESTIONS, STUDY_FILE, Protocol, Study, make_plan

BICUBIC = "bicubic"
Say = Callable[[str], None]


@dataclass(frozen=True)
class StudyOptions(SamplingOptions):
    """What `jobs/study.py create` lets a user choose (field names are its flags): how the models are
    sampled (`SamplingOptions`: None = each model's own) and the protocol (`plan.Protocol`)."""

    baselines: tuple[str, ...] = ()  # bicubic, or model URIs sampled like any model
    task: int = 1
    images: int = 100
    per_rater: int = 50
    catch: int = 3
    raters: int = 50
    display_seconds: float = 3.0
    seed: int = 0

    @property
    def protocol(self) -> Protocol:
        return Protocol(self.task, self.images, self.per_rater, self.catch, self.raters, self.display_seconds,
                        self.seed)


def create_study(models: Sequence[str], pairs: str, study: str, options: StudyOptions | None = None, *,
                 progress: Say = print, **fields: Any) -> Study:
    """Sample every model's output for the chosen val pairs and write the study (module docstring).
    `fields` override `options`. The protocol is checked before Ray is connected (`ray_address`)."""
    o = replace(options or StudyOptions(), **fields)
    protocol, baselines = o.protocol, o.baselines
    protocol.check(len(models) + len(baselines))
    if any(uri != BICUBIC for uri in (*models, *baselines)):
        init_ray(o.ray_address)
    if storage.exists(storage.join(study, STUDY_FILE)):
        raise ValueError(f"{study} already holds a study ({STUDY_FILE}); choose a new --study URI")
    entries = [("model", uri) for uri in models] + [("baseline", uri) for uri in baselines]
    protocol.check(len(entries))
    rows = sorted(read_part(pairs, "val", columns=["key", "source", "hr", "lr"]).to_pylist(), key=lambda r: r["key"])
    protocol.check(len(entries), len(rows))
    picked = random.Random(protocol.seed).sample(range(len(rows)), protocol.images + protocol.catch)
    chosen = [rows[i] for i in picked]  # the first `images` are test images, the rest catch images
    hr = [I.decode(row["hr"]) for row in chosen]
    lr = [I.decode(row["lr"]) for row in chosen]
    if len({a.shape for a in hr}) != 1 or len({a.shape for a in lr}) != 1:
        raise ValueError(f"{pairs}: the chosen val pairs differ in size; build one size per study")
    progress(f"{protocol.images} test + {protocol.catch} catch pairs of {len(rows)} val pairs in {pairs} "
             f"({lr[0].shape[1]}→{hr[0].shape[1]} px); {len(entries)} model(s) to sample")

    staging = storage.join(study, f"_staging-{uuid.uuid4().hex[:12]}")
    try:
        test_lr = storage.join(staging, "lr")
        for i in range(protocol.images):
            storage.write_bytes(storage.join(test_lr, f"{i:05d}.png"), I.encode(lr[i]))
        outputs: dict[str, list[np.ndarray]] = {}
        described: dict[str, dict[str, Any]] = {}
        for k, (kind, uri) in enumerate(entries):
            model_id = f"m{k}"
            if uri == BICUBIC:
                outputs[model_id] = _bicubic(lr[:protocol.images], hr[0].shape[:2])
                described[model_id] = {"kind": kind, "label": BICUBIC, "uri": BICUBIC, "model_name": "",
                                       "model_version": ""}
            else:
                out = storage.join(staging, f"out-{model_id}")
                progress(f"{model_id}: sampling {uri} through pipelines.infer.upscale")
                summary = _upscale(uri, test_lr, out, steps=o.steps, sampler=o.sampler, schedule=o.schedule,
                                   seed=protocol.seed, batch_size=o.batch_size, workers=o.workers,
                                   consistency=o.consistency, device=o.device,
                                   num_gpus_per_worker=o.num_gpus_per_worker, tracking_uri=o.tracking_uri,
                                   progress=lambda m: progress(f"{model_id}: {m}"))
                if summary["done"] != protocol.images or summary["rejected"]:
                    raise ValueError(f"{uri}: sampled {summary['done']} of {protocol.images} images "
                                     f"(rejected: {summary['rejected_by_reason']})")
                outputs[model_id] = [I.decode(storage.read_bytes(storage.join(out, f"{i:05d}.png")))
                                     for i in range(protocol.images)]
                described[model_id] = {"kind": kind, "label": _label(summary, uri), "uri": summary["model"],
                                       "given": uri, **{key: summary[key] or "" for key in (
                                           "model_name", "model_version", "sampler", "steps", "schedule",
                                           "schedule_source")}, "consistency": bool(summary.get("consistency"))}
            shapes = {a.shape for a in outputs[model_id]}
            if shapes != {hr[0].shape}:
                raise ValueError(f"{uri}: outputs of shape {sorted(shapes)}, the pairs' HR is {hr[0].shape}")
        _unique_labels(described)
        doc = _document(protocol, pairs, chosen, hr, lr, outputs, described, study)
        storage.write_bytes(storage.join(study, STUDY_FILE), json.dumps(doc, indent=1).encode())
    finally:
        storage.remove(staging)
    created = Study(study, doc)
    progress(f"study {doc['study_id']} written to {study} ({len(created.all_names())} image files, "
             f"{protocol.raters} planned rater slots of {created.trials_per_rater} trials)")
    return created


def _upscale(*args, **kwargs) -> dict[str, Any]:
    from pipelines.infer.upscale import upscale

    return upscale(*args, **kwargs)


def _bicubic(lr: list[np.ndarray], size: tuple[int, int]) -> list[np.ndarray]:
    """The bicubic baseline: the conditioning image x itself (pipelines.eval.bicubic)."""
    from pipelines.eval.data import bicubic
    from sr3model.imageio import to_tensor_batch, to_uint8_batch

    return list(to_uint8_batch(bicubic(to_tensor_batch(lr), tuple(size))[:, 0]))


def _label(summary: dict[str, Any], uri: str) -> str:
    if summary.get("model_name"):
        return f"{summary['model_name']} v{summary['model_version']}"
    return Path(uri.rstrip("/")).name or uri


def _unique_labels(described: dict[str, dict[str, Any]]) -> None:
    seen: dict[str, int] = {}
    for entry in described.values():
        base = entry["label"]
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            entry["label"] = f"{base} #{seen[base]}"


def _document(protocol: Protocol, pairs: str, chosen: list[dict], hr: list[np.ndarray], lr: list[np.ndarray],
              outputs: dict[str, list[np.ndarray]], described: dict[str, dict[str, Any]], study: str) -> dict:
    """Write every image under an opaque name (16 writes at a time: object stores answer in
    parallel); return the study.json document."""
    pending: dict[str, np.ndarray] = {}

    def put(rgb: np.ndarray) -> str:
        name = I.opaque_name()
        pending[name] = rgb
        return name

    images = []
    for i, row in enumerate(chosen):
        catch = i >= protocol.images
        images.append({
            "key": row["key"], "source": row["source"], "catch": catch, "real": put(hr[i]), "lr": put(lr[i]),
            "outputs": {} if catch else {m: put(outputs[m][i]) for m in described},
            "degraded": put(I.degrade(hr[i])) if catch else None,
        })
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: storage.write_bytes(storage.join(study, item[0]), I.encode(item[1])),
                      pending.items()))
    return {
        "format": FORMAT_VERSION, "study_id": secrets.token_hex(8),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pairs": pairs, "protocol": asdict(protocol),
        "question": QUESTIONS[protocol.task], "hr_shape": list(hr[0].shape), "lr_shape": list(lr[0].shape),
        "models": described, "images": images, "plan": make_plan(protocol, list(described)),
    }
