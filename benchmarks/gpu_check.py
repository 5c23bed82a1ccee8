"""The prepared GPU check: training throughput and MFU, bf16 correctness, few-step sampling speed.

    python benchmarks/gpu_check.py                      # on a CUDA machine: the whole check, < 5 min
    python benchmarks/gpu_check.py --model quickstart/model --out $OUT
    python benchmarks/gpu_check.py --quick --device cpu # the same code on a CPU, tiny sizes (a test runs it)

Pure `sr3model` + torch: the lent GPU machines have torch but no Ray, MLflow or network. Sections,
each under a share of `--budget-s` (later sections are skipped, and say so, when time runs out):

1. Matmul ceiling: the best rate (fastest of the repeats) of a square matrix product in the
   training's dtype — bf16 4096² and 8192² on CUDA, fp32 512²…2048² on CPU — measured before and
   after the training rows, the highest kept: the denominator of MFU, measured rather than read off
   a datasheet, and an upper bound even on a machine whose load comes and goes.
2. Training, per preset (`natural-64-256`; `faces-64-512` with activation checkpointing): the
   largest power-of-two batch that fits (doubling until CUDA runs out of memory, then the last that
   fit), then the median time of a training step at that batch: Algorithm 1's loss under bf16
   autocast, backward, gradient clipping, fused Adam, EMA — no host sync inside the step. Images/s,
   peak memory, and two utilisations against (1), from FLOPs counted by `torch.utils.flop_counter`:
   MFU with the model's FLOPs (the step without activation checkpointing: recomputation is not
   model work) and HFU with the FLOPs the step executes (recomputation included).
3. bf16 vs fp32 loss on the same batch, noise and weights: their relative difference.
4. Sampling `natural-64-256`, 64→256, DPM-Solver++(2M) at `--sample-steps` steps, bf16 autocast:
   images/s at `--sample-batch`.
5. bf16 vs fp32 samples of the same noise: PSNR between them (≥ 40 dB wanted), on `--model` (a
   model directory, e.g. the quickstart's champion) when given, else on `natural-64-256` with random
   weights and a randomised output layer (so that its output depends on its input).

The last thing printed is the table; `--out DIR` also writes it as JSON.

The figures are checked against physics before they are printed (`impossible_figures`): a step
cannot execute FLOPs faster than the measured matmul ceiling (HFU ≤ 100%, hence MFU ≤ 100%), a
training step costs about three forward passes (backward ≈ two; counted: 2.99× for `tiny`), and
recomputation adds at most one forward. Any violation means a wrong FLOP count or ceiling: the
check prints it under IMPOSSIBLE and exits with status 1. `--flops-scale 2` doubles the counted
step FLOPs on purpose, to see the check refuse them (tests/test_gpu_check.py).
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


def timings(fn, device: torch.device, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds of `repeats` synchronised calls of `fn`, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median_time(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    return statistics.median(timings(fn, device, repeats, warmup))


def best_time(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    return min(timings(fn, device, repeats, warmup))


def matmul_rate(device: torch.device) -> tuple[float, str]:
    """The highest FLOP/s of a square matrix product in the training's dtype (the MFU ceiling)."""
    dtype, sizes = (torch.bfloat16, (4096, 8192)) if device.type == "cuda" else (torch.float32, (512, 1024, 2048))
    rates = []
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        rates.append(2 * n ** 3 / best_time(lambda: a @ b, device, 10))
        del a, b
    return max(rates), str(dtype).removeprefix("torch.")


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


def forward_flops(model: SR3, device: torch.device) -> int:
    """FLOPs of one training forward pass (Algorithm 1's loss) at batch 1."""
    cfg = model.config
    g = torch.Generator(device=device).manual_seed(0)
    hr = torch.rand(1, 3, cfg.hr_size, cfg.hr_size, device=device, generator=g) * 2 - 1
    lr = torch.rand(1, 3, cfg.lr_size, cfg.lr_size, device=device, generator=g) * 2 - 1
    with torch.no_grad(), autocast(device, "auto"):
        return count_flops(lambda: model(hr, lr, generator=torch.Generator(device=device).manual_seed(1)))


def flop_counts(name: str, sets: list[str], device: torch.device, scale: float) -> dict:
    """Per image: the step's executed FLOPs, the model's (the same step without checkpointing) and
    one forward pass's. FLOPs are linear in the batch; counting at batch 1 keeps the counter's
    decomposed ops (which hold more memory than the real step) from running out of memory.
    `scale` multiplies the two step counts: a deliberate fault (--flops-scale)."""
    counts = {}
    for key, extra in (("hardware", []), ("model", ["unet.checkpointing=false"])):
        torch.manual_seed(0)
        model = SR3(override(preset(name), sets + extra)).to(device).train()
        counts[key] = count_flops(training_step(model, 1, device, "auto")) * scale
    counts["forward"] = forward_flops(model, device)
    del model
    return counts


def train_row(name: str, sets: list[str], device: torch.device, args) -> dict:
    batch = args.batch or largest_batch(name, sets, device, args.min_batch, args.max_batch)
    if not batch:
        return {"preset": name, "error": f"batch {args.min_batch} does not fit"}
    counts = flop_counts(name, sets, device, args.flops_scale)
    torch.manual_seed(0)
    model = SR3(override(preset(name), sets)).to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step = training_step(model, batch, device, "auto")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = median_time(step, device, args.repeats)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    params = sum(p.numel() for p in model.net.parameters())
    return {"preset": name, "params_m": params / 1e6, "batch": batch, "step_s": seconds,
            "images_per_s": batch / seconds, "model_flops": counts["model"] * batch,
            "hardware_flops": counts["hardware"] * batch, "forward_flops": counts["forward"] * batch,
            "tflops": counts["hardware"] * batch / seconds / 1e12, "peak_gib": memory,
            "checkpointing": model.config.unet.checkpointing}


def utilisation(report: dict) -> None:
    """MFU and HFU of each training row against the matmul ceiling (filled in place)."""
    peak = report["matmul"]["tflops"] * 1e12
    for row in report["train"]:
        if "error" not in row:
            row["mfu"] = row["model_flops"] / row["step_s"] / peak
            row["hfu"] = row["hardware_flops"] / row["step_s"] / peak


STEP_PER_FORWARD = (2.5, 3.5)  # a training step ≈ forward + backward (≈ 2 forwards); tiny: 2.99
RECOMPUTE = (1.0, 1.5)  # executed / model FLOPs: checkpointing re-runs at most one forward (tiny: 1.24)


def impossible_figures(report: dict) -> list[str]:
    """The figures physics rules out; each one means a wrong FLOP count or a wrong ceiling."""
    problems = []
    ceiling = report["matmul"]["tflops"]
    for row in report["train"]:
        if "error" in row:
            continue
        name = f"{row['preset']}{' (checkpointing)' if row['checkpointing'] else ''}"
        if row["hfu"] > 1 or row["mfu"] > 1:
            problems.append(f"{name}: {row['tflops']:.2f} TFLOP/s executed (HFU {row['hfu']:.0%}, MFU "
                            f"{row['mfu']:.0%}) exceeds the measured matmul ceiling {ceiling:.2f} TFLOP/s: "
                            "no step runs faster than the machine's best matrix product")
        ratio = row["model_flops"] / row["forward_flops"]
        if not STEP_PER_FORWARD[0] <= ratio <= STEP_PER_FORWARD[1]:
            problems.append(f"{name}: the counted training step is {ratio:.2f}× its forward pass; forward + "
                            f"backward is about 3× ({STEP_PER_FORWARD[0]}–{STEP_PER_FORWARD[1]}): the FLOP count is wrong")
        recompute = row["hardware_flops"] / row["model_flops"]
        if not RECOMPUTE[0] <= recompute <= RECOMPUTE[1]:
            problems.append(f"{name}: executed FLOPs are {recompute:.2f}× the model's; recomputation adds "
                            f"at most one forward ({RECOMPUTE[0]}–{RECOMPUTE[1]}×)")
    return problems


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


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--flops-scale", type=float, default=1.0,
                        help="multiply the counted step FLOPs (a deliberate fault: the check must refuse 2)")
    args = parser.parse_args(argv)
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
    report: dict = {"matmul": {"dtype": peak_dtype}, "train": [], "skipped": []}
    for name, sets in presets:
        if time.perf_counter() - start > args.budget_s * 0.7:
            report["skipped"].append(f"training {name}: over the time budget")
            continue
        try:
            report["train"].append(train_row(name, sets, device, args))
        except torch.OutOfMemoryError as error:
            report["train"].append({"preset": name, "error": f"out of memory: {str(error)[:80]}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(report["train"][-1], flush=True)
    peak = max(peak, matmul_rate(device)[0])  # again after the rows: the higher of two measurements
    report["matmul"]["tflops"] = peak / 1e12
    utilisation(report)
    report["problems"] = impossible_figures(report)
    report["loss"] = loss_agreement(presets[0][0], presets[0][1], device, 4 if not args.quick else 2)
    if time.perf_counter() - start < args.budget_s * 0.85:
        report["sampling"], report["sampling_psnr"] = sampling_rows(sample_preset, device, args)
    else:
        report["skipped"].append("sampling: over the time budget")
    report["seconds"] = time.perf_counter() - start
    lines = [f"matmul ceiling: {report['matmul']['tflops']:.3g} TFLOP/s ({peak_dtype})",
             "| preset | params | batch | images/s | TFLOP/s | MFU | HFU | peak GiB | checkpointing |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["train"]:
        lines.append(f"| {r['preset']} | " + ("error: " + r["error"] if "error" in r else
                     f"{r['params_m']:.0f}M | {r['batch']} | {r['images_per_s']:.1f} | {r['tflops']:.3g} | "
                     f"{r['mfu']:.1%} | {r['hfu']:.1%} | {r['peak_gib']:.1f} | {r['checkpointing']} |"))
    lo = report["loss"]
    lines.append(f"loss on one batch: fp32 {lo['fp32']:.5f}, bf16 {lo['bf16']:.5f} (relative {lo['relative']:.2e})")
    if "sampling" in report:
        s, q = report["sampling"], report["sampling_psnr"]
        lines.append(f"sampling {s['task']}, {s['sampler']}, batch {s['batch']}: {s['images_per_s']:.2f} images/s")
        lines.append(f"bf16 vs fp32 samples ({q['model']}): PSNR {q['psnr_db']:.1f} dB")
    lines += [f"skipped: {item}" for item in report["skipped"]]
    lines.append(f"{report['seconds']:.0f} s in all")
    lines += [f"IMPOSSIBLE: {problem}" for problem in report["problems"]]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print("\n".join(lines))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
