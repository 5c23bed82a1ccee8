"""Quality at a fixed budget: which objective / prediction gives faithful colour, consistency and detail.

    python benchmarks/bench_quality.py [--steps 1000] [--batch-size 8] [--lr 2e-3] [--sample-steps 100]
                                       [--arms sr3-eps sr3-v residual-eps residual-v regression]
                                       [--out reports/bench-quality]

Data (the quickstart's): 16→64 patch pairs of 12 photos bundled with scikit-image
(`pipelines.quickstart.TRAIN_PHOTOS`, `--patches` crops each, the pair builder's own transforms),
and for evaluation 8 crops each of two photos never seen in training (`HOLDOUT_PHOTOS`: coffee,
chelsea). Every arm is the `tiny` preset with its objective / prediction, trained by the same bare
`sr3model.training.train_step` loop (Adam + warm-up, EMA, flips) for `--steps` steps of the same
random batches, from the same initial weights; its EMA weights are evaluated.

Evaluation (`pipelines.eval`'s metrics, so the numbers mean what the evaluate job reports): PSNR,
SSIM, LR-PSNR (consistency in dB), colour error (mean |Δ| of per-channel means, 8-bit levels),
detail ratio (high-frequency energy relative to the HR's; 1 = as detailed as the photo) and
diversity (σ across `--samples` samples per pair), each sample's noise seeded by (seed, pair) as in
the evaluate and upscale jobs.
Diffusion arms sample with DDPM over `--sample-steps` levels of the default (log-SNR) schedule,
ŷ0 clipped; then the best arm (lowest colour error among those with LR-PSNR within 1 dB of the
best) is also sampled with DDIM and DPM-Solver++(2M) at 10 and 20 steps.

Prints one markdown table, the targets of the quality issue checked against it, the time each
arm took, and writes `grid.png` (rows: held-out pairs; columns: LR, bicubic, each arm, HR) and
`results.json` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipelines import eval as E  # noqa: E402
from pipelines.sampling import image_seed  # noqa: E402
from pipelines.quickstart import HOLDOUT_PHOTOS, TRAIN_PHOTOS, photo  # noqa: E402
from sr3model import SR3, override, preset  # noqa: E402
from sr3model.ema import EMA  # noqa: E402
from sr3model.imageio import lr_from_hr, random_patches, to_tensor_batch, to_uint8_batch  # noqa: E402
from sr3model.training import make_optimizer, train_step  # noqa: E402

ARMS = {  # name → config overrides of the tiny preset
    "sr3-eps": ["objective=sr3", "diffusion.prediction=eps"],
    "sr3-v": ["objective=sr3", "diffusion.prediction=v"],
    "residual-eps": ["objective=residual", "diffusion.prediction=eps"],
    "residual-v": ["objective=residual", "diffusion.prediction=v"],
    "regression": ["objective=regression"],
}
COLUMNS = ("psnr", "ssim", "lr_psnr", "colour_error", "detail_ratio", "diversity")
TARGETS = "colour error ≤ 2/255, LR-PSNR ≥ 38 dB, detail ratio in 0.8–1.25"


def pairs(names: tuple[str, ...], patches: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HR 64² crops and their LR (Pillow bicubic ÷4) of the named photos, in [-1, 1]."""
    hr_list, lr_list = [], []
    for i, name in enumerate(names):
        from PIL import Image

        image = Image.fromarray(photo(name)).convert("RGB")
        for crop in random_patches(image, 64, patches, np.random.default_rng([seed, i])):
            hr_list.append(crop)
            lr_list.append(lr_from_hr(crop, 4))
    return to_tensor_batch(hr_list), to_tensor_batch(lr_list)


def train(arm: str, hr: torch.Tensor, lr: torch.Tensor, args) -> tuple[SR3, float]:
    """The arm's EMA model after `args.steps` steps; (model, seconds)."""
    config = override(preset("tiny"), [*ARMS[arm], f"train.lr={args.lr}", f"train.batch_size={args.batch_size}",
                                       *args.set])
    torch.manual_seed(args.seed)
    model = SR3(config)
    ema = EMA(model.net, config.train.ema_decay)
    optimizer = make_optimizer(model, config.train)
    order = torch.Generator().manual_seed(args.seed)  # the same batches for every arm
    noise = torch.Generator().manual_seed(args.seed + 1)
    tick = time.perf_counter()
    model.train()
    losses = []
    for step in range(args.steps):
        index = torch.randint(0, len(hr), (args.batch_size,), generator=order)
        stats = train_step(model, optimizer, hr[index], lr[index], step=step, config=config.train, ema=ema,
                           generator=noise)
        losses.append(float(stats["loss"]))
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(f"  {arm}: step {step + 1}/{args.steps}, loss {np.mean(losses[-50:]):.4f}", flush=True)
    seconds = time.perf_counter() - tick
    ema.copy_to(model.net)
    return model.eval(), seconds


def score(model: SR3 | None, hr: torch.Tensor, lr: torch.Tensor, *, sampler: str, steps: int, samples: int,
          seed: int) -> tuple[dict[str, float], torch.Tensor, float]:
    """(metrics, outputs (B, N, 3, H, W), seconds) of a model, or of bicubic when model is None."""
    tick = time.perf_counter()
    keys = [f"holdout-{i:03d}" for i in range(len(hr))]
    if model is None:
        images = E.bicubic(lr, tuple(hr.shape[-2:]))
    else:
        schedule = model.inference_schedule(steps)
        n = 1 if model.config.objective == "regression" else samples
        images = torch.cat([model.super_resolve(lr[s:s + 16], sampler=sampler, schedule=schedule, samples=n,
                                                generator=[torch.Generator().manual_seed(image_seed(seed, key, k))
                                                           for key in keys[s:s + 16] for k in range(n)])
                            for s in range(0, len(hr), 16)])
    running = E.Running()
    running.add(images, hr, lr)
    return running.result(), images, time.perf_counter() - tick


def row(name: str, metrics: dict[str, float], extra: str = "") -> str:
    cells = []
    for key in COLUMNS:
        value = metrics.get(key)
        cells.append("—" if value is None else f"{value:.3f}" if key in ("ssim", "detail_ratio", "diversity")
                     else f"{value:.2f}")
    return f"| {name} | " + " | ".join(cells) + f" | {extra} |"


def grid_png(path: Path, lr: torch.Tensor, hr: torch.Tensor, columns: list[torch.Tensor], rows: int = 6) -> None:
    from PIL import Image

    size = hr.shape[-1]
    up = torch.nn.functional.interpolate(lr[:rows], size=size, mode="nearest")
    tiles = [up, *(c[:rows] for c in columns), hr[:rows]]
    strip = torch.cat([t.float() for t in tiles], dim=3)  # (rows, 3, H, W·columns)
    image = np.concatenate(list(to_uint8_batch(strip)), axis=0)
    Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="training steps per arm")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--patches", type=int, default=48, help="training crops per photo")
    parser.add_argument("--sample-steps", type=int, default=100, help="DDPM steps of the arms' evaluation")
    parser.add_argument("--samples", type=int, default=2, help="samples per held-out pair")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every arm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("reports/bench-quality"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_hr, train_lr = pairs(TRAIN_PHOTOS, args.patches, args.seed)
    hr, lr = pairs(HOLDOUT_PHOTOS, 8, args.seed + 1000)
    print(f"{len(train_hr)} training pairs from {len(TRAIN_PHOTOS)} photos; {len(hr)} held-out pairs from "
          f"{', '.join(HOLDOUT_PHOTOS)}; tiny, {args.steps} steps at batch {args.batch_size}, lr {args.lr:g}; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    results: dict[str, dict] = {}
    bicubic, bicubic_images, _ = score(None, hr, lr, sampler="", steps=0, samples=1, seed=args.seed)
    results["bicubic"] = {"metrics": bicubic}
    shown, models = [bicubic_images[:, 0]], {}
    for arm in args.arms:
        model, train_s = train(arm, train_hr, train_lr, args)
        metrics, images, sample_s = score(model, hr, lr, sampler="ddpm", steps=args.sample_steps,
                                          samples=args.samples, seed=args.seed)
        results[arm] = {"metrics": metrics, "train_s": train_s, "sample_s": sample_s,
                        "sampler": "ddpm" if arm != "regression" else "", "steps": args.sample_steps}
        models[arm] = model
        shown.append(images[:, 0])
        print(row(arm, metrics, f"train {train_s:.0f} s, sample {sample_s:.0f} s"), flush=True)

    diffusion = [a for a in args.arms if a != "regression"]
    solvers = []
    if diffusion:
        top = max(results[a]["metrics"]["lr_psnr"] for a in diffusion)
        best = min((a for a in diffusion if results[a]["metrics"]["lr_psnr"] >= top - 1),
                   key=lambda a: results[a]["metrics"]["colour_error"])
        for sampler, steps in (("ddim", 10), ("ddim", 20), ("dpmpp-2m", 10), ("dpmpp-2m", 20)):
            metrics, _, sample_s = score(models[best], hr, lr, sampler=sampler, steps=steps, samples=args.samples,
                                         seed=args.seed)
            solvers.append((f"{best}, {sampler} {steps}", metrics, sample_s))
        results["_solvers"] = {name: {"metrics": m, "sample_s": s} for name, m, s in solvers}
        results["_best"] = best

    head = "| arm | PSNR dB | SSIM | LR-PSNR dB | colour error /255 | detail ratio | diversity | |"
    lines = [head, "| --- " * 8 + "|", row("bicubic", bicubic)]
    lines += [row(f"{a}, ddpm {args.sample_steps}" if a != "regression" else a, results[a]["metrics"],
                  f"train {results[a]['train_s']:.0f} s") for a in args.arms]
    lines += [row(name, m, f"sample {s:.0f} s") for name, m, s in solvers]
    print("\n" + "\n".join(lines))
    print(f"\ntargets for the default configuration: {TARGETS}; regression ≥ bicubic + 0.5 dB PSNR; "
          f"dpmpp-2m at 10 steps within 0.5 dB PSNR and 1 dB LR-PSNR of DDPM at {args.sample_steps}")
    for arm in diffusion:
        m = results[arm]["metrics"]
        ok = m["colour_error"] <= 2 and m["lr_psnr"] >= 38 and 0.8 <= m["detail_ratio"] <= 1.25
        print(f"  {arm}: {'meets' if ok else 'misses'} ({m['colour_error']:.2f}/255, {m['lr_psnr']:.1f} dB, "
              f"detail {m['detail_ratio']:.2f})")
    if "regression" in results:
        gain = results["regression"]["metrics"]["psnr"] - bicubic["psnr"]
        print(f"  regression: {gain:+.2f} dB PSNR over bicubic ({'meets' if gain >= 0.5 else 'misses'})")
    if solvers:
        ref = results[results["_best"]]["metrics"]
        fast = results["_solvers"][f"{results['_best']}, dpmpp-2m 10"]["metrics"]
        print(f"  dpmpp-2m 10 vs ddpm {args.sample_steps}: {fast['psnr'] - ref['psnr']:+.2f} dB PSNR, "
              f"{fast['lr_psnr'] - ref['lr_psnr']:+.2f} dB LR-PSNR")
    grid_png(args.out / "grid.png", lr, hr, shown)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       **results}, indent=2, default=float))
    print(f"\n{time.perf_counter() - start:.0f} s in all; grid (LR | bicubic | {' | '.join(args.arms)} | HR): "
          f"{args.out / 'grid.png'}")


if __name__ == "__main__":
    main()
