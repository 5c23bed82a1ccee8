"""Evaluate a model on held-out pairs against bicubic and baselines (see pipelines/eval/run.py).

    python jobs/evaluate.py --model models:/sr3-faces@champion --pairs gs://bkt/pairs/ffhq-16-128 \\
        --steps 100 --samples 4 --baseline models:/sr3-faces-regression@champion --limit 256 \\
        --report gs://bkt/reports/faces-v3 --fid-weights /weights/pt_inception-2015-12-05-6726825d.pth

Writes REPORT/metrics.json ({method: {metric: value}, "_meta": ...}) and REPORT/index.html (metric
table, image grid LR | bicubic | baselines | samples | HR), and logs them to an MLflow run
(experiment sr3-eval) tagged with the model version. FID/IS and LPIPS need local weight files
(--fid-weights / SR3_FID_WEIGHTS, --lpips-weights / SR3_LPIPS_WEIGHTS); nothing is downloaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from pipelines.cli import add_consistency_flag  # noqa: E402
from pipelines.runtime import add_sampling_worker_flags  # noqa: E402
from sr3model.config import EXTRA_METRICS, SAMPLER_NAMES  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate an SR model on the val split of a pairs dataset.")
    parser.add_argument("--model", required=True,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a model directory")
    parser.add_argument("--pairs", required=True, help="jobs/build_pairs.py output URI (its val/ split is used)")
    parser.add_argument("--steps", type=int, help="refinement steps K (default: the model's)")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, help="default: the model's")
    parser.add_argument("--schedule", metavar="START,END",
                        help="linear β schedule of --model, e.g. 1e-4,0.2 (default: stored by the search, else config)")
    parser.add_argument("--samples", type=int, default=1, help="samples per pair (N > 1 adds diversity σ)")
    parser.add_argument("--baseline", action="append", default=[], metavar="URI", nargs="+",
                        help="baseline model(s) to compare, e.g. a regression model; repeatable")
    parser.add_argument("--limit", type=int, help="evaluate only the first N val pairs (by key)")
    parser.add_argument("--report", help="report folder or URI (default: reports/eval-<timestamp>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metrics", nargs="+", choices=EXTRA_METRICS,
                        help="perceptual metrics besides PSNR/SSIM/consistency/LR-PSNR/diversity "
                             "(default: those whose weights are given)")
    parser.add_argument("--fid-weights", help="local Inception weights for FID/IS (or SR3_FID_WEIGHTS)")
    parser.add_argument("--lpips-weights", help="local torchvision AlexNet weights for LPIPS (or SR3_LPIPS_WEIGHTS)")
    parser.add_argument("--experiment", default="sr3-eval", help="MLflow experiment")
    parser.add_argument("--run-name", help="MLflow run name (default: eval-<model>-<timestamp>)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per network call")
    parser.add_argument("--grid-rows", type=int, default=8, help="pairs shown in the report's image grid (default 8)")
    add_consistency_flag(parser)
    add_sampling_worker_flags(parser, output_format=False)
    args = parser.parse_args(argv)
    args.baseline = [uri for group in args.baseline for uri in group]
    return args


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_job

    return run_job("evaluate", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from pipelines.cli import from_args
    from pipelines.eval.run import EvalOptions, evaluate

    def say(message: str) -> None:
        print(f"evaluate: {message}", flush=True)

    options = from_args(EvalOptions, args, baselines=tuple(args.baseline), report_uri=args.report,
                        metrics=tuple(args.metrics) if args.metrics else None)
    result = evaluate(args.model, args.pairs, options, say=say)
    say(f"report: {result.report}/index.html (metrics.json beside it)")
    say(f"mlflow: {result.tracking_uri} experiment {args.experiment} run {result.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
