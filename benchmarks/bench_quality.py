"""Quality at a fixed budget: which objective / prediction gives faithful colour, consistency and detail
without grain, with LR-consistent sampling off and on.

    python benchmarks/bench_quality.py [--steps 400] [--batch-size 8] [--lr 2e-3]
                                       [--sampler dpmpp-2m] [--sample-steps 20]
                                       [--arms sr3-eps sr3-v residual-eps residual-v regression]
                                       [--set KEY=VALUE ...] [--save DIR] [--out reports/bench-quality]

Data (the quickstart's): 16→64 patch pairs of 12 photos bundled with scikit-image
(`pipelines.quickstart.TRAIN_PHOTOS`, `--patches` crops each, the pair builder's own transforms),
and for evaluation 8 crops each of two photos never seen in training (`HOLDOUT_PHOTOS`: coffee,
chelsea). Every arm is the `tiny` preset with its objective / prediction (`--set` overrides every
arm, e.g. `--set diffusion.loss=2`; the training levels are the preset's log-SNR spacing except
for the paper's `sr3-eps` and `residual-x0-linear`, which keep the paper's linear β schedule),
trained by the same bare `sr3model.training.train_step` loop (Adam + warm-up, EMA, flips) for
`--steps` steps of the same random batches, from the same initial weights; its EMA weights are
evaluated. The defaults are the quickstart's budget: 400 steps at batch 8, lr 2e-3, the preset's
sampler with 20 steps.

Evaluation: `sr3model.metrics.scores`, the table every stage reports: PSNR, SSIM, LR-PSNR
(consistency in dB), colour error (mean |Δ| of per-channel means, 8-bit levels), detail ratio
(high-frequency energy relative to the HR's; 1 = as detailed as the photo), flat-region noise
(`flat_noise_ratio`: the same energy where the photo is flat; 1 = the photo's grain, above = grain
it does not have) and diversity (σ across `--samples` samples per pair), each sample's noise seeded
by (seed, pair) as in the evaluate and upscale jobs. Every diffusion arm is sampled with `--sampler`
over `--sample-steps` levels of the default (log-SNR) schedule, ŷ0 clipped, with LR consistency off
and on (`sr3model.consistency`); then the best arm (`rank`: the fewest missed targets besides grain
and detail, then the least grain and detail off the photo's, in log) is also sampled with DDPM at
100, DDIM at 20 and DPM-Solver++(2M) at 20 and 10 steps.

Imports: torch, numpy, Pillow, scikit-image and `sr3model` (+ the quickstart's list of photos), so
it runs where only torch is installed (a GPU machine without Ray or MLflow: add `--device cuda`).

Prints one markdown table, the quality issue's targets checked against it, the time each arm took,
and writes `grid.png` (rows: held-out pairs; columns: LR, bicubic, each arm with consistency on,
HR) and `results.json` to `--out`; `--save DIR` keeps each arm's weights (DIR/ARM: config.json,
model.safetensors, ema.safetensors) for `benchmarks/bench_grain.py --model`.
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

from pipelines.quickstart import HOLDOUT_PHOTOS, TRAIN_PHOTOS, photo  # noqa: E402 (torch-free module)
from pipelines.sampling import image_seed  # noqa: E402 (torch + numpy only)
from sr3model import SR3, override, preset  # noqa: E402
from sr3model.ema import EMA  # noqa: E402
from sr3model.imageio import lr_from_hr, random_patches, to_tensor_batch, to_uint8_batch  # noqa: E402
from sr3model.metrics import scores  # noqa: E402
from sr3model.resample import upsample  # noqa: E402
from sr3model.training import make_optimizer, train_step  # noqa: E402
from sr3model.weights import save_model  # noqa: E402

ARMS = {  # name → config overrides of the tiny preset (training levels log-SNR-spaced unless "linear")
    "sr3-eps": ["objective=sr3", "diffusion.prediction=eps", "diffusion.schedule=linear"],  # the paper's
    "sr3-v": ["objective=sr3", "diffusion.prediction=v"],
    "sr3-x0": ["objective=sr3", "diffusion.prediction=x0"],
    "residual-eps": ["objective=residual", "diffusion.prediction=eps"],
    "residual-v": ["objective=residual", "diffusion.prediction=v"],
    "residual-x0": ["objective=residual", "diffusion.prediction=x0"],
    "residual-x0-linear": ["objective=residual", "diffusion.prediction=x0", "diffusion.schedule=linear"],
    "regression": ["objective=regression"],
}
COLUMNS = ("psnr", "ssim", "lr_psnr", "colour_error", "detail_ratio", "flat_noise_ratio", "diversity")
TARGETS = ("LR-PSNR ≥ 45 dB with consistency on, PSNR not lower than with it off, colour error ≤ 1/255, "
           "flat-region noise ≤ 1.5, detail ratio 0.7–1.3")


def pairs(names: tuple[str, ...], patches: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HR 64² crops and their LR (Pillow bicubic ÷4) of the named photos, in [-1, 1]."""
    from PIL import Image

    hr_list, lr_list = [], []
    for i, name in enumerate(names):
        image = Image.fromarray(photo(name)).convert("RGB")
        for crop in random_patches(image, 64, patches, np.random.default_rng([seed, i])):
            hr_list.append(crop)
            lr_list.append(lr_from_hr(crop, 4))
    return to_tensor_batch(hr_list), to_tensor_batch(lr_list)


def train(arm: str, hr: torch.Tensor, lr: torch.Tensor, args) -> tuple[SR3, float, dict[str, torch.Tensor]]:
    """The arm's EMA model after `args.steps` steps; (model, seconds, the raw (non-EMA) weights)."""
    config = override(preset("tiny"), [*ARMS[arm], f"train.lr={args.lr}", f"train.batch_size={args.batch_size}",
                                       *args.set])
    torch.manual_seed(args.seed)
    model = SR3(config).to(args.device)
    ema = EMA(model.net, config.train.ema_decay)
    optimizer = make_optimizer(model, config.train)
    order = torch.Generator().manual_seed(args.seed)  # the same batches for every arm
    noise = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    tick = time.perf_counter()
    model.train()
    losses = []
    for step in range(args.steps):
        index = torch.randint(0, len(hr), (args.batch_size,), generator=order)
        stats = train_step(model, optimizer, hr[index].to(args.device), lr[index].to(args.device), step=step,
                           config=config.train, ema=ema, generator=noise)
        losses.append(float(stats["loss"]))
        if (step + 1) % max(1, args.steps // 4) == 0:
            print(f"  {arm}: step {step + 1}/{args.steps}, loss {np.mean(losses[-50:]):.4f}", flush=True)
    seconds = time.perf_counter() - tick
    raw = {k: v.detach().clone() for k, v in model.net.state_dict().items()}
    if args.save:
        save_model(Path(args.save) / arm, model, ema.state_dict())
    ema.copy_to(model.net)
    return model.eval(), seconds, raw


def sample(model: SR3, lr: torch.Tensor, *, sampler: str, steps: int, samples: int, seed: int,
           consistency: bool | None = None, schedule=None, **kwargs) -> torch.Tensor:
    """Outputs (B, N, 3, H, W) on the CPU, each sample's noise seeded by (seed, pair key, k)."""
    device = next(model.parameters()).device
    keys = [f"holdout-{i:03d}" for i in range(len(lr))]
    schedule = schedule if schedule is not None else model.inference_schedule(steps)
    n = 1 if model.config.objective == "regression" else samples
    out = []
    for s in range(0, len(lr), 16):
        generators = [torch.Generator(device=device).manual_seed(image_seed(seed, key, k))
                      for key in keys[s:s + 16] for k in range(n)]
        out.append(model.super_resolve(lr[s:s + 16].to(device), sampler=sampler, schedule=schedule, samples=n,
                                       generator=generators, consistency=consistency, **kwargs).cpu())
    return torch.cat(out)


def score(model: SR3 | None, hr: torch.Tensor, lr: torch.Tensor, **how) -> tuple[dict[str, float], torch.Tensor, float]:
    """(metrics, outputs (B, N, 3, H, W), seconds) of a model, or of bicubic when model is None."""
    tick = time.perf_counter()
    images = upsample(lr, tuple(hr.shape[-2:])).clamp(-1, 1)[:, None] if model is None else sample(model, lr, **how)
    return scores(images, hr, lr), images, time.perf_counter() - tick


def row(name: str, metrics: dict[str, float], extra: str = "") -> str:
    cells = []
    for key in COLUMNS:
        value = metrics.get(key)
        cells.append("—" if value is None else f"{value:.3f}" if key in ("ssim", "diversity")
                     else f"{value:.2f}")
    return f"| {name} | " + " | ".join(cells) + f" | {extra} |"


def meets(off: dict[str, float], on: dict[str, float]) -> list[str]:
    """The targets this arm misses, each with its figure (consistency-on figures unless stated)."""
    missed = []
    if on["lr_psnr"] < 45:
        missed.append(f"LR-PSNR {on['lr_psnr']:.1f} dB < 45")
    if on["psnr"] < off["psnr"]:
        missed.append(f"PSNR on {on['psnr']:.2f} < off {off['psnr']:.2f} dB")
    if on["colour_error"] > 1:
        missed.append(f"colour error {on['colour_error']:.2f}/255 > 1")
    if not on["flat_noise_ratio"] <= 1.5:
        missed.append(f"flat-region noise {on['flat_noise_ratio']:.2f} > 1.5")
    if not 0.7 <= on["detail_ratio"] <= 1.3:
        missed.append(f"detail ratio {on['detail_ratio']:.2f} outside 0.7–1.3")
    return missed


def rank(off: dict[str, float], on: dict[str, float]) -> tuple[int, float]:
    """Order of arms: fewest missed targets other than grain and detail, then the distance of the
    picture from the photo's texture: |log detail ratio| + log of the flat-region noise above 1
    (consistency on). Grain and detail are ranked together because grain counts as detail: an arm
    that covers flat areas with noise reaches the detail range by that noise, and a blurry arm has
    no grain; either is as far from the photo as the factor it is off by."""
    import math

    others = [m for m in meets(off, on) if not m.startswith(("flat-region noise", "detail ratio"))]
    off_photo = abs(math.log(max(on["detail_ratio"], 1e-6))) + max(0.0, math.log(max(on["flat_noise_ratio"], 1e-6)))
    return len(others), off_photo


def grid_png(path: Path, lr: torch.Tensor, hr: torch.Tensor, columns: list[torch.Tensor], rows: int = 6) -> None:
    from PIL import Image

    size = hr.shape[-1]
    up = torch.nn.functional.interpolate(lr[:rows], size=size, mode="nearest")
    tiles = [up, *(c[:rows] for c in columns), hr[:rows]]
    strip = torch.cat([t.float() for t in tiles], dim=3)  # (rows, 3, H, W·columns)
    image = np.concatenate(list(to_uint8_batch(strip)), axis=0)
    Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.NEAREST).save(path)


def training_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a training budget and of sampling the held-out pairs, shared with bench_seeds."""
    parser.add_argument("--steps", type=int, default=400, help="training steps per arm (the quickstart's 400)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--patches", type=int, default=48, help="training crops per photo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every arm")
    parser.add_argument("--sampler", default=preset("tiny").diffusion.sample_sampler,
                        help="the arms' sampler (default: the preset's)")
    parser.add_argument("--sample-steps", type=int, default=20, help="the arms' refinement steps")
    parser.add_argument("--samples", type=int, default=2, help="samples per held-out pair")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training_arguments(parser)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, help="keep each arm's weights in SAVE/ARM")
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
          f"{args.sampler} {args.sample_steps} steps; torch threads {torch.get_num_threads()}", flush=True)

    how = dict(sampler=args.sampler, steps=args.sample_steps, samples=args.samples, seed=args.seed)
    results: dict[str, dict] = {}
    bicubic, bicubic_images, _ = score(None, hr, lr)
    results["bicubic"] = {"metrics": bicubic}
    shown, models = [bicubic_images[:, 0]], {}
    for arm in args.arms:
        model, train_s, _ = train(arm, train_hr, train_lr, args)
        models[arm] = model
        entry = results[arm] = {"train_s": train_s, "sampler": args.sampler, "steps": args.sample_steps}
        for flag in (False, True):
            metrics, images, sample_s = score(model, hr, lr, consistency=flag, **how)
            entry["on" if flag else "off"] = {"metrics": metrics, "sample_s": sample_s}
            print(row(f"{arm}, consistency {'on' if flag else 'off'}", metrics,
                      f"train {train_s:.0f} s, sample {sample_s:.0f} s"), flush=True)
        shown.append(images[:, 0])

    diffusion = [a for a in args.arms if a != "regression"]
    solvers = []
    if diffusion:
        best = min(diffusion, key=lambda a: rank(results[a]["off"]["metrics"], results[a]["on"]["metrics"]))
        others = [(s, k) for s, k in (("ddpm", 100), ("ddim", 20), ("dpmpp-2m", 20), ("dpmpp-2m", 10))
                  if (s, k) != (args.sampler, args.sample_steps)]
        for sampler, steps in others:
            for flag in (False, True):
                metrics, _, sample_s = score(models[best], hr, lr, sampler=sampler, steps=steps, samples=args.samples,
                                             seed=args.seed, consistency=flag)
                solvers.append((f"{best}, {sampler} {steps}, consistency {'on' if flag else 'off'}", metrics,
                                sample_s))
        results["_solvers"] = {name: {"metrics": m, "sample_s": s} for name, m, s in solvers}
        results["_best"] = best

    head = ("| arm | PSNR dB | SSIM | LR-PSNR dB | colour error /255 | detail ratio | flat-region noise | diversity "
            "| |")
    lines = [head, "| --- " * 9 + "|", row("bicubic", bicubic)]
    for a in args.arms:
        for flag in ("off", "on"):
            lines.append(row(f"{a}, {args.sampler} {args.sample_steps}, consistency {flag}",
                             results[a][flag]["metrics"], f"train {results[a]['train_s']:.0f} s"))
    lines += [row(name, m, f"sample {s:.0f} s") for name, m, s in solvers]
    print("\n" + "\n".join(lines))
    print(f"\ntargets ({args.sampler} {args.sample_steps}, held-out pairs): {TARGETS}")
    for arm in diffusion:
        missed = meets(results[arm]["off"]["metrics"], results[arm]["on"]["metrics"])
        print(f"  {arm}: {'meets every target' if not missed else 'misses: ' + '; '.join(missed)}")
    grid_png(args.out / "grid.png", lr, hr, shown)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       **results}, indent=2, default=float))
    print(f"\n{time.perf_counter() - start:.0f} s in all; grid (LR | bicubic | {' | '.join(args.arms)} "
          f"(consistency on) | HR): {args.out / 'grid.png'}")


if __name__ == "__main__":
    main()
