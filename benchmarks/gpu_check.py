"""The prepared GPU check: training throughput and MFU, bf16 correctness, few-step sampling speed.

    python benchmarks/gpu_check.py                      # on a CUDA machine: the whole check, < 5 min
    python benchmarks/gpu_check.py --model quickstart/model --out $OUT
    python benchmarks/gpu_check.py --quick --device cpu # the same code on a CPU, tiny sizes (a test runs it)

Pure `sr3model` + torch: the lent GPU machines have torch but no Ray, MLflow or network. Sections,
each under a share of `--budget-s` (later sections are skipped, and say so, when time runs out):

1. Matmul ceiling: the median rate of an 8192² bf16 matrix product (fp32 2048² on CPU) — the
   denominator of MFU, measured rather than read off a datasheet.
2. Training, per preset (`natural-64-256`; `faces-64-512` with activation checkpointing): the
   largest power-of-two batch that fits (doubling until CUDA runs out of memory, then the last that
   fit), then the median time of a training step at that batch: Algorithm 1's loss under bf16
   autocast, backward, gradient clipping, fused Adam, EMA — no host sync inside the step. Images/s,
   achieved TFLOP/s (FLOPs counted by `torch.utils.flop_counter` on one step) and MFU against (1),
   peak memory.
3. bf16 vs fp32 loss on the same batch, noise and weights: their relative difference.
4. Sampling `natural-64-256`, 64→256, DPM-Solver++(2M) at `--sample-steps` steps, bf16 autocast:
   images/s at `--sample-batch`.
5. bf16 vs fp32 samples of the same noise: PSNR between them (≥ 40 dB wanted), on `--model` (a
   model directory, e.g. the quickstart's champion) when given, else on `natural-64-256` with random
   weights and a randomised output layer (so that its output depends on its input).

The last thing printed is the table; `--out DIR` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sr3model import SR3, override, preset  # noqa: E402
from sr3model.ema import EMA  # noqa: E402
from sr3model.metrics import psnr  # noqa: E402
from sr3model.model import autocast  # noqa: E402
from sr3model.training import make_optimizer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(device: torch.device) -> tuple[float, str]:
    dtype, n = (torch.bfloat16, 8192) if device.type == "cuda" else (torch.float32, 1024)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / median_time(lambda: a @ b, device, 10), str(dtype).removeprefix("torch.")


def training_step(model: SR3, batch: int, device: torch.device, precision: str):
    """A closure running one optimiser step on a fixed random batch; no host sync inside."""
    cfg = model.config
    g = torch.Generator(device=device).manual_seed(0)
    hr = torch.rand(batch, 3, cfg.hr_size, cfg.hr_size, device=device, generator=g) * 2 - 1
    lr = torch.rand(batch, 3, cfg.lr_size, cfg.lr_size, device=device, generator=g) * 2 - 1
    optimizer = make_optimizer(model, cfg.train)
    ema = EMA(model.net, cfg.train.ema_decay)
    noise = torch.Generator(device=device).manual_seed(1)

    def step() -> torch.Tensor:
        with autocast(device, precision):
            loss = model(hr, lr, generator=noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        ema.update(model.net)
        return loss.detach()
    return step


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def largest_batch(name: str, sets: list[str], device: torch.device, start: int, limit: int) -> int:
    """The largest power-of-two batch (≥ start, ≤ limit) whose training step fits in memory."""
    best, batch = 0, start
    while batch <= limit:
        model = SR3(override(preset(name), sets)).to(device).train()
        try:
            step = training_step(model, batch, device, "auto")
            step(), step()
            sync(device)
            best, batch = batch, batch * 2
        except torch.OutOfMemoryError:
            break
        finally:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return best


def train_row(name: str, sets: list[str], device: torch.device, args, peak: float) -> dict:
    batch = args.batch or largest_batch(name, sets, device, args.min_batch, args.max_batch)
    if not batch:
        return {"preset": name, "error": f"batch {args.min_batch} does not fit"}
    torch.manual_seed(0)
    model = SR3(override(preset(name), sets)).to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # FLOPs are linear in the batch; counting at batch 1 keeps the counter's decomposed ops (which
    # hold more memory than the real step) from running out of memory at the largest batch.
    flops = count_flops(training_step(model, 1, device, "auto")) * batch
    step = training_step(model, batch, device, "auto")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = median_time(step, device, args.repeats)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    params = sum(p.numel() for p in model.net.parameters())
    return {"preset": name, "params_m": params / 1e6, "batch": batch, "step_s": seconds,
            "images_per_s": batch / seconds, "tflops": flops / seconds / 1e12, "mfu": flops / seconds / peak,
            "peak_gib": memory, "checkpointing": model.config.unet.checkpointing}


def loss_agreement(name: str, sets: list[str], device: torch.device, batch: int) -> dict:
    torch.manual_seed(0)
    model = SR3(override(preset(name), sets)).to(device).train()
    randomise_output(model)
    cfg = model.config
    g = torch.Generator(device=device).manual_seed(0)
    hr = torch.rand(batch, 3, cfg.hr_size, cfg.hr_size, device=device, generator=g) * 2 - 1
    lr = torch.rand(batch, 3, cfg.lr_size, cfg.lr_size, device=device, generator=g) * 2 - 1
    losses = {}
    for precision in ("fp32", "bf16"):
        with torch.no_grad(), autocast(device, precision):
            losses[precision] = float(model(hr, lr, generator=torch.Generator(device=device).manual_seed(5)))
    return {"fp32": losses["fp32"], "bf16": losses["bf16"],
            "relative": abs(losses["bf16"] - losses["fp32"]) / abs(losses["fp32"])}


def randomise_output(model: SR3) -> None:
    """A fresh U-Net's output convolution is zero; give it small random weights."""
    with torch.no_grad():
        for parameter in model.net.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.normal_(std=0.02)


def sampling_rows(name: str, device: torch.device, args) -> tuple[dict, dict]:
    if args.model:
        from sr3model.weights import load_model

        model, label = load_model(args.model, device=device), args.model
    else:
        torch.manual_seed(0)
        model, label = SR3(preset(name)).to(device).eval(), f"{name} (random weights)"
        randomise_output(model)
    cfg = model.config
    lr = torch.rand(args.sample_batch, 3, cfg.lr_size, cfg.lr_size, device=device,
                    generator=torch.Generator(device=device).manual_seed(0)) * 2 - 1
    schedule = model.inference_schedule(args.sample_steps)

    def run(precision: str) -> torch.Tensor:
        return model.super_resolve(lr, sampler="dpmpp-2m", schedule=schedule, precision=precision,
                                   generator=torch.Generator(device=device).manual_seed(1))[:, 0]
    seconds = median_time(lambda: run("auto"), device, max(1, args.repeats // 2), warmup=1)
    speed = {"model": label, "task": f"{cfg.lr_size}->{cfg.hr_size}", "sampler": f"dpmpp-2m {args.sample_steps}",
             "batch": args.sample_batch, "images_per_s": args.sample_batch / seconds}
    fp32, bf16 = run("fp32"), run("bf16")
    return speed, {"model": label, "psnr_db": float(psnr(bf16, fp32).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run of the same code)")
    parser.add_argument("--model", help="model directory for the bf16-vs-fp32 sampling PSNR")
    parser.add_argument("--batch", type=int, help="training batch (default: the largest power of two that fits)")
    parser.add_argument("--min-batch", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--sample-batch", type=int, default=32)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--budget-s", type=float, default=270)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    presets = [("natural-64-256", []), ("faces-64-512", ["unet.checkpointing=true"])]
    sample_preset = "natural-64-256"
    if args.quick:  # the same code at sizes a CPU runs in seconds
        presets = [("tiny", []), ("tiny", ["unet.checkpointing=true"])]
        sample_preset = "tiny"
        args.batch, args.repeats, args.sample_batch, args.sample_steps = args.batch or 2, 2, 2, 3
        args.min_batch, args.max_batch = 1, 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}",
          flush=True)
    peak, peak_dtype = matmul_rate(device)
    report: dict = {"matmul": {"dtype": peak_dtype, "tflops": peak / 1e12}, "train": [], "skipped": []}
    for name, sets in presets:
        if time.perf_counter() - start > args.budget_s * 0.7:
            report["skipped"].append(f"training {name}: over the time budget")
            continue
        try:
            report["train"].append(train_row(name, sets, device, args, peak))
        except torch.OutOfMemoryError as error:
            report["train"].append({"preset": name, "error": f"out of memory: {str(error)[:80]}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(report["train"][-1], flush=True)
    report["loss"] = loss_agreement(presets[0][0], presets[0][1], device, 4 if not args.quick else 2)
    if time.perf_counter() - start < args.budget_s * 0.85:
        report["sampling"], report["sampling_psnr"] = sampling_rows(sample_preset, device, args)
    else:
        report["skipped"].append("sampling: over the time budget")
    report["seconds"] = time.perf_counter() - start
    lines = [f"matmul ceiling: {report['matmul']['tflops']:.1f} TFLOP/s ({peak_dtype})",
             "| preset | params | batch | images/s | TFLOP/s | MFU | peak GiB | checkpointing |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["train"]:
        lines.append(f"| {r['preset']} | " + ("error: " + r["error"] if "error" in r else
                     f"{r['params_m']:.0f}M | {r['batch']} | {r['images_per_s']:.1f} | {r['tflops']:.1f} | "
                     f"{r['mfu']:.1%} | {r['peak_gib']:.1f} | {r['checkpointing']} |"))
    lo = report["loss"]
    lines.append(f"loss on one batch: fp32 {lo['fp32']:.5f}, bf16 {lo['bf16']:.5f} (relative {lo['relative']:.2e})")
    if "sampling" in report:
        s, q = report["sampling"], report["sampling_psnr"]
        lines.append(f"sampling {s['task']}, {s['sampler']}, batch {s['batch']}: {s['images_per_s']:.2f} images/s")
        lines.append(f"bf16 vs fp32 samples ({q['model']}): PSNR {q['psnr_db']:.1f} dB")
    lines += [f"skipped: {item}" for item in report["skipped"]]
    lines.append(f"{report['seconds']:.0f} s in all")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
