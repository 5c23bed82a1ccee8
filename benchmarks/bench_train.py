"""Training throughput: the Ray Train loop against a bare single-process PyTorch loop, same run;
the loop of #14 against the loop before it; and what one CPU core decodes for a GPU.

    python benchmarks/bench_train.py [--steps 40] [--warmup 10] [--batch-size 8] [--log-every 10] [--rounds 1]
                                     [--skip-ray-train] [--gpu-images-per-s 100] [--decode-pairs 64]

Inputs: 16→64 patch pairs cut by `pipelines.pairs.build.build_pairs` (Ray Data, patches recipe) from
12 photos bundled in skimage.data, in a temp dir; enough (by default) that the timed steps stay in
the first epoch, as they would on a real dataset. Model: the `tiny` preset at global batch
`--batch-size`. Both sides run `--warmup` + `--steps` optimiser steps and time only the last
`--steps` (steady state: start-up, first-step allocation and Ray Data's start are excluded alike),
by the wall clock read after every `--log-every`-th step:

- bare loop:    `sr3model.training.train_step` in this process on the train pairs decoded into
                memory (random batches), EMA and Adam as in training; `time.perf_counter()`.
- Ray Train:    `pipelines.train.train` (what jobs/train.py calls: TorchTrainer, each worker reading
                and decoding its own shuffled batches (pipelines.train.data: a seeded per-epoch
                unit order, a shuffle buffer, prefetch threads), DDP with gloo, MLflow in a temp
                sqlite file, a checkpoint at the end; no validation, no pyfunc logging) with 1 and
                2 workers; the clock is the timestamp of the metrics the loop logs to MLflow every
                `--log-every` steps, so an interval holds the steps, the waits for data, the
                metrics' all-reduce and the MLflow call.

Then the data path alone (`loader_rate`): how many images/s the seeded, shuffled order can feed one
worker, against what the training loop consumed.

New loop vs old loop (`loop_ratio`, in this process, same data, same model init, same batches):
- new: uint8 (B, 3, H, W) host batches → `pipelines.train.loop.to_device` ([-1, 1] on the device),
       `train_step` returning device tensors summed by `loop.Meter`, read every `--log-every` steps;
- old: a faithful copy of the loop before #14 (`old_train_step`): float32 host batches (the old
       `decode_pairs` output), noise levels drawn through `.cpu()`, `float(loss)`, `float(grad_norm)`
       every step, a host-side window of dicts averaged every `--log-every` steps.
Windows of `--log-every` steps alternate old, new, old, new … after one warm-up window each, so
other load on the machine hits both alike; median images/s per loop and their ratio are printed
(target ≥ 1.0×). On a CPU the syncs cost nothing (the "device" is the host): the ratio shows that
the new path is not slower there; what it saves on a GPU (three waits per step, 4× fewer bytes to
copy) cannot be measured without one. On a 2-core machine that others load, run it with
OMP_NUM_THREADS=1 (one torch thread): with 2 threads both loops slowed ~10x and their windows
scattered 2x (measured at load average 10: median 2.3 vs 2.4 images/s, best 3.5 vs 6.3).

Decode rate (`decode_rate`): 256² HR / 64² LR PNG pairs cut from skimage.data photos (HR tiles,
LR by Pillow bicubic), decoded by `pipelines.train.data.decode_pairs` on one thread: images/s of
one CPU core, and the cores a GPU training at `--gpu-images-per-s` needs for decoding alone. That
default (100 images/s) is a PLACEHOLDER, not a measurement: no GPU was available here; pass the
rate benchmarks/gpu_check.py measures for your model and GPU.

To compare two versions of the loop (e.g. main before a change and a branch after it), run this
script in each checkout alternately at the same load and compare the "vs bare" ratios: the bare
loop is the same in both and absorbs the machine's speed.

Reported: images/s over all timed steps, and the best and the median `--log-every`-step window
(pooled over rounds): other load on a shared machine only slows a window down, so the best window
is the closest to the machine's unshared speed (timeit's reasoning) and the median moves less than
the total.

Same torch thread count everywhere: the bare loop uses torch's default (one per core); each Ray
worker asks for cores / workers CPUs, and Ray sets OMP_NUM_THREADS (hence torch's threads) to that
(floor, at least 1). Each worker writes its torch thread count to a probe file, printed below. Ray
is started with twice the cores as logical CPUs so that Ray Data's decode tasks can run beside
workers that hold every core. RAY_worker_niceness=0 so that Ray workers compete with other load on
a shared machine on the same terms as this process (Ray's default is niceness 15). With `--rounds`
above 1 the three loops run interleaved, round after round, and windows are pooled.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sr3model.config import SR3Config, TrainConfig, preset  # noqa: E402

GPU_IMAGES_PER_S = 100.0  # placeholder (not measured: no GPU here); see the module docstring

PROBE_DIR = ""  # set in main(); captured by value when `probed_loop` is pickled for the workers


def probed_loop(loop_config: dict) -> None:
    """`pipelines.train.loop.train_loop`, after writing this worker's torch thread count to a file."""
    import ray.train

    from pipelines.train.loop import train_loop

    context = ray.train.get_context()
    name = f"threads-{context.get_world_size()}w-rank{context.get_world_rank()}.txt"
    (Path(PROBE_DIR) / name).write_text(str(torch.get_num_threads()))
    train_loop(loop_config)


def bare_loop(pairs: str, config: SR3Config, warmup: int, steps: int, window: int) -> dict:
    """A plain single-process loop: images/s over all timed steps and per `window` steps."""
    from pipelines.pairs.store import read_part
    from pipelines.train import decode_pairs
    from sr3model.ema import EMA
    from sr3model.model import SR3
    from sr3model.training import make_optimizer, train_step

    from sr3model.imageio import from_uint8

    table = read_part(pairs, "train", columns=["hr", "lr"])
    arrays = decode_pairs({k: np.array(table.column(k).to_pylist(), dtype=object) for k in ("hr", "lr")})
    hr_all, lr_all = (from_uint8(torch.from_numpy(arrays[k])) for k in ("hr", "lr"))  # (N, 3, H, W) in [-1, 1]
    torch.manual_seed(config.train.seed)
    model = SR3(config)
    ema = EMA(model.net, config.train.ema_decay)
    optimizer = make_optimizer(model, config.train)
    generator = torch.Generator().manual_seed(config.train.seed)
    batch, order, stamps = config.train.batch_size, torch.randperm(len(hr_all)), {}
    for step in range(warmup + steps):
        first = (step * batch) % (len(order) - batch + 1)
        index = order[first:first + batch]
        train_step(model, optimizer, hr_all[index], lr_all[index], step=step, config=config.train,
                   ema=ema, generator=generator)
        if step + 1 >= warmup and (step + 1) % window == 0:
            stamps[step + 1] = time.perf_counter()
    return rates(stamps, warmup, steps, window, batch)


# -- the loop before #14, kept here as the baseline -------------------------------------------------

def old_train_step(model, optimizer, hr: torch.Tensor, lr: torch.Tensor, *, step: int, config: TrainConfig,
                   ema, generator: torch.Generator) -> dict[str, float]:
    """`sr3model.training.train_step` as it was before #14: noise levels drawn through the host,
    float(loss) and float(grad_norm) read every step (each a wait for the device)."""
    from sr3model.samplers import randn
    from sr3model.training import augment, learning_rate

    rate = learning_rate(step, config)
    for group in optimizer.param_groups:
        group["lr"] = rate
    hr, lr = augment(hr, lr, config, generator)
    core = getattr(model, "module", model)
    gen_device = generator.device  # the pre-#14 body of sr3model.diffusion.sample_step_and_level:
    t = torch.randint(0, len(core.schedule), (hr.shape[0],), generator=generator, device=gen_device).cpu()
    u = torch.rand(hr.shape[0], generator=generator, device=gen_device, dtype=torch.float64).cpu()
    gamma = core.schedule.gammas[t] + u * (core.schedule.gammas_prev[t] - core.schedule.gammas[t])
    eps = randn(hr.shape, generator=generator, like=hr, dtype=hr.dtype)
    loss = model(hr, lr, gamma=gamma.to(device=hr.device, dtype=torch.float32), eps=eps)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else float("inf"))
    optimizer.step()
    ema.update(core.net)
    return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "lr": rate}


def loop_ratio(pairs: str, config: SR3Config, windows: int, window: int, device: torch.device) -> dict:
    """Images/s of the new and the old loop, in alternating windows of `window` steps (one warm-up
    window each, then `windows` timed ones each)."""
    from pipelines.pairs.store import read_part
    from pipelines.train import decode_pairs
    from pipelines.train.loop import Meter, to_device
    from sr3model.ema import EMA
    from sr3model.model import SR3
    from sr3model.training import make_optimizer, train_step

    table = read_part(pairs, "train", columns=["hr", "lr"])
    u8 = decode_pairs({k: np.array(table.column(k).to_pylist(), dtype=object) for k in ("hr", "lr")})
    f32 = {k: v.astype(np.float32) / 127.5 - 1.0 for k, v in u8.items()}  # the old decode_pairs output
    batch = config.train.batch_size
    order = np.random.default_rng(0).permutation(len(u8["hr"]))

    def state():
        torch.manual_seed(config.train.seed)
        model = SR3(config).to(device).train()
        return {"model": model, "ema": EMA(model.net, config.train.ema_decay),
                "optimizer": make_optimizer(model, config.train),
                "generator": torch.Generator(device=device).manual_seed(config.train.seed), "step": 0}

    def rows(step: int) -> np.ndarray:
        first = (step * batch) % (len(order) - batch + 1)
        return np.sort(order[first:first + batch])

    def run_new(s: dict, meter: Meter) -> None:
        for _ in range(window):
            index = rows(s["step"])
            hr, lr = to_device(u8["hr"][index], device), to_device(u8["lr"][index], device)
            meter.add(train_step(s["model"], s["optimizer"], hr, lr, step=s["step"], config=config.train,
                                 ema=s["ema"], generator=s["generator"]), data_wait_s=0.0)
            s["step"] += 1
        meter.reduce()

    def run_old(s: dict, _) -> None:
        stats = []
        for _ in range(window):
            index = rows(s["step"])
            hr, lr = (torch.from_numpy(f32[k][index]).to(device) for k in ("hr", "lr"))
            stats.append(old_train_step(s["model"], s["optimizer"], hr, lr, step=s["step"], config=config.train,
                                        ema=s["ema"], generator=s["generator"]))
            s["step"] += 1
        keys = sorted(stats[0])  # the old loop's host-side window average (reduce_window)
        _ = dict(zip(keys, torch.tensor([[x[k] for k in keys] for x in stats], dtype=torch.float64).mean(0).tolist()))

    states = {"new": state(), "old": state()}
    meter = Meter(device)
    rates: dict[str, list[float]] = {"new": [], "old": []}
    for w in range(windows + 1):
        for name, run in (("old", run_old), ("new", run_new)) if w % 2 == 0 else (("new", run_new), ("old", run_old)):
            tick = time.perf_counter()
            run(states[name], meter)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if w > 0:  # the first window of each is warm-up
                rates[name].append(window * batch / (time.perf_counter() - tick))
    return rates


def decode_rate(pairs_count: int, repeats: int) -> dict:
    """Images/s of one thread decoding 256² HR / 64² LR PNG pairs (`decode_pairs`), and of the old
    float32 output (the same decode, then the conversion the old `decode_pairs` did on the host)."""
    from PIL import Image

    from pipelines.quickstart import HOLDOUT_PHOTOS, TRAIN_PHOTOS, photo as load_photo
    from pipelines.train import decode_pairs
    from sr3model.imageio import encode_png, lr_from_hr

    hr_png, lr_png = [], []
    while len(hr_png) < pairs_count:
        for name in TRAIN_PHOTOS + HOLDOUT_PHOTOS:
            photo = Image.fromarray(load_photo(name)).convert("RGB")
            for y in range(0, photo.height - 255, 256):
                for x in range(0, photo.width - 255, 256):
                    hr = photo.crop((x, y, x + 256, y + 256))
                    hr_png.append(encode_png(hr))
                    lr_png.append(encode_png(lr_from_hr(hr, 4)))
        if not hr_png:
            raise RuntimeError("no 256² tiles")
    columns = {"hr": hr_png[:pairs_count], "lr": lr_png[:pairs_count]}
    out = {}
    for name, convert in (("uint8", False), ("float32 (old)", True)):
        best = 0.0
        for _ in range(repeats):
            tick = time.perf_counter()
            for start in range(0, pairs_count, 16):
                got = decode_pairs({k: v[start:start + 16] for k, v in columns.items()})
                if convert:
                    {k: v.astype(np.float32) / 127.5 - 1.0 for k, v in got.items()}
            best = max(best, pairs_count / (time.perf_counter() - tick))
        out[name] = best
    out["hr_png_kb"] = float(np.mean([len(b) for b in columns["hr"]]) / 1024)
    return out


def loader_rate(pairs: str, batch: int, batches: int) -> float:
    """Images/s of the training data path alone (pipelines.train.data: seeded unit order, shuffle
    buffer, read and decode threads), one worker's view, after 2 warm-up batches."""
    from pipelines import storage
    from pipelines.pairs import store as pair_store
    from pipelines.train.data import BatchStream
    from pipelines.train.driver import train_files

    files, groups = train_files(pairs, pair_store.read_summary(pairs))
    fs, _ = storage.resolve(files[0])
    stream = BatchStream([storage.resolve(f)[1] for f in files], groups, storage.to_pyarrow(fs), seed=0, rank=0,
                         world=1, batch=batch, threads=min(4, os.cpu_count() or 1))(0, 0)
    for _ in range(2):
        next(stream)
    tick = time.perf_counter()
    for _ in range(batches):
        next(stream)
    elapsed = time.perf_counter() - tick
    stream.close()
    return batches * batch / elapsed


def rates(stamps: dict[int, float], warmup: int, steps: int, window: int, batch: int) -> dict:
    """images/s between the clock readings `stamps[step]` (s) taken after steps warmup, +window, ..."""
    ends = range(warmup + window, warmup + steps + 1, window)
    return {"overall": steps * batch / (stamps[warmup + steps] - stamps[warmup]),
            "windows": [window * batch / (stamps[end] - stamps[end - window]) for end in ends]}


def ray_train(pairs: str, config: SR3Config, workers: int, cores: int, warmup: int, steps: int,
              log_every: int, root: Path) -> dict:
    """Run `pipelines.train.train`; images/s from the timestamps of the metrics the loop logged."""
    from mlflow import MlflowClient

    import pipelines.train.loop
    from pipelines.train import train

    uri = f"sqlite:///{root}/mlflow.db"
    pipelines.train.loop.train_loop = probed_loop  # train() imports it by name at call time
    tick = time.perf_counter()
    result = train(pairs, config, steps=warmup + steps, num_workers=workers,
                   cpus_per_worker=cores / workers, storage_uri=str(root / "checkpoints"),
                   run_name=f"bench-{workers}w-{int(time.time())}", experiment="bench-train",
                   tracking_uri=uri, log_every=log_every, val_images=0, max_failures=1, log_pyfunc=False)
    total = time.perf_counter() - tick
    logged = sorted(MlflowClient(uri).get_metric_history(result.run_id, "step_time_s"), key=lambda m: m.timestamp)
    stamps = {m.step: m.timestamp / 1000 for m in logged}  # after a worker restart: the last attempt's
    threads = [int((Path(PROBE_DIR) / f"threads-{workers}w-rank{r}.txt").read_text()) for r in range(workers)]
    return {**rates(stamps, warmup, steps, log_every, config.train.batch_size), "total_s": total, "threads": threads}


def main() -> None:
    global PROBE_DIR
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps (a multiple of --log-every)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps (a multiple of --log-every)")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (split over the Ray workers)")
    parser.add_argument("--log-every", type=int, default=10, help="the loop's MLflow logging interval")
    parser.add_argument("--patches-per-image", type=int, default=64, help="pairs = 12 photos x this")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions; medians reported")
    parser.add_argument("--skip-ray-train", action="store_true",
                        help="skip the Ray Train runs (bare vs Ray); keep new-vs-old loop and decode rate")
    parser.add_argument("--loop-windows", type=int, default=6,
                        help="timed --log-every-step windows per loop in the new-vs-old comparison")
    parser.add_argument("--decode-pairs", type=int, default=64, help="256²/64² PNG pairs timed by the decode rate")
    parser.add_argument("--gpu-images-per-s", type=float, default=GPU_IMAGES_PER_S,
                        help=f"a GPU's training rate to size decode CPUs for (default {GPU_IMAGES_PER_S:g}: a "
                             "PLACEHOLDER, not measured: no GPU was available; use benchmarks/gpu_check.py's)")
    args = parser.parse_args()
    if args.steps % args.log_every or args.warmup % args.log_every or args.warmup < args.log_every:
        parser.error("--steps and --warmup must be positive multiples of --log-every")
    cores = os.cpu_count() or 1
    config = preset("tiny")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=args.batch_size))

    import ray

    from pipelines.pairs.build import build_pairs
    from pipelines.quickstart import TRAIN_PHOTOS, export_photos

    with tempfile.TemporaryDirectory(prefix="sr3-bench-train-") as directory:
        root = Path(directory)
        PROBE_DIR = str(root)
        ray.init(address="local", num_cpus=2 * cores, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        export_photos(root / "photos", TRAIN_PHOTOS)
        summary = build_pairs([str(root / "photos")], str(root / "pairs"), "patches", 64, 4,
                              patches_per_image=args.patches_per_image, progress=lambda message: None)
        pairs = str(root / "pairs")
        epoch = summary["train"] // args.batch_size  # steps per epoch (also for 2 workers: half the rows each)
        print(f"{summary['train']} train pairs 16->64 from {len(TRAIN_PHOTOS)} photos ({epoch} steps per epoch); "
              f"preset tiny, global batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps, "
              f"{cores} CPUs (load average {os.getloadavg()[0]:.1f})")
        if args.warmup + args.steps > epoch:
            print("note: the timed steps cross an epoch boundary (a new order; the first units of the next epoch are read then)")

        loops = loop_ratio(pairs, config, args.loop_windows, args.log_every, torch.device("cpu"))
        decode = decode_rate(args.decode_pairs, repeats=3)
        rounds: dict[str | int, list[dict]] = {"bare": [], 1: [], 2: []}
        for index in range(0 if args.skip_ray_train else args.rounds):  # interleaved: others' load hits all alike
            bare = bare_loop(pairs, config, args.warmup, args.steps, args.log_every)
            rounds["bare"].append(bare)
            print(f"round {index + 1}: bare loop {bare['overall']:.1f} images/s, {torch.get_num_threads()} "
                  f"torch threads (load average {os.getloadavg()[0]:.1f})")
            for workers in (1, 2):
                run = ray_train(pairs, config, workers, cores, args.warmup, args.steps, args.log_every, root)
                rounds[workers].append(run)
                print(f"round {index + 1}: Ray Train {workers} worker(s) {run['overall']:.1f} images/s, "
                      f"torch threads per worker {run['threads']} ({run['total_s']:.0f} s with start-up; "
                      f"load average {os.getloadavg()[0]:.1f})")
        batches = 3 * summary["train"] // args.batch_size  # three epochs: their boundaries included
        loader = [loader_rate(pairs, args.batch_size, batches) for _ in range(max(2, args.rounds))]
        ray.shutdown()

    new, old = float(np.median(loops["new"])), float(np.median(loops["old"]))
    print(f"\nnew loop (uint8 batches, [-1, 1] on the device, no per-step sync) vs the loop before #14 "
          f"(float32 batches, float(loss)/float(grad_norm) and .cpu() draws every step), in-process, CPU, "
          f"{len(loops['new'])} alternating {args.log_every}-step windows each: median {new:.1f} vs {old:.1f} "
          f"images/s = {new / old:.2f}x (target >= 1.0x); best {max(loops['new']):.1f} vs {max(loops['old']):.1f} "
          f"= {max(loops['new']) / max(loops['old']):.2f}x")
    core = decode["uint8"]
    print(f"decode, one CPU core: {core:.0f} pairs/s of 256² HR + 64² LR PNG ({args.decode_pairs} pairs cut from "
          f"skimage.data, HR PNG {decode['hr_png_kb']:.0f} kB) as uint8; {decode['float32 (old)']:.0f} pairs/s with "
          f"the old float32 conversion ({core / decode['float32 (old)']:.2f}x)")
    print(f"a GPU training at {args.gpu_images_per_s:g} images/s needs {args.gpu_images_per_s / core:.2f} CPU cores "
          "for decoding alone" + (" (the rate is a PLACEHOLDER, not measured here: no GPU was available; pass "
                                  "--gpu-images-per-s)" if args.gpu_images_per_s == GPU_IMAGES_PER_S else ""))
    if args.skip_ray_train:
        print(f"data path alone (pipelines.train.data, 1 worker, {batches} batches of {args.batch_size} over 3 epochs): "
              f"{' / '.join(f'{v:.0f}' for v in loader)} images/s")
        return
    pooled = {name: [w for r in runs for w in r["windows"]] for name, runs in rounds.items()}
    figures = {  # each: {loop: images/s}
        f"best {args.log_every}-step window": {name: max(values) for name, values in pooled.items()},
        f"median {args.log_every}-step window": {name: float(np.median(values)) for name, values in pooled.items()},
        f"all {args.steps} timed steps": {name: float(np.median([r["overall"] for r in runs]))
                                          for name, runs in rounds.items()},
    }
    print(f"\n| images/s, global batch {args.batch_size} | " + " | ".join(figures) + " |")
    print("| --- |" + " --- |" * len(figures))
    for name, label in (("bare", "bare PyTorch, 1 process"), (1, "Ray Train, 1 worker"), (2, "Ray Train, 2 workers")):
        cells = [f"{f[name]:.1f} ({f[name] / f['bare']:.2f}x)" for f in figures.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for label, f in figures.items():
        print(f"{label}: Ray Train 1 worker / bare loop = {f[1] / f['bare']:.2f}x (target >= 0.9x); "
              f"2 workers / 1 worker = {f[2] / f[1]:.2f}x (the same {cores} cores over 2 processes)")
    print(f"data path alone (pipelines.train.data, 1 worker, {batches} batches of {args.batch_size} over 3 epochs): "
          f"{' / '.join(f'{v:.0f}' for v in loader)} images/s, {min(loader) / max(f[1] for f in figures.values()):.0f}x "
          "what the 1-worker loop consumed at its fastest")


if __name__ == "__main__":
    main()
