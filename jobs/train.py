"""Train SR3 with Ray Train (DDP), MLflow tracking and the model registry (see pipelines/train/).

    python jobs/train.py --pairs gs://bkt/pairs/ffhq-16-128 --preset faces-16-128 \\
        --steps 1000000 --batch-size 256 --num-workers 8 --use-gpu --storage gs://bkt/runs \\
        --run-name faces-16-128-a --register sr3-faces --alias champion

Checkpoints every 5000 steps or 30 minutes, whichever comes first (--checkpoint-every N: every N
steps), the last 3 kept. Rerunning with the same --run-name and --storage continues from the latest
checkpoint and the same MLflow run; a run that already reached --steps trains nothing more. With
--register the new version takes --alias only if it is shown to be no worse than the version holding
it: no worse on the guards (LR-PSNR, colour error, detail ratio, flat-region noise) by a paired
bootstrap over the val pairs, and better on one (pipelines/train/compare.py; --promote-metric: one
metric decides; --force-alias moves it anyway). Runs on the Ray cluster named
by --ray-address or RAY_ADDRESS (as under `ray job submit`), else on a local Ray started for the run.
MLflow: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the current directory. A bad input (an
unknown preset, pairs that are missing or not committed, a bad --set) is one `train: error:` line.

Speed: --batch-size is the global batch; --micro-batch N accumulates gradients over micro-batches of
N images per worker (the same update as the whole batch, less memory). Batches travel as uint8 and
are normalised on the device; metrics are read every --log-every steps (no per-step host sync);
checkpoints upload in the background. --compile and --channels-last are for CUDA (no-ops on CPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pipelines.runtime import add_shared_fs_flag

    parser = argparse.ArgumentParser(description="Train SR3 with Ray Train and MLflow.")
    parser.add_argument("--pairs", required=True, help="jobs/build_pairs.py output URI (train/, val/)")
    parser.add_argument("--preset", required=True, help="config preset, e.g. tiny, faces-16-128")
    parser.add_argument("--objective", choices=("sr3", "regression", "residual", "unconditional"),
                        help="default: the preset's (residual: diffuse HR − bicubic, README \"Quality\")")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's method: objective sr3, ε-prediction, linear β training levels, DDPM, "
                             "no LR-consistency projection (sr3model.config.papers_method)")
    parser.add_argument("--steps", type=int, default=1000, help="total optimiser steps of the run")
    parser.add_argument("--batch-size", type=int, help="global batch size (default: the preset's), split evenly "
                                                        "over --num-workers")
    parser.add_argument("--micro-batch", type=int, metavar="N",
                        help="gradient accumulation: each worker runs its batch (global / workers) in micro-batches "
                             "of N images and steps once with the whole batch's gradient (DDP syncs on the last); "
                             "less activation memory, the same update (default: the whole per-worker batch)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the U-Net (CUDA only: on CPU a note and no effect; measured slower "
                             "there). Off by default")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels_last memory format for weights and batches (CUDA only: on CPU a note and "
                             "no effect; measured slower there). Off by default")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--cpus-per-worker", type=float, help="default 0.5 on CPU, 1 with GPUs")
    parser.add_argument("--storage", help="checkpoint root URI (local, gs://, s3://); default ~/ray_results, "
                                          "refused on a multi-node cluster")
    add_shared_fs_flag(parser, "--storage/--pairs/--val-pairs")
    parser.add_argument("--checkpoint-every", type=int,
                        help="checkpoint every N steps (default: every 5000 steps or 30 minutes, whichever first)")
    parser.add_argument("--checkpoint-minutes", type=float,
                        help="also checkpoint when this many minutes passed since the last (default 30 without "
                             "--checkpoint-every; 0: never by time)")
    parser.add_argument("--keep-checkpoints", type=int, default=3, help="latest checkpoints kept (default 3)")
    parser.add_argument("--shuffle-buffer", type=int, default=0,
                        help="rows in each worker's shuffle buffer (default: 16 batches, at least 256)")
    parser.add_argument("--val-every", type=int, default=0, help="steps; 0: validate at the end only")
    parser.add_argument("--val-images", type=int, default=4)
    parser.add_argument("--val-pairs", help="pairs URI whose val/ split validation and the promotion gate use "
                                            "(default: --pairs), e.g. pairs of held-out photos")
    parser.add_argument("--val-steps", type=int, default=10, help="DDIM steps of validation sampling")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--max-failures", type=int, default=3, help="worker failures to recover from")
    parser.add_argument("--run-name", help="rerun with the same name to resume")
    parser.add_argument("--resume-from", metavar="CHECKPOINT",
                        help="start this new run from another run's checkpoint URI (a fork: weights, EMA, "
                             "optimizer, step, RNG and data position), e.g. to change --set train.lr from step k")
    parser.add_argument("--experiment", default="sr3", help="MLflow experiment")
    parser.add_argument("--register", help="registered model name")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--promote-metric",
                        help="one metric of jobs/evaluate.py's table decides the gate (default: the guards — no worse "
                             "than the holder on LR-PSNR, colour error, detail ratio and flat-region noise, with 95%% "
                             "confidence, and better on one; pipelines/train/compare.py)")
    parser.add_argument("--promote-limit", type=int, default=64, help="val pairs the gate evaluates (default 64)")
    parser.add_argument("--promote-steps", type=int, help="refinement steps of the gate's sampling for both "
                                                          "versions (default: each version's own)")
    parser.add_argument("--promote-samples", type=int, default=2, help="outputs per val pair the gate compares "
                                                                       "(default 2, each its own seed)")
    parser.add_argument("--force-alias", action="store_true",
                        help="move --alias to the new version without comparing")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set train.lr=2e-4; repeatable")
    parser.add_argument("--ray-address", default=None, help="default: RAY_ADDRESS, else a local Ray")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_job

    return run_job("train", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from pipelines.cli import from_args
    from pipelines.train import TrainOptions, build_config, train
    from pipelines.train.promote import GateConfig

    config = build_config(args.preset, args.objective, args.overrides, args.batch_size, paper=args.paper)
    gate = GateConfig(metric=args.promote_metric, limit=args.promote_limit, steps=args.promote_steps,
                      samples=args.promote_samples, force=args.force_alias)
    result = train(args.pairs, config, from_args(TrainOptions, args, storage_uri=args.storage, gate=gate))
    print(f"run {result.run_name}: {result.steps} steps in {result.seconds:.0f} s"
          f"{' (resumed)' if result.resumed else ''}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"mlflow: {result.tracking_uri} experiment {result.experiment} run {result.run_id}")
    shown = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}
    if shown:
        print(f"final metrics: {shown}")
    if result.model_uri:
        print(f"model: {result.model_uri}" + (f" (version {result.registered_version})"
                                              if result.registered_version else ""))
    if result.promotion is not None:
        print(f"alias {args.alias}: {'moved' if result.promotion.moved else 'not moved'}: {result.promotion.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
