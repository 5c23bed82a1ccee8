"""Images/s of the Ray Data upscaler (jobs/upscale.py's code path) against a bare loop.

Both sides run the same model (`tiny` by default, a model directory with random weights — speed
does not depend on the weights), the same sampler, steps and batch size, on the same LR PNG files,
in the same run, and both read, decode, sample, encode and write every image:

- bare loop: one process, torch with all the machine's cores; read → decode → `super_resolve`
  with one generator per image (as the upscaler) → PNG → atomic write, batch after batch;
- Ray Data: `pipelines.upscale.upscale` on a local Ray with the machine's CPUs, timed from the
  call to its return (planning, actor start-up and model load, the whole stream, the manifest),
  once per `--workers` value (0 = the job's default placement).

    python benchmarks/bench_upscale.py --images 96 --steps 30 --batch-size 8 --workers 0 1

Prints both rates and their ratio (issue target: ≥ 0.85× on 2 CPU cores). Ray is started before
timing; each side runs twice and the faster run counts (a shared machine is noisy).
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
    from pipelines import storage, upscale_io

    started = time.perf_counter()
    model = load_model(model_dir)
    schedule = model.inference_schedule(steps)
    for start in range(0, len(paths), batch):
        chunk = paths[start:start + batch]
        images = [np.asarray(decode_image(p.read_bytes())) for p in chunk]
        lr = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        generators = [torch.Generator().manual_seed(upscale_io.image_seed(0, p.name, 0)) for p in chunk]
        sr = model.super_resolve(lr, sampler="ddpm", schedule=schedule, generator=generators)
        for p, pixels in zip(chunk, to_uint8_batch(sr[:, 0])):
            storage.write_bytes(str(output / p.name), encode_png(Image.fromarray(pixels)))
    return time.perf_counter() - started


def ray_pipeline(model_dir: Path, inputs: Path, output: Path, steps: int, batch: int,
                 workers: int | None) -> float:
    from pipelines.upscale import upscale

    started = time.perf_counter()
    summary = upscale(str(model_dir), str(inputs), str(output), steps=steps, sampler="ddpm",
                      batch_size=batch, workers=workers, progress=lambda _: None)
    elapsed = time.perf_counter() - started
    assert summary["done"] == summary["listed"], summary
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0],
                        help="sampling actors to try (0 = jobs/upscale.py's default)")
    args = parser.parse_args()
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
