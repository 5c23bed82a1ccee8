"""Generate images with the paper's cascade: an unconditional base model, then SR stages
(see pipelines/infer/cascade.py).

    python jobs/cascade.py --base models:/faces-64@champion --stage models:/faces-64-256@champion \\
        --stage models:/faces-256-1024@champion --num-samples 1000 --output gs://bkt/cascade \\
        --steps 1000,100,100 --seed 0 --batch-size 8

OUTPUT/sample_<i>.<format> (last stage), OUTPUT/intermediate/stage<k>_<size>px/… with
--keep-intermediate, OUTPUT/_manifest/*.parquet and OUTPUT/_SUMMARY.json. Rerunning finishes only
the samples that are missing.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from pipelines.cli import add_consistency_flag  # noqa: E402
from pipelines.runtime import add_sampling_worker_flags  # noqa: E402


def _steps(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected K or K,K,… (one per model)") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Cascaded generation: unconditional base → SR stages.")
    parser.add_argument("--base", required=True, help="unconditional model URI (models:/…, runs:/…, directory)")
    parser.add_argument("--stage", action="append", required=True, help="SR model URI; repeat, lowest first")
    parser.add_argument("--num-samples", type=int, required=True)
    parser.add_argument("--output", required=True, help="output folder or bucket prefix")
    parser.add_argument("--steps", type=_steps, help="K for all models, or K,K,… base first (default: each model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--keep-intermediate", action="store_true", help="also write every stage's images")
    add_consistency_flag(parser)
    add_sampling_worker_flags(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_job

    return run_job("cascade", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from pipelines.infer.cascade import cascade

    summary = cascade(args.base, args.stage, args.num_samples, args.output, steps=args.steps, seed=args.seed,
                      batch_size=args.batch_size, fmt=args.format, keep_intermediate=args.keep_intermediate,
                      workers=args.workers, num_gpus_per_worker=args.num_gpus_per_worker, device=args.device,
                      ray_address=args.ray_address, consistency=args.consistency)
    print(f"cascade: {summary['done']} samples generated, {summary['skipped']} already done "
          f"({summary['images_written']} images written) in {summary['elapsed_s']:.1f}s; output: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
