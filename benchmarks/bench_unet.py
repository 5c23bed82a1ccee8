"""Training-step and refinement-step speed of the SR3 U-Net, baseline and optimised, same run.

    python benchmarks/bench_unet.py --preset peer-128 --batch-size 2
    python benchmarks/bench_unet.py --preset natural-64-256 --batch-size 16 --device cuda

Both variants run the same model, batch and machine:
- baseline: eager PyTorch, fp32, NCHW (contiguous) — the plain way to run the model;
- optimised: channels_last memory format (oneDNN's preferred layout on CPU), SDPA attention, and
  on CUDA bf16 autocast, TF32 and fused Adam; `--compile` adds `torch.compile`.
A training step is forward + backward + Adam step of `SR3.forward` (Algorithm 1's loss); a
refinement step is one `ddpm_step` of Algorithm 2 (one network forward, no gradients).
FLOPs come from `torch.utils.flop_counter`; on CUDA the achieved rate is compared with a measured
bf16 matmul rate (MFU). The peer figures quoted are those the project measured for the most-used
open SR3 implementation at `peer-128`, B=2, on 2 CPU cores: 3.97 s per training step and 1.06 s
per forward pass.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sr3model import SR3, override, preset  # noqa: E402
from sr3model.samplers import ddpm_step  # noqa: E402
from sr3model.training import make_optimizer  # noqa: E402

PEER = {"train_s": 3.97, "forward_s": 1.06}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def make_steps(model: SR3, batch: int, device: torch.device, optimised: bool):
    cfg = model.config
    fmt = torch.channels_last if optimised else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt)
    hr = torch.rand(batch, 3, cfg.hr_size, cfg.hr_size, device=device).mul(2).sub(1).contiguous(memory_format=fmt)
    lr = torch.rand(batch, 3, cfg.lr_size, cfg.lr_size, device=device).mul(2).sub(1)
    opt = make_optimizer(model, cfg.train)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if optimised and device.type == "cuda"
           else contextlib.nullcontext())
    forward = model
    denoise = model.denoiser()
    if optimised and ARGS.compile:
        forward = torch.compile(model)
        net = torch.compile(model.net)
        denoise = lambda x, y, g: net(model.network_input(x, y), g)  # noqa: E731
    x = model.condition(lr) if cfg.conditional else None
    y_t = torch.randn_like(hr)
    sched = model.inference_schedule(steps=100)

    def train_step():
        model.train()
        with amp:
            loss = forward(hr, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def refine_step():
        model.eval()
        with amp:
            ddpm_step(denoise, x, y_t, sched.alphas[50], sched.gammas[50], torch.randn_like(y_t))

    return train_step, refine_step


def matmul_rate(device: torch.device) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / _time(lambda: a @ b, device, 5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="peer-128")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also torch.compile the optimised variant")
    p.add_argument("--skip-baseline", action="store_true", help="time only the optimised variant")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    global ARGS
    ARGS = p.parse_args()
    device = torch.device(ARGS.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    config = override(preset(ARGS.preset), ARGS.set)
    torch.manual_seed(0)
    model = SR3(config)
    n_params = sum(p.numel() for p in model.net.parameters())
    print(f"preset {config.name}: {n_params / 1e6:.1f}M parameters, {config.lr_size}->{config.hr_size}, "
          f"B={ARGS.batch_size}, device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    train_step, refine_step = make_steps(model, ARGS.batch_size, device, optimised=False)
    flops_train, flops_refine = _flops(train_step), _flops(refine_step)
    print(f"FLOPs: training step {flops_train / 1e9:.1f} G, refinement step {flops_refine / 1e9:.1f} G")
    results = {}
    for name in (["baseline"] if not ARGS.skip_baseline else []) + ["optimised"]:
        train_step, refine_step = make_steps(model, ARGS.batch_size, device, optimised=name == "optimised")
        t_train, t_refine = _time(train_step, device, ARGS.repeats), _time(refine_step, device, ARGS.repeats)
        results[name] = (t_train, t_refine)
        print(f"{name:>9}: training step {t_train * 1e3:8.1f} ms ({flops_train / t_train / 1e9:7.1f} GFLOP/s)"
              f" | refinement step {t_refine * 1e3:8.1f} ms ({flops_refine / t_refine / 1e9:7.1f} GFLOP/s)")
    if "baseline" in results:
        (bt, br), (ot, orf) = results["baseline"], results["optimised"]
        print(f"ratio optimised/baseline speed: training {bt / ot:.2f}x, refinement {br / orf:.2f}x")
    t_train, t_refine = results["optimised"]
    peak = matmul_rate(device)
    label = "bf16" if device.type == "cuda" else "fp32"
    print(f"measured {label} matmul rate {peak / 1e12:.2f} TFLOP/s; optimised training reaches "
          f"{flops_train / t_train / peak:.1%} of it (MFU), refinement {flops_refine / t_refine / peak:.1%}")
    if config.name == "peer-128" and ARGS.batch_size == 2 and device.type == "cpu":
        print(f"vs the peer implementation (3.97 s / 1.06 s quoted): training {PEER['train_s'] / t_train:.2f}x, "
              f"refinement {PEER['forward_s'] / t_refine:.2f}x faster per step")


if __name__ == "__main__":
    main()
