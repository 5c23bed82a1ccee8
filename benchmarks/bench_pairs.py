"""Pair building: the Ray Data builder against plain single-process Pillow loops, same files, same run.

    python benchmarks/bench_pairs.py [--count 320] [--rounds 3] [--recipe imagenet --hr-size 256 --scale 4]

Inputs: `--count` JPEGs of about 1-4 Mpx made once from the photos bundled in skimage.data
(random resizes, crops, flips, rotations), cached in `--cache-dir`. Four timings on the same files,
interleaved over `--rounds` rounds (medians reported):

- plain loop:     Image.open → convert RGB → recipe crop/resize → bicubic LR → PNG (Pillow
                  defaults: full-size decode, compress level 6), one process: what one writes first.
- same-ops loop:  `pipelines.pairs.transforms.rows_for_file` in one process: exactly the builder's
                  per-file work (JPEG draft decode, PNG level 1), without Ray.
- process pool:   the same-ops loop split over one process per core (multiprocessing): the
                  parallel ceiling this machine offers right now (other users' load lowers it).
- Ray builder:    `pipelines.pairs.build.build_pairs` on a local Ray with every core (after one warm-up
                  run that starts the workers), including listing, Parquet writing and the commit.
                  Ray workers run at niceness 15 by default; RAY_worker_niceness=0 here so that
                  they compete for a shared machine on the same terms as the loops.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from pipelines.pairs.transforms import PairSpec, hr_images, rows_for_file  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "cat")


def make_inputs(directory: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` JPEG variants of skimage.data photos, 1-4 Mpx, written once."""
    from skimage import data

    paths = [directory / f"photo_{index:04d}.jpg" for index in range(count)]
    if all(path.exists() for path in paths):
        return paths
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]
    for index, path in enumerate(paths):
        image = sources[index % len(sources)]
        left, top = (int(v) for v in rng.integers(0, [image.width // 8 + 1, image.height // 8 + 1]))
        image = image.crop((left, top, image.width - left // 2, image.height - top // 2))
        megapixels = rng.uniform(1.0, 4.0)
        aspect = rng.uniform(0.66, 1.5)
        width = int((megapixels * 1e6 * aspect) ** 0.5)
        image = image.resize((width, int(megapixels * 1e6 / width)), Image.BICUBIC)
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        if rng.random() < 0.25:
            image = image.transpose(Image.Transpose.ROTATE_90)
        image.save(path, quality=int(rng.integers(85, 96)))
    return paths


def plain_loop(paths: list[Path], spec: PairSpec) -> float:
    """The straightforward single-process Pillow loop; returns images/s."""
    started = time.perf_counter()
    for path in paths:
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        for _, hr in hr_images(image, path.name, spec):
            lr = hr.resize((spec.hr_size // spec.scale,) * 2, Image.BICUBIC)
            for picture in (hr, lr):
                picture.save(io.BytesIO(), format="PNG")
    return len(paths) / (time.perf_counter() - started)


def same_ops_loop(paths: list[Path], spec: PairSpec) -> float:
    """The builder's per-file function in one process; returns images/s."""
    started = time.perf_counter()
    for path in paths:
        rows = rows_for_file(path.name, str(path), path.read_bytes(), None, spec)
        assert rows[0]["reason"] is None, rows[0]["detail"]
    return len(paths) / (time.perf_counter() - started)


def pool_loop(paths: list[Path], spec: PairSpec, processes: int) -> float:
    """same_ops_loop over `processes` interleaved shares of the files; returns images/s."""
    shares = [(paths[index::processes], spec) for index in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(abs, range(processes))  # start the processes before timing, as for Ray
        started = time.perf_counter()
        pool.starmap(same_ops_loop, shares)
        return len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=320)
    parser.add_argument("--recipe", default="imagenet", choices=("faces", "imagenet", "patches"))
    parser.add_argument("--hr-size", type=int, default=256)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--patches-per-image", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "sr3-bench-pairs")
    args = parser.parse_args()
    if args.recipe == "faces":
        parser.error("the generated photos are not square: use imagenet or patches")
    spec = PairSpec(args.recipe, args.hr_size, args.scale, patches_per_image=args.patches_per_image)

    inputs = args.cache_dir / f"jpegs-{args.count}"
    started = time.perf_counter()
    paths = make_inputs(inputs, args.count)
    megapixels = np.mean([np.prod(Image.open(path).size) for path in paths]) / 1e6
    print(f"{len(paths)} JPEGs, mean {megapixels:.1f} Mpx, in {inputs} ({time.perf_counter() - started:.1f}s)")
    print(f"recipe {spec.recipe}, HR {spec.hr_size}, scale {spec.scale}, {os.cpu_count()} CPUs")

    import ray

    from pipelines.pairs.build import build_pairs

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    options = dict(patches_per_image=spec.patches_per_image, progress=lambda message: None)
    with tempfile.TemporaryDirectory() as output:

        def builder() -> float:
            summary = build_pairs([str(inputs)], output, spec.recipe, spec.hr_size, spec.scale, **options)
            assert summary["rejected"] == 0 and summary["listed"] == len(paths), summary
            return summary["files_per_s"]

        warm_up = build_pairs([str(inputs)], output, spec.recipe, spec.hr_size, spec.scale, limit=32, **options)
        print(f"Ray warm-up (starts the workers) on 32 files: {warm_up['elapsed_s']:.1f}s")
        measures = {
            "plain Pillow loop": lambda: plain_loop(paths, spec),
            "same-ops loop": lambda: same_ops_loop(paths, spec),
            "process pool": lambda: pool_loop(paths, spec, os.cpu_count() or 1),
            "Ray Data builder": builder,
        }
        runs: dict[str, list[float]] = {name: [] for name in measures}
        for index in range(args.rounds):  # interleaved, so that other users' load hits all alike
            for name, measure in measures.items():
                runs[name].append(measure())
            print(f"round {index + 1}: " + ", ".join(f"{name} {runs[name][-1]:.1f}" for name in runs)
                  + f" images/s (load average {os.getloadavg()[0]:.1f})")
    ray.shutdown()

    median = {name: float(np.median(values)) for name, values in runs.items()}
    for name, value in median.items():
        print(f"{name + ':':19s} {value:7.1f} images/s (median of {args.rounds})")
    builder_rate = median["Ray Data builder"]
    print(f"builder / plain loop    = {builder_rate / median['plain Pillow loop']:.2f}x")
    print(f"builder / same-ops loop = {builder_rate / median['same-ops loop']:.2f}x  (parallelism alone)")
    print(f"pool / same-ops loop    = {median['process pool'] / median['same-ops loop']:.2f}x  (the machine's ceiling)")

if __name__ == "__main__":
    main()
