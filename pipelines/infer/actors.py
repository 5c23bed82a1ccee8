"""The sampling actors of Ray Data's actor pools: each loads its model(s) once, from bytes in the
object store, and samples through `pipelines.sampling` (one path for every stage).

    Upscaler     decoded bucket rows → sampled rows for `bucket.write_batch` (jobs/upscale.py).
                 A generator: each finished sampling call yields the rows it completed, so an
                 actor holds at most one capped batch of outputs; a failed image comes out as a
                 row with its reason (out_of_memory | sample_failed) and the others go on.
                 An input whose output alone would need more than the actor's memory budget
                 (`pipelines.sampling.memory_budget`: its share of its node's memory, or of its
                 GPU) is rejected as `too_large` before sampling, its limit recorded.

The evaluation's scoring actor (`PairScorer`) lives with the evaluation (`pipelines.eval.scoring`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from pipelines.infer.placement import setup_actor
from pipelines.sampling import (BYTES_PER_OUTPUT_PIXEL, Layout, Sampling, budget_max_batch_pixels, image_seed,
                                largest_output_pixels, memory_budget, quantise, sample_batches)


class Upscaler:
    """Actor of jobs/upscale.py: one model; decoded rows (any sizes) → rows of sampled images."""

    def __init__(self, model: list, sampling: dict[str, Any], options: dict[str, Any]) -> None:
        import ray

        from sr3model.weights import load_model_bytes

        config_json, weights = ray.get(model[0])
        self.device = setup_actor(options["device"], options["threads"])
        self.model = load_model_bytes(config_json, weights, device=self.device)
        self.sampling = Sampling(**sampling)
        self.schedule = self.sampling.schedule(self.model)
        self.samples, self.seed = options["samples"], options["seed"]
        self.budget = memory_budget(self.device, options.get("gpus") or 1.0, options.get("memory_bytes") or 0)
        self.largest = largest_output_pixels(self.budget)
        self.layout = Layout(options["batch_size"],
                             options["max_batch_pixels"] or budget_max_batch_pixels(self.budget),
                             options["tile"], options["overlap"])
        self.kill_on = options.get("kill_actor_on")  # test hook: (relpath, log file)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, list]]:
        keep = [k for k in batch if k != "pixels"]
        rows = len(batch["source"])
        todo = [i for i in range(rows) if not batch["reason"][i]]
        if len(todo) < rows:  # rejected while decoding: straight on to the writer
            yield self._rows(batch, keep, [i for i in range(rows) if batch["reason"][i]], {})
        too_large = self._over_budget(batch, todo)
        if too_large:  # would exhaust this actor's memory: rejected before sampling
            yield self._rows(batch, keep, list(too_large), too_large)
            todo = [i for i in todo if i not in too_large]
        if self.kill_on and any(str(batch["relpath"][i]) == self.kill_on[0] for i in todo):
            _die(self.kill_on[1])
        bits = [int(batch["bits"][i]) if "bits" in batch else 8 for i in todo]  # 16: sampled from their float values
        images = [np.frombuffer(batch["pixels"][i], np.uint16 if b == 16 else np.uint8).reshape(
            int(batch["height"][i]), int(batch["width"][i]), 3) for i, b in zip(todo, bits)]
        names = [str(batch["relpath"][i]) for i in todo]
        found: dict[int, dict[str, Any]] = {j: {"out": [None] * self.samples, "pixels": 0, "seconds": 0.0}
                                            for j in range(len(todo))}
        for sampled in sample_batches(self.model, images, names, sampling=self.sampling, schedule=self.schedule,
                                      samples=self.samples, seed=self.seed, layout=self.layout):
            touched = []
            for u, (j, k) in enumerate(sampled.units):
                state = found[j]
                state["pixels"] = max(state["pixels"], sampled.pixels)
                state["seconds"] += sampled.seconds / len(sampled.units)
                if sampled.outputs is None:
                    state.setdefault("reason", (sampled.reason, sampled.detail))
                state["out"][k] = False if sampled.outputs is None else quantise(sampled.outputs[u:u + 1], bits[j])[0]
                touched.append(j)
            complete = [j for j in dict.fromkeys(touched) if all(o is not None for o in found[j]["out"])]
            if complete:
                yield self._rows(batch, keep, [todo[j] for j in complete], {todo[j]: found.pop(j) for j in complete})

    def _over_budget(self, batch, todo: list[int]) -> dict[int, dict[str, Any]]:
        """Rows whose one output would need more than ALONE_FRACTION of the actor's budget."""
        scale, found = self.model.config.scale, {}
        for i in todo:
            h, w = int(batch["height"][i]), int(batch["width"][i])
            pixels = h * w * scale * scale
            if pixels > self.largest:
                found[i] = {"reason": ("too_large", f"{w}×{h} → {w * scale}×{h * scale}: sampling it alone needs "
                                                    f"~{pixels * BYTES_PER_OUTPUT_PIXEL / 2 ** 30:.1f} GiB, more than "
                                                    f"this actor's memory budget allows "
                                                    f"({self.budget / 2 ** 30:.1f} GiB; {self.largest} output pixels)"),
                            "limit": self.largest}
        return found

    def _rows(self, batch, keep: list[str], indices: list[int], found: dict[int, dict[str, Any]]) -> dict[str, list]:
        from sr3model.tiling import tile_starts

        out: dict[str, list] = {k: [batch[k][i] for i in indices] for k in keep}
        extra = {k: [] for k in ("out", "seeds", "samples", "out_height", "out_width", "tiles", "tiled",
                                 "batch_pixels", "seconds", "limit")}
        tile, overlap = self.layout.tiling(self.model.config)
        scale = self.model.config.scale
        for n, i in enumerate(indices):
            state = found.get(i)
            if state and "reason" in state:
                out["reason"][n], out["detail"][n] = state["reason"]
            if not state or "reason" in state:
                for key, empty in (("out", b""), ("seeds", b""), ("samples", 0), ("out_height", 0),
                                   ("out_width", 0), ("tiles", 0), ("tiled", False), ("batch_pixels", 0),
                                   ("seconds", 0.0), ("limit", (state or {}).get("limit", 0))):
                    extra[key].append(empty)
                continue
            h, w = int(batch["height"][i]), int(batch["width"][i])
            native = (h, w) == (self.model.config.lr_size,) * 2
            tiles = 1 if native else (len(tile_starts(max(h, tile), tile, overlap)) *
                                      len(tile_starts(max(w, tile), tile, overlap)))
            seeds = [image_seed(self.seed, str(batch["relpath"][i]), k) for k in range(self.samples)]
            for key, value in (("out", np.ascontiguousarray(np.stack(state["out"])).tobytes()),
                               ("seeds", np.asarray(seeds, np.int64).tobytes()), ("samples", self.samples),
                               ("out_height", h * scale), ("out_width", w * scale), ("tiles", tiles),
                               ("tiled", not native),
                               ("batch_pixels", state["pixels"]), ("seconds", state["seconds"]), ("limit", 0)):
                extra[key].append(value)
        return {**out, **extra}


def _die(log: str) -> None:
    """Test hook: this actor's process dies by SIGKILL, as the kernel's out-of-memory killer ends
    it (no exception, no clean-up); a line in `log` counts the deaths."""
    import os
    import signal

    with open(log, "a") as handle:
        handle.write(f"killed pid {os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)
