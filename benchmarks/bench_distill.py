"""A distilled 1/2/4-step student against its teacher: quality per network pass, and upscaling speed.

    python benchmarks/bench_distill.py [--teacher DIR] [--students 1 2 4] [--student-steps 600]
                                       [--pairs URI] [--skip-throughput] [--out reports/bench-distill]

Quality (needs only torch and sr3model; `--device cuda` on a GPU machine without Ray):
- Teacher: `--teacher DIR` (a model directory, e.g. the quickstart's champion downloaded), else the
  quickstart's recipe trained here by the bare `sr3model.training.train_step` loop (the `tiny`
  preset as it is — residual objective, x0-prediction, L1, LR-consistent sampling — at
  `--teacher-train-steps` 400, batch 8, lr 2e-3, EMA weights).
- Data: the quickstart's 16→64 patch pairs of its 12 training photos (`--patches` crops each) and,
  for scoring, 8 crops each of its two held-out photos (coffee, chelsea) — or the val split of any
  committed pairs dataset (`--pairs`; needs pyarrow and fsspec).
- Teacher outputs: DPM-Solver++(2M), `--teacher-steps` 20, `--outputs-per-pair` per training pair,
  each output's start noise from its own generator seeded by `pipelines.sampling.image_seed`, with
  the teacher's own LR consistency (its config's, as it is served), as `jobs/distill.py` stores
  them; quantised to 8 bits as the stored PNGs are. Every row samples with its model's config
  (the students inherit the teacher's LR consistency).
- Students (`sr3model.distill`): the teacher's weights, `student_config(teacher, K)`, trained by the
  same bare loop on those outputs for `--student-steps` steps; EMA weights scored.
- One table on the held-out pairs (`--eval-samples` samples per pair, each seeded by (seed, pair key,
  sample) — the same start noise for every row): PSNR, SSIM, LR-PSNR, colour error, detail ratio,
  flat-region noise (`sr3model.metrics.scores`), LR-PSNR of the outputs quantised to 8 bits as the
  upscale job writes them (`lr_psnr_8bit`: the float LR-PSNR of LR-consistent outputs is 85–105 dB,
  a residue of the final clip far below one 8-bit level), network passes per output, and PSNR against the teacher's
  DPM-Solver++(2M) 20 output for the same noise. Teacher rows: DDPM 100, DPM-Solver++(2M) 20 and 10,
  DDIM 10; then the targets checked. `grid.png`: LR | teacher | student-1 | student-4 | HR.

Throughput (needs Ray; `--skip-throughput` leaves it out): `pipelines.infer.upscale.upscale` on the
same local Ray, same input folder (`--throughput-images` LR images of `--throughput-size`² pixels,
tiled), the teacher at DPM-Solver++(2M) 20 steps against each student, in alternating rounds; images/s
of the whole call (planning, actor start-up, model load, sampling, writing) and of sampling alone
(the manifest's per-output seconds).

Everything it trains is cached under `--out` (teacher/, teacher-outputs.pt, student-K/) and reused by
the next run with the same settings — the teacher keyed on its recipe, `--patches` and the crops'
pixels; its outputs on the teacher's weights, sampling, `--patches` and the crops' pixels; a student
on its settings and those outputs; `--fresh` retrains.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_quality import pairs as photo_pairs  # noqa: E402  (the same crops as the quality benchmark)
from pipelines.quickstart import HOLDOUT_PHOTOS, TRAIN_PHOTOS, photo  # noqa: E402  (stdlib only at import)
from pipelines.sampling import image_seed  # noqa: E402  (torch and numpy only)
from sr3model import SR3, override, preset  # noqa: E402
from sr3model.distill import student_config  # noqa: E402
from sr3model.ema import EMA  # noqa: E402
from sr3model.imageio import from_uint8, lr_from_hr, random_patches, to_uint8_batch  # noqa: E402
from sr3model.metrics import lr_psnr, psnr, scores  # noqa: E402
from sr3model.training import make_optimizer, train_step  # noqa: E402
from sr3model.weights import load_model, save_model  # noqa: E402

TEACHER_ROWS = (("ddpm", 100), ("dpmpp-2m", 20), ("dpmpp-2m", 10), ("ddim", 10))
REFERENCE = ("dpmpp-2m", 20)  # what the targets compare against (and what the students learn)
COLUMNS = ("psnr", "ssim", "lr_psnr", "lr_psnr_8bit", "colour_error", "detail_ratio", "flat_noise_ratio")


def say(message: str) -> None:
    print(f"[bench-distill {time.strftime('%H:%M:%S')}] {message}", flush=True)


def digest(*tensors: torch.Tensor) -> str:
    """A short SHA-256 of the tensors' values (cache keys: the same bytes, the same key)."""
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def committed_val_pairs(uri: str, limit: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from pipelines.pairs.store import read_part
    from sr3model.imageio import decode_png, to_tensor

    table = read_part(uri, "val", columns=["key", "hr", "lr"]).sort_by("key").slice(0, limit)
    hr = torch.stack([to_tensor(decode_png(b)) for b in table.column("hr").to_pylist()])
    lr = torch.stack([to_tensor(decode_png(b)) for b in table.column("lr").to_pylist()])
    return hr, lr, table.column("key").to_pylist()


def fit(model: SR3, hr: torch.Tensor, lr: torch.Tensor, steps: int, batch: int, seed: int, device: str,
        extra: dict[str, torch.Tensor] | None = None, label: str = "") -> SR3:
    """The bare training loop (as benchmarks/bench_quality.py): random batches, EMA; returns the EMA model."""
    model.to(device).train()
    ema = EMA(model.net, model.config.train.ema_decay)
    ema.shadow = {k: v.to(device) for k, v in ema.shadow.items()}
    optimizer = make_optimizer(model, model.config.train)
    order, noise = torch.Generator().manual_seed(seed), torch.Generator(device=device).manual_seed(seed + 1)
    losses = []
    for step in range(steps):
        index = torch.randint(0, len(hr), (batch,), generator=order)
        more = {k: v[index].to(device) for k, v in (extra or {}).items()}
        if "teacher" in more:
            more["teacher"] = from_uint8(more["teacher"])
        stats = train_step(model, optimizer, hr[index].to(device), lr[index].to(device), step=step,
                           config=model.config.train, ema=ema, generator=noise, extra=more)
        losses.append(float(stats["loss"]))
        if (step + 1) % max(1, steps // 5) == 0:
            say(f"  {label}: step {step + 1}/{steps}, loss {np.mean(losses[-50:]):.4f}")
    ema.copy_to(model.net)
    return model.eval()


def lr_psnr_8bit(images: torch.Tensor, lr: torch.Tensor) -> float:
    """Mean LR-PSNR (dB) of outputs (B, N, 3, H, W) quantised to 8 bits, as the upscale job writes them.

    The float outputs of an LR-consistent sampler sit on {y : downsample(y) = LR} up to what the
    final clip to [-1, 1] moves (sr3model.consistency: clip/project rounds, then `super_resolve`
    clips): 85–105 dB, i.e. LR errors of ~0.01/255, where a dB gap says which model leaves a few
    more pixels out of range, nothing visible. The written PNG is what a user gets."""
    n = images.shape[1]
    written = from_uint8(torch.from_numpy(to_uint8_batch(images.flatten(0, 1))).permute(0, 3, 1, 2))
    return float(lr_psnr(written, lr.repeat_interleave(n, dim=0)).double().mean())


def sample(model: SR3, lr: torch.Tensor, keys: list[str], *, sampler: str | None, steps: int | None,
           samples: int, seed: int, device: str, chunk: int = 32) -> torch.Tensor:
    """Outputs (B, samples, 3, H, W) on the CPU; output (i, k) from a CPU generator seeded by
    image_seed(seed, keys[i], k), as the sampling path seeds it."""
    schedule = model.inference_schedule(steps)
    out = []
    for s in range(0, len(lr), chunk):
        generators = [torch.Generator().manual_seed(image_seed(seed, key, k)) for key in keys[s:s + chunk]
                      for k in range(samples)]
        out.append(model.super_resolve(lr[s:s + chunk].to(device), sampler=sampler, schedule=schedule,
                                       samples=samples, generator=generators).cpu())
    return torch.cat(out)


def teacher_model(args, train_hr, train_lr) -> SR3:
    folder = args.out / "teacher"
    if args.teacher:
        return load_model(args.teacher, device=args.device)
    config = override(preset("tiny"), ["train.lr=2e-3", "train.batch_size=8"])
    stamp = f"{config.to_json()}|{args.teacher_train_steps}|{args.seed}|patches={args.patches}|{digest(train_lr)}"
    if (folder / "config.json").exists() and not args.fresh and (folder / "stamp").is_file() \
            and (folder / "stamp").read_text() == stamp:
        say(f"reusing the teacher in {folder}")
        return load_model(folder, device=args.device)
    torch.manual_seed(args.seed)
    d = config.diffusion
    say(f"training the teacher: tiny, {config.objective}, {d.prediction}, L{d.loss}, consistency "
        f"{'on' if d.sample_consistency else 'off'}, {args.teacher_train_steps} steps at batch 8, lr 2e-3")
    model = fit(SR3(config), train_hr, train_lr, args.teacher_train_steps, 8, args.seed, args.device,
                label="teacher")
    save_model(folder, model)
    (folder / "stamp").write_text(stamp)
    return model


def teacher_outputs(args, teacher: SR3, train_lr: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"index", "seed", "teacher" (uint8 (N, 3, H, W))}: `--outputs-per-pair` per training pair."""
    path = args.out / "teacher-outputs.pt"
    # Everything the outputs depend on: the teacher (its weights, not only its config: a teacher
    # retrained with other steps or crops has the same config), its sampling, and the training crops
    # (`--patches` and their pixels: a cache made from other crops must not be reused).
    tag = (f"{args.teacher or 'trained'}|{digest(*teacher.net.state_dict().values())}|{teacher.config.to_json()}|"
           f"{args.teacher_steps}|{args.outputs_per_pair}|{args.seed}|patches={args.patches}|{len(train_lr)}|"
           f"{digest(train_lr)}")
    if path.exists() and not args.fresh:
        found = torch.load(path)
        if found.get("tag") == tag:
            say(f"reusing the teacher outputs in {path}")
            return found
    keys = [f"train-{i:05d}" for i in range(len(train_lr))]
    tick = time.perf_counter()
    images = sample(teacher, train_lr, keys, sampler="dpmpp-2m", steps=args.teacher_steps,
                    samples=args.outputs_per_pair, seed=args.seed, device=args.device)
    n = args.outputs_per_pair
    found = {"tag": tag, "index": torch.arange(len(keys)).repeat_interleave(n),
             "seed": torch.tensor([image_seed(args.seed, key, k) for key in keys for k in range(n)]),
             "teacher": torch.from_numpy(to_uint8_batch(images.flatten(0, 1))).permute(0, 3, 1, 2).contiguous()}
    torch.save(found, path)
    say(f"teacher outputs: {len(found['seed'])} in {time.perf_counter() - tick:.0f} s")
    return found


def student(args, teacher: SR3, steps: int, train_hr, train_lr, outputs) -> tuple[SR3, float]:
    folder = args.out / f"student-{steps}{args.tag}"
    stamp = f"{args.student_steps}|{args.student_lr}|{args.student_batch}|{args.hr_weight}|{args.loss}|{outputs['tag']}"
    if (folder / "config.json").exists() and not args.fresh and (folder / "stamp").read_text() == stamp:
        say(f"reusing the {steps}-step student in {folder}")
        return load_model(folder, device=args.device), 0.0
    config = student_config(teacher.config, steps, teacher_uri="bench teacher", hr_weight=args.hr_weight,
                            loss=args.loss)
    config = override(config, [f"train.lr={args.student_lr}", f"train.warmup_steps={args.student_warmup}",
                               f"train.batch_size={args.student_batch}"])
    model = SR3(config)
    model.net.load_state_dict(teacher.net.state_dict())
    tick = time.perf_counter()
    index = outputs["index"]
    model = fit(model, train_hr[index], train_lr[index], args.student_steps, args.student_batch, args.seed + steps,
                args.device, extra={"teacher": outputs["teacher"], "seed": outputs["seed"]}, label=f"student-{steps}")
    seconds = time.perf_counter() - tick
    save_model(folder, model)
    (folder / "stamp").write_text(stamp)
    return model, seconds


def row(name: str, passes: int, metrics: dict[str, float], to_teacher: float | None) -> str:
    cells = [f"{metrics[k]:.3f}" if k in ("ssim", "detail_ratio", "flat_noise_ratio") else f"{metrics[k]:.2f}" for k in COLUMNS]
    return f"| {name} | {passes} | " + " | ".join(cells) + f" | {'—' if to_teacher is None else f'{to_teacher:.2f}'} |"


def quality(args, results: dict) -> dict[int, Path]:
    train_hr, train_lr = photo_pairs(TRAIN_PHOTOS, args.patches, args.seed)
    if args.pairs:
        hr, lr, keys = committed_val_pairs(args.pairs, args.limit)
    else:
        hr, lr = photo_pairs(HOLDOUT_PHOTOS, 8, args.seed + 1000)
        keys = [f"holdout-{i:03d}" for i in range(len(hr))]
    say(f"{len(train_hr)} training pairs, {len(hr)} held-out pairs; device {args.device}, "
        f"torch threads {torch.get_num_threads()}")
    teacher = teacher_model(args, train_hr, train_lr)
    common = dict(samples=args.eval_samples, seed=args.seed, device=args.device)
    rows, shown, outputs_of = [], {}, {}
    for sampler, steps in (TEACHER_ROWS if not args.quick else (REFERENCE,)):
        tick = time.perf_counter()
        images = sample(teacher, lr, keys, sampler=sampler, steps=steps, **common)
        outputs_of[(sampler, steps)] = images
        rows.append((f"teacher, {sampler} {steps}", steps, {**scores(images, hr, lr), "lr_psnr_8bit": lr_psnr_8bit(images, lr)},
                     time.perf_counter() - tick))
    reference = outputs_of[REFERENCE]
    shown["teacher"] = reference[:, 0]
    for k in args.students if not args.quick else ():  # what distillation starts from: the teacher's weights
        untrained = SR3(student_config(teacher.config, k)).to(args.device).eval()
        untrained.net.load_state_dict(teacher.net.state_dict())
        tick = time.perf_counter()
        images = sample(untrained, lr, keys, sampler=None, steps=None, **common)
        rows.append((f"untrained student {k} (teacher's weights, distilled {k})", k,
                     {**scores(images, hr, lr), "lr_psnr_8bit": lr_psnr_8bit(images, lr)},
                     time.perf_counter() - tick))
        outputs_of[("untrained", k)] = images
    outputs = teacher_outputs(args, teacher, train_lr)
    folders = {}
    for k in args.students:
        model, train_s = student(args, teacher, k, train_hr, train_lr, outputs)
        tick = time.perf_counter()
        images = sample(model, lr, keys, sampler=None, steps=None, **common)
        rows.append((f"student, distilled {k}", k, {**scores(images, hr, lr), "lr_psnr_8bit": lr_psnr_8bit(images, lr)},
                     time.perf_counter() - tick))
        outputs_of[("student", k)] = images
        shown[f"student-{k}"] = images[:, 0]
        folders[k] = args.out / f"student-{k}{args.tag}"
        results[f"student-{k}"] = {"train_s": train_s}

    def to_teacher(images: torch.Tensor) -> float:
        return float(psnr(images.flatten(0, 1), reference.flatten(0, 1)).mean())

    head = ("| method | passes / output | PSNR dB | SSIM | LR-PSNR dB | LR-PSNR of the 8-bit output dB "
            "| colour error /255 | detail ratio | flat-region noise | PSNR vs teacher's dpmpp-2m 20 |")
    lines = [head, "| --- " * 10 + "|"]
    for (name, passes, metrics, _), key in zip(rows, list(outputs_of)):
        distance = None if key == REFERENCE else to_teacher(outputs_of[key])
        lines.append(row(name, passes, metrics, distance))
        results[name] = {**metrics, "passes": passes, "psnr_vs_teacher": distance}
    print("\n" + "\n".join(lines) + "\n", flush=True)
    check_targets(results)
    grid_png(args.out / f"grid{args.tag}.png", lr, hr, [shown[c] for c in ("teacher", "student-1", "student-4") if c in shown])
    return folders


def check_targets(results: dict) -> None:
    ref = results[f"teacher, {REFERENCE[0]} {REFERENCE[1]}"]
    margins = {4: (0.3, 0.5), 1: (1.0, 1.0), 2: (None, None)}
    for k, (dp, dl) in margins.items():
        got = results.get(f"student, distilled {k}")
        if got is None:
            continue
        d_psnr, d_lr = got["psnr"] - ref["psnr"], got["lr_psnr"] - ref["lr_psnr"]
        d_lr8 = got["lr_psnr_8bit"] - ref["lr_psnr_8bit"]
        d_detail = got["detail_ratio"] - ref["detail_ratio"]
        checks = [("colour error ≤ 2/255", got["colour_error"] <= 2, f"{got['colour_error']:.2f}/255"),
                  ("detail ratio within ±0.15 of the teacher's", abs(d_detail) <= 0.15, f"{d_detail:+.3f}")]
        if dp is not None:
            checks = [(f"PSNR within {dp} dB", d_psnr >= -dp, f"{d_psnr:+.2f} dB"),
                      (f"LR-PSNR within {dl} dB", d_lr >= -dl, f"{d_lr:+.2f} dB"),
                      (f"LR-PSNR of the 8-bit outputs within {dl} dB", d_lr8 >= -dl, f"{d_lr8:+.2f} dB")] + checks
        print(f"student-{k} vs teacher dpmpp-2m 20: " + "; ".join(
            f"{name}: {'met' if ok else 'MISSED'} ({value})" for name, ok, value in checks), flush=True)


def grid_png(path: Path, lr: torch.Tensor, hr: torch.Tensor, columns: list[torch.Tensor], rows: int = 6) -> None:
    from PIL import Image

    up = torch.nn.functional.interpolate(lr[:rows], size=hr.shape[-1], mode="nearest")
    strip = torch.cat([t[:rows].float() for t in (up, *columns, hr)], dim=3)
    image = np.concatenate(list(to_uint8_batch(strip)), axis=0)
    Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.NEAREST).save(path)


def throughput(args, folders: dict[int, Path], results: dict) -> None:
    """images/s through pipelines.infer.upscale.upscale: the teacher at dpmpp-2m 20 vs each student."""
    import shutil

    import ray
    from PIL import Image

    from pipelines.infer.upscale import upscale

    source = args.out / "throughput-input"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    side = args.throughput_size
    for i in range(args.throughput_images):
        name = HOLDOUT_PHOTOS[i % len(HOLDOUT_PHOTOS)]
        image = Image.fromarray(photo(name)).convert("RGB")
        crop = random_patches(image, side * 4, 1, np.random.default_rng([args.seed, i]))[0]
        lr_from_hr(crop, 4).save(source / f"{i:03d}.png")
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, logging_level="WARNING")
    arms = [("teacher, dpmpp-2m 20", args.out / "teacher" if not args.teacher else Path(args.teacher),
             {"sampler": "dpmpp-2m", "steps": 20})]
    arms += [(f"student, distilled {k}", folders[k], {}) for k in sorted(folders)]
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in arms}
    for round_ in range(args.rounds):
        for name, folder, flags in arms:
            output = args.out / f"throughput-{round_}-{name.split(',')[0]}-{name.split()[-1]}"
            shutil.rmtree(output, ignore_errors=True)
            tick = time.perf_counter()
            summary = upscale(str(folder), str(source), str(output), batch_size=16, progress=lambda _: None, **flags)
            wall = time.perf_counter() - tick
            done = summary["done"]
            sampling = _sampling_seconds(output)
            rates[name].append((done / wall, done / sampling * summary["placement"]["max_actors"]))
            say(f"  round {round_ + 1}: {name}: {done} images in {wall:.1f} s ({done / wall:.3f} images/s; "
                f"sampling alone {rates[name][-1][1]:.3f} images/s over the actors)")
    ray.shutdown()
    base = max(r[0] for r in rates[arms[0][0]])
    base_sampling = max(r[1] for r in rates[arms[0][0]])
    print(f"\n| upscaling ({args.throughput_images} LR images {side}² → {4 * side}², tiled) | images/s (best of "
          f"{args.rounds}) | vs teacher | sampling only, images/s | vs teacher |\n| --- | --- | --- | --- | --- |")
    for name, _, _ in arms:
        best, best_sampling = max(r[0] for r in rates[name]), max(r[1] for r in rates[name])
        results[f"throughput {name}"] = {"images_per_s": best, "ratio": best / base,
                                         "sampling_images_per_s": best_sampling,
                                         "sampling_ratio": best_sampling / base_sampling}
        print(f"| {name} | {best:.3f} | {best / base:.1f}× | {best_sampling:.3f} | {best_sampling / base_sampling:.1f}× |")
    print(flush=True)


def _sampling_seconds(output: Path) -> float:
    import pyarrow.parquet as pq

    table = pq.read_table(output / "_manifest")
    return float(sum(table.column("seconds").to_pylist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="a teacher model directory (default: train the quickstart's recipe here)")
    parser.add_argument("--teacher-train-steps", type=int, default=400)
    parser.add_argument("--teacher-steps", type=int, default=20, help="DPM-Solver++(2M) steps of the teacher outputs")
    parser.add_argument("--outputs-per-pair", type=int, default=2, help="teacher outputs (start noises) per pair")
    parser.add_argument("--students", type=int, nargs="+", default=[1, 2, 4], choices=[1, 2, 4])
    parser.add_argument("--student-steps", type=int, default=800, help="training steps of each student")
    parser.add_argument("--student-batch", type=int, default=8)
    parser.add_argument("--student-lr", type=float, default=1e-3)
    parser.add_argument("--student-warmup", type=int, default=50)
    parser.add_argument("--hr-weight", type=float, default=None, help="default: sr3model.config.DistillConfig's")
    parser.add_argument("--loss", type=int, default=None, choices=[1, 2], help="default: DistillConfig's")
    parser.add_argument("--patches", type=int, default=48, help="training crops per photo")
    parser.add_argument("--pairs", help="score on the val split of this committed pairs dataset instead")
    parser.add_argument("--limit", type=int, default=64, help="val pairs of --pairs")
    parser.add_argument("--eval-samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--throughput-images", type=int, default=96)
    parser.add_argument("--throughput-size", type=int, default=64, help="LR side of the upscaled images")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="retrain everything cached under --out")
    parser.add_argument("--quick", action="store_true",
                        help="only the teacher's reference row (dpmpp-2m 20) and the students: for trying settings")
    parser.add_argument("--tag", default="", help="suffix of the student folders (variants sharing a teacher)")
    parser.add_argument("--out", type=Path, default=Path("reports/bench-distill"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start, results = time.perf_counter(), {}

    def save() -> None:
        (args.out / f"results{args.tag}.json").write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2, default=float))

    folders = quality(args, results)
    save()
    if not args.skip_throughput and folders:
        throughput(args, folders, results)
        save()
    say(f"{time.perf_counter() - start:.0f} s in all; grid (LR | teacher dpmpp-2m 20 | student-1 | student-4 | HR): "
        f"{args.out / 'grid.png'}; results.json beside it")


if __name__ == "__main__":
    main()
