"""Images/s of the Ray Data upscaler (jobs/upscale.py's code path) against a bare loop, and the
time to plan a run against a large manifest, uncompacted against compacted.

Both sides run the same model (`tiny` by default, a model directory with random weights — speed
does not depend on the weights), the same sampler, steps and batch size, on the same LR PNG files,
in the same run, and both read, decode, sample, encode and write every image:

- bare loop: one process, torch with all the machine's cores; read → decode → `super_resolve`
  with one generator per image (as the upscaler) → PNG → atomic write, batch after batch;
- Ray Data: `pipelines.infer.upscale.upscale` on a local Ray with the machine's CPUs, timed from the
  call to its return (planning, actor start-up and model load, the whole stream, the manifest),
  once per `--workers` value (0 = the job's default placement).

    python benchmarks/bench_upscale.py --images 96 --steps 30 --batch-size 8 --workers 0 1

Prints both rates and their ratio (issue target: ≥ 0.85× on 2 CPU cores). Ray is started before
timing; each side runs twice and the faster run counts (a shared machine is noisy).

Planning (`--plan-rows N`, 0 to skip; `--plan-only` skips the sampling part): a manifest of N rows
written as the write tasks write it — one part per batch of `--rows-per-part` — then the same rows
after `pipelines.infer.manifest.compact`; each timed as `manifest.plan` of N listed inputs (all
done), the faster of `--rounds`.

    python benchmarks/bench_upscale.py --plan-only --plan-rows 100000 --rows-per-part 8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data as skdata  # noqa: E402

from sr3model.config import preset  # noqa: E402
from sr3model.imageio import decode_image, encode_png, to_uint8_batch  # noqa: E402
from sr3model.model import SR3  # noqa: E402
from sr3model.weights import load_model, save_model  # noqa: E402


def write_inputs(folder: Path, count: int, size: int) -> list[Path]:
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        y, x = (int(rng.integers(0, photo.shape[k] - size)) for k in (0, 1))
        paths.append(folder / f"img{i:04d}.png")
        Image.fromarray(photo[y:y + size, x:x + size]).save(paths[-1])
    return paths


def bare_loop(model_dir: Path, paths: list[Path], output: Path, steps: int, batch: int) -> float:
    from pipelines import storage
    from pipelines.sampling import image_seed

    started = time.perf_counter()
    model = load_model(model_dir)
    schedule = model.inference_schedule(steps)
    for start in range(0, len(paths), batch):
        chunk = paths[start:start + batch]
        images = [np.asarray(decode_image(p.read_bytes())) for p in chunk]
        lr = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        generators = [torch.Generator().manual_seed(image_seed(0, p.name, 0)) for p in chunk]
        sr = model.super_resolve(lr, sampler="ddpm", schedule=schedule, generator=generators)
        for p, pixels in zip(chunk, to_uint8_batch(sr[:, 0])):
            storage.write_bytes(str(output / p.name), encode_png(Image.fromarray(pixels)))
    return time.perf_counter() - started


def ray_pipeline(model_dir: Path, inputs: Path, output: Path, steps: int, batch: int,
                 workers: int | None) -> float:
    from pipelines.infer.upscale import upscale

    started = time.perf_counter()
    summary = upscale(str(model_dir), str(inputs), str(output), steps=steps, sampler="ddpm",
                      batch_size=batch, workers=workers, progress=lambda _: None)
    elapsed = time.perf_counter() - started
    assert summary["done"] == summary["listed"], summary
    return elapsed


def planning(root: Path, rows: int, per_part: int, rounds: int) -> tuple[int, float, int, float]:
    """(files, seconds) to plan `rows` done inputs: uncompacted parts, then compacted."""
    from pipelines import storage
    from pipelines.infer import manifest

    output = str(root / "plan-out")
    record = {"model_uri": "models:/m/1", "model_name": "m", "model_version": "1", "model_digest": "d",
              "sampler": "ddpm", "steps": 100, "schedule": "0.0001,0.1", "schedule_source": "config",
              "run_seed": 0, "tile": 16, "overlap": 4}
    stamp = manifest.now()
    names = [f"a/img{i:07d}.png" for i in range(rows)]
    done = [{**record, "source": f"/in/{n}", "output": n, "sample": 0, "seed": i, "input_width": 16,
             "input_height": 16, "output_width": 64, "output_height": 64, "input_bytes": 1000,
             "input_fingerprint": "1000:mtime=1", "tiles": 1, "batch_pixels": 4096, "seconds": 0.1,
             "finished_at": stamp} for i, n in enumerate(names)]
    for start in range(0, rows, per_part):
        manifest.write_parts(output, done[start:start + per_part], [])
    listed = [storage.ListedFile(f"/in/{n}", "/in", n, 1000, "mtime=1") for n in names]
    current = manifest.Current(record, 8192 * 8192)

    def timed() -> float:
        best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            plan = manifest.plan(listed, output, "png", 1, current)
            best = min(best, time.perf_counter() - started)
            assert plan.counts["skipped_done"] == rows and not plan.todo, plan.counts
        return best

    parts = len(manifest.parquet_files(output, manifest.MANIFEST_DIR))
    before = timed()
    files = manifest.compact(output)[manifest.MANIFEST_DIR]
    return parts, before, files, timed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0],
                        help="sampling actors to try (0 = jobs/upscale.py's default)")
    parser.add_argument("--plan-rows", type=int, default=100_000, help="manifest rows to plan against (0: skip)")
    parser.add_argument("--rows-per-part", type=int, default=8, help="rows per uncompacted manifest part")
    parser.add_argument("--plan-only", action="store_true", help="only the planning benchmark")
    args = parser.parse_args()
    if args.plan_rows:
        with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
            parts, before, files, after = planning(Path(tmp), args.plan_rows, args.rows_per_part, args.rounds)
        print(f"planning against {args.plan_rows} manifest rows (best of {args.rounds}):")
        print("| manifest | files | plan seconds | vs uncompacted |\n| --- | --- | --- | --- |")
        print(f"| uncompacted ({args.rows_per_part} rows per part) | {parts} | {before:.2f} | 1.00× |")
        print(f"| compacted | {files} | {after:.2f} | {before / after:.1f}× faster |")
    if args.plan_only:
        return
    cpus = os.cpu_count() or 1
    torch.set_num_threads(cpus)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    with tempfile.TemporaryDirectory(prefix="bench-upscale-") as tmp:
        root = Path(tmp)
        model = SR3(preset(args.preset))
        save_model(root / "model", model)
        paths = write_inputs(root / "in", args.images, model.config.lr_size)
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        bare: list[float] = []
        piped: dict[int, list[float]] = {w: [] for w in args.workers}
        for r in range(args.rounds):
            (root / f"bare{r}").mkdir()
            bare.append(bare_loop(root / "model", paths, root / f"bare{r}", args.steps, args.batch_size))
            line = f"round {r}: bare {args.images / bare[-1]:.2f} img/s"
            for w in args.workers:
                piped[w].append(ray_pipeline(root / "model", root / "in", root / f"ray{r}-{w}", args.steps,
                                             args.batch_size, w or None))
                line += f", Ray Data ({_label(w)}) {args.images / piped[w][-1]:.2f} img/s"
            print(line, flush=True)
        ray.shutdown()
    best_bare = args.images / min(bare)
    print(f"\n{args.preset}, {args.images} images {model.config.lr_size}→{model.config.hr_size}, DDPM {args.steps} "
          f"steps, batch {args.batch_size}, {cpus} CPUs (torch {torch.get_num_threads()} threads in the bare loop)")
    print("| loop | images/s (best) | vs bare |\n| --- | --- | --- |")
    print(f"| bare single-process loop | {best_bare:.2f} | 1.00× |")
    for w in args.workers:
        best = args.images / min(piped[w])
        print(f"| Ray Data upscaler, {_label(w)} | {best:.2f} | {best / best_bare:.2f}× |")
    print("target ≥ 0.85× (issue 5)")


def _label(workers: int) -> str:
    return "default actors" if workers == 0 else f"{workers} actor{'s' if workers > 1 else ''}"


if __name__ == "__main__":
    main()
