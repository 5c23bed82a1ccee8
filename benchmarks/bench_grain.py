"""Where the grain on flat areas comes from: the candidates measured one at a time on one trained model.

    python benchmarks/bench_grain.py [--model DIR] [--steps 400] [--arm residual-v] [--set KEY=VALUE ...]
                                     [--sampler dpmpp-2m] [--sample-steps 20] [--out reports/bench-grain]

The model: `--model DIR` (config.json + model.safetensors + ema.safetensors, e.g. written by
`benchmarks/bench_quality.py --save`), else the `--arm` of bench_quality trained here at the
quickstart's budget (400 steps at batch 8, lr 2e-3; `--set` changes the config, e.g.
`--set diffusion.loss=2`). Data: bench_quality's 16 held-out pairs (coffee, chelsea), and for the
tiling experiment 8 crops of 32×32 LR (128² HR) of the same photos.

Experiments (the grain measure is `flat_noise_ratio`, sr3model.metrics: high-frequency energy where
the photo is flat over the photo's own; 1 = the photo, bicubic ≈ 0.1):

1. levels — does the network remove noise at each level? For the levels of the `--sample-steps`
   log-SNR schedule (and the training schedule's range), y_t = √γ·y0 + √(1−γ)·ε from the true y0
   and one ŷ0: `kept` = the share of the noise √((1−γ)/γ)·ε that survives into ŷ0 on flat pixels
   (0: all removed; 1: left as it came; regression of ŷ0 − y0 on it), and the flat-region noise of
   ŷ0's image. EMA and raw weights; how often training drew a level near it (p(γ) mass).
2. trace — where in the chain the sample's grain appears: the flat-region noise and detail ratio
   of every step's ŷ0 while sampling with `--sampler` (no consistency projection: the network and
   the sampler alone).
3. sampling — the same model sampled other ways: EMA or raw weights, DDPM / DDIM / DPM-Solver++,
   the schedule's cleanest level γ_1 (1 − 1e-4 by default; 1e-3, 1e-2 stop earlier), LR
   consistency off / on.
4. tiles — 32×32 LR inputs sampled as one canvas by the network (it is fully convolutional) and
   through `sr3model.tiling` (16-pixel tiles, 4 shared, blended every step).
0. projection — the closed-form projection of `sr3model.consistency` against iterative
   back-projection (y ← y + up(lr − down(y)), bicubic up) after k iterations: the largest
   |down(y) − lr| left and the time per call, on 64² and 1024² canvases (×4).

Prints markdown tables and writes `results.json` to `--out`. Imports torch, numpy, Pillow,
scikit-image and `sr3model` only (+ the quickstart's photo list, torch-free).
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

import bench_quality as Q  # noqa: E402
from sr3model import SR3  # noqa: E402
from sr3model.diffusion import predict_y0, q_sample  # noqa: E402
from sr3model.imageio import lr_from_hr, random_patches, to_tensor_batch  # noqa: E402
from sr3model.metrics import flat_mask, scores  # noqa: E402
from sr3model.schedules import GAMMA_MAX, log_snr_schedule, start_limit, training_schedule  # noqa: E402
from sr3model.tiling import TiledDenoiser  # noqa: E402
from sr3model.weights import load_model  # noqa: E402

SHOWN = ("psnr", "lr_psnr", "colour_error", "detail_ratio", "flat_noise_ratio")


def load(args, train_hr, train_lr) -> tuple[SR3, SR3]:
    """(EMA model, raw model) from --model, or trained here."""
    if args.model:
        return load_model(args.model, ema=True).eval(), load_model(args.model, ema=False).eval()
    args.save = None
    model, seconds, raw = Q.train(args.arm, train_hr, train_lr, args)
    print(f"trained {args.arm} in {seconds:.0f} s", flush=True)
    plain = SR3(model.config)
    plain.net.load_state_dict(raw)
    return model, plain.eval()


def _image(model: SR3, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    return model.to_image(y0, x).clamp(-1, 1)


@torch.no_grad()
def levels(model: SR3, hr: torch.Tensor, lr: torch.Tensor, gammas: list[float], seed: int) -> list[dict]:
    """Per level: the share of the noise kept in one ŷ0 on flat pixels, and ŷ0's flat-region noise."""
    x = model.condition(lr)
    y0 = model.to_y0(hr, x)
    mask = flat_mask(hr, tuple(lr.shape[-2:])).expand_as(hr)
    denoise = model.denoiser("fp32")
    out = []
    for gamma in gammas:
        eps = torch.randn(hr.shape, generator=torch.Generator().manual_seed(seed))
        g = torch.full((len(hr),), gamma)
        y_t = q_sample(y0, g, eps)
        y0_hat = predict_y0(y_t, g, denoise(x, y_t, g))
        noise = ((1 - gamma) / gamma) ** 0.5 * eps  # what y_t/√γ adds to y0
        error = y0_hat - y0
        kept = float((error * noise)[mask].sum() / (noise * noise)[mask].sum())
        metrics = scores(_image(model, x, y0_hat)[:, None], hr, lr)
        out.append({"gamma": gamma, "log_snr": float(np.log(gamma / (1 - gamma))), "kept_flat": kept,
                    "flat_noise_ratio": metrics["flat_noise_ratio"], "detail_ratio": metrics["detail_ratio"]})
    return out


def training_mass(model: SR3, gammas: list[float]) -> list[float]:
    """Share of training draws of p(γ) within ±0.5 nats of log-SNR around each level."""
    schedule = training_schedule(model.config.diffusion)
    lam = schedule.log_snr.numpy()
    lam_prev = np.concatenate([[np.inf], lam[:-1]])
    out = []
    for gamma in gammas:
        centre = np.log(gamma / (1 - gamma))
        low, high = centre - 0.5, centre + 0.5
        # each step t is uniform in γ over [γ_t, γ_{t−1}]: approximate it uniform in λ over its span
        span = np.clip(np.minimum(lam_prev, high) - np.maximum(lam, low), 0, None)
        width = np.where(np.isfinite(lam_prev), lam_prev - lam, 1.0)
        out.append(float((span / np.maximum(width, 1e-12)).sum() / len(lam)))
    return out


@torch.no_grad()
def trace(model: SR3, hr: torch.Tensor, lr: torch.Tensor, sampler: str, steps: int, seed: int) -> list[dict]:
    """Flat-region noise and detail ratio of each step's ŷ0 image while sampling."""
    x = model.condition(lr)
    seen = []
    inner = model.denoiser("fp32")

    def recording(x_, y_t, gamma):
        eps = inner(x_, y_t, gamma)
        seen.append((float(gamma[0]), predict_y0(y_t, gamma, eps)))
        return eps
    Q.sample(model, lr, sampler=sampler, steps=steps, samples=1, seed=seed, denoiser=recording, consistency=False)
    out = []
    for gamma, y0_hat in seen:
        metrics = scores(_image(model, x, y0_hat)[:, None], hr, lr)
        out.append({"gamma": gamma, "log_snr": float(np.log(gamma / (1 - gamma))),
                    "flat_noise_ratio": metrics["flat_noise_ratio"], "detail_ratio": metrics["detail_ratio"]})
    return out


def sampling(ema: SR3, raw: SR3, hr, lr, args) -> list[tuple[str, dict]]:
    rows = []
    how = dict(samples=args.samples, seed=args.seed)
    limit = start_limit(ema.config.diffusion)
    for name, model in (("EMA", ema), ("raw", raw)):
        for sampler, steps in (("ddpm", 100), ("ddim", args.sample_steps), ("dpmpp-2m", args.sample_steps)):
            for flag in (False, True):
                metrics, _, _ = Q.score(model, hr, lr, sampler=sampler, steps=steps, consistency=flag, **how)
                rows.append((f"{name}, {sampler} {steps}, γ_1 = 1 − 1e-4, consistency {'on' if flag else 'off'}",
                             metrics))
    for clean in (1e-3, 1e-2, 3e-2):
        schedule = log_snr_schedule(args.sample_steps, 1 - clean, limit)
        for flag in (False, True):
            metrics, _, _ = Q.score(ema, hr, lr, sampler=args.sampler, steps=args.sample_steps, schedule=schedule,
                                    consistency=flag, **how)
            rows.append((f"EMA, {args.sampler} {args.sample_steps}, γ_1 = 1 − {clean:g}, "
                         f"consistency {'on' if flag else 'off'}", metrics))
    return rows


def tiles(model: SR3, args) -> list[tuple[str, dict]]:
    """Whole canvas vs tiled sampling of 32×32 LR crops (128² HR) of the held-out photos."""
    from PIL import Image

    hr_list, lr_list = [], []
    for i, name in enumerate(Q.HOLDOUT_PHOTOS):
        image = Image.fromarray(Q.photo(name)).convert("RGB")
        for crop in random_patches(image, 128, 4, np.random.default_rng([args.seed + 2000, i])):
            hr_list.append(crop)
            lr_list.append(lr_from_hr(crop, 4))
    hr, lr = to_tensor_batch(hr_list), to_tensor_batch(lr_list)
    tiled = TiledDenoiser(model.denoiser("fp32"), 64, 16, 16)
    rows = []
    for name, denoiser in (("whole canvas", None), ("tiles of 16, overlap 4", tiled)):
        for flag in (False, True):
            metrics, _, _ = Q.score(model, hr, lr, sampler=args.sampler, steps=args.sample_steps,
                                    samples=1, seed=args.seed, consistency=flag, denoiser=denoiser)
            rows.append((f"32² LR, {name}, consistency {'on' if flag else 'off'}", metrics))
    return rows


def projection() -> list[str]:
    """Closed form vs iterative back-projection: residual left and milliseconds per call."""
    from sr3model.consistency import project
    from sr3model.resample import downsample, upsample

    lines = ["| canvas | method | max abs(down(y) − lr) | ms per call |", "| --- " * 4 + "|"]
    for size in (64, 1024):
        g = torch.Generator().manual_seed(0)
        lr = torch.rand(1, 3, size // 4, size // 4, generator=g) * 1.6 - 0.8
        y = upsample(lr, size) + 0.1 * torch.randn(1, 3, size, size, generator=g)
        project(y, lr)  # build and cache the matrices once, as sampling does

        def timed(fn, repeats: int = 5):
            tick = time.perf_counter()
            for _ in range(repeats):
                out = fn()
            return out, (time.perf_counter() - tick) / repeats * 1e3

        def left(out: torch.Tensor) -> str:
            return f"{float((downsample(out, size // 4) - lr).abs().max()):.1e}"
        out, ms = timed(lambda: project(y, lr))
        lines.append(f"| {size}² | closed form | {left(out)} | {ms:.1f} |")
        for k in (1, 3, 10, 30):
            def back(k: int = k) -> torch.Tensor:
                z = y
                for _ in range(k):
                    z = z + upsample(lr - downsample(z, size // 4), size)
                return z
            out, ms = timed(back)
            lines.append(f"| {size}² | back-projection, {k} iterations | {left(out)} | {ms:.1f} |")
    return lines


def table(title: str, rows: list[tuple[str, dict]]) -> str:
    head = "| " + title + " | PSNR dB | LR-PSNR dB | colour error /255 | detail ratio | flat-region noise |"
    body = ["| " + name + " | " + " | ".join(f"{m[k]:.2f}" for k in SHOWN) + " |" for name, m in rows]
    return "\n".join([head, "| --- " * 6 + "|", *body])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model directory (else --arm is trained here)")
    parser.add_argument("--arm", default="residual-v", choices=list(Q.ARMS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--patches", type=int, default=48)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sampler", default="dpmpp-2m")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip", nargs="*", default=[], choices=("projection", "levels", "trace", "sampling", "tiles"))
    parser.add_argument("--out", type=Path, default=Path("reports/bench-grain"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_hr, train_lr = (None, None) if args.model else Q.pairs(Q.TRAIN_PHOTOS, args.patches, args.seed)
    hr, lr = Q.pairs(Q.HOLDOUT_PHOTOS, 8, args.seed + 1000)
    ema, raw = load(args, train_hr, train_lr)
    cfg = ema.config
    print(f"model: {args.model or args.arm} ({cfg.objective}, {cfg.diffusion.prediction}, L{cfg.diffusion.loss}, "
          f"EMA {cfg.train.ema_decay}); {len(hr)} held-out pairs", flush=True)
    results: dict[str, object] = {"model": args.model or args.arm, "config": cfg.to_dict()}
    if "projection" not in args.skip:
        lines = projection()
        print("\n0. the projection onto the LR-consistent images\n" + "\n".join(lines), flush=True)
        results["projection"] = lines

    if "levels" not in args.skip:
        schedule = log_snr_schedule(args.sample_steps, GAMMA_MAX, start_limit(cfg.diffusion))
        gammas = [float(g) for g in schedule.gammas]
        found = {name: levels(model, hr, lr, gammas, args.seed) for name, model in (("EMA", ema), ("raw", raw))}
        mass = training_mass(ema, gammas)
        lines = ["| level | log-SNR | p(γ) mass ±0.5 | kept, EMA | kept, raw | ŷ0 flat-region noise, EMA | raw |",
                 "| --- " * 7 + "|"]
        for i, gamma in enumerate(gammas):
            e, r = found["EMA"][i], found["raw"][i]
            lines.append(f"| 1 − {1 - gamma:.2e} | {e['log_snr']:.1f} | {mass[i]:.3f} | {e['kept_flat']:.2f} | "
                         f"{r['kept_flat']:.2f} | {e['flat_noise_ratio']:.2f} | {r['flat_noise_ratio']:.2f} |")
        print("\n1. one-shot denoising from the truth, per level (flat pixels)\n" + "\n".join(lines), flush=True)
        results["levels"] = {**found, "training_mass": mass}
    if "trace" not in args.skip:
        steps = trace(ema, hr, lr, args.sampler, args.sample_steps, args.seed)
        lines = ["| step | γ | log-SNR | ŷ0 flat-region noise | ŷ0 detail ratio |", "| --- " * 5 + "|"]
        lines += [f"| {i + 1} | {s['gamma']:.4g} | {s['log_snr']:.1f} | {s['flat_noise_ratio']:.2f} | "
                  f"{s['detail_ratio']:.2f} |" for i, s in enumerate(steps)]
        print(f"\n2. {args.sampler} {args.sample_steps}: each step's ŷ0\n" + "\n".join(lines), flush=True)
        results["trace"] = steps
    if "sampling" not in args.skip:
        rows = sampling(ema, raw, hr, lr, args)
        print("\n3. sampling the same model\n" + table("sampling", rows), flush=True)
        results["sampling"] = dict(rows)
    if "tiles" not in args.skip:
        rows = tiles(ema, args)
        print("\n4. tiling\n" + table("canvas", rows), flush=True)
        results["tiles"] = dict(rows)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"\n{time.perf_counter() - start:.0f} s; {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
