"""Search the inference noise schedule per step budget (see pipelines/eval/search.py).

    python jobs/search_schedule.py --model models:/sr3-faces@champion --pairs gs://bkt/pairs/ffhq-16-128 \\
        --steps 25 50 100 --grid 5 --limit 32 --apply

For each K, tries --grid × --grid valid linear schedules (β_1 log-spaced in [1e-6, 1e-2], the first
level γ_K in [γ_T/100, γ_T] of the training schedule's last γ_T, β_K solved for) on the first --limit val pairs with the same noise seeds, scores them (default: FID
with --fid-weights / SR3_FID_WEIGHTS, else SSIM), logs every trial as a nested MLflow run and
plots the best score against K. --apply stores the best schedule per K with the model version, so
jobs/upscale.py uses it by default for those steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from pipelines.cli import add_consistency_flag  # noqa: E402
from pipelines.runtime import add_sampling_worker_flags  # noqa: E402
from sr3model.config import BASE_METRICS, EXTRA_METRICS, SAMPLER_NAMES  # noqa: E402

METRICS = (*BASE_METRICS, *EXTRA_METRICS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Grid-search the linear noise schedule's β_1, β_K per step budget.")
    parser.add_argument("--model", required=True,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a model directory")
    parser.add_argument("--pairs", required=True, help="jobs/build_pairs.py output URI (its val/ split is used)")
    parser.add_argument("--steps", type=int, nargs="+", required=True, metavar="K", help="step budgets to search")
    parser.add_argument("--metric", choices=METRICS,
                        help="score to optimise (default: fid with Inception weights, else ssim)")
    parser.add_argument("--grid", type=int, default=5, help="values per axis (N×N schedules per K)")
    parser.add_argument("--limit", type=int, default=32, help="val pairs to score on (the first N by key)")
    parser.add_argument("--apply", action="store_true",
                        help="store the best schedule per K with the model version (used by jobs/upscale.py)")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, help="default: the model's")
    parser.add_argument("--start-range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=(1e-6, 1e-2),
                        help="β_1 range (default 1e-6 1e-2)")
    parser.add_argument("--gamma-k-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="range of the first (noisiest) level γ_K; default: the training schedule's last "
                             "level γ_T and γ_T/100 (higher γ_K is refused: the start noise would not match)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed, the same for every trial")
    parser.add_argument("--fid-weights", help="local Inception weights for FID (or SR3_FID_WEIGHTS)")
    parser.add_argument("--lpips-weights", help="local torchvision AlexNet weights for LPIPS (or SR3_LPIPS_WEIGHTS)")
    parser.add_argument("--report", help="folder or URI for search.json and the plot "
                                         "(default: reports/search-<timestamp>)")
    parser.add_argument("--experiment", default="sr3-schedule-search", help="MLflow experiment")
    parser.add_argument("--run-name", help="MLflow parent run name (default: search-<model>-<timestamp>)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per network call")
    add_consistency_flag(parser)
    add_sampling_worker_flags(parser, output_format=False)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_job

    return run_job("search_schedule", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from pipelines.cli import from_args
    from pipelines.eval.search import SearchOptions, search

    def say(message: str) -> None:
        print(f"search_schedule: {message}", flush=True)

    options = from_args(SearchOptions, args, steps=None, grid_n=args.grid, start_range=tuple(args.start_range),
                        gamma_range=tuple(args.gamma_k_range) if args.gamma_k_range else None, report_uri=args.report)
    result = search(args.model, args.pairs, args.steps, options, say=say)
    for k, best in sorted(result.best.items()):
        say(f"K={k}: best {result.metric} {best['value']:.4g} with β {best['beta_start']:g}→{best['beta_end']:.6g}")
    if args.apply:
        say(f"stored: {result.stored}" if result.stored else "nothing stored (no trial had a score)")
    say(f"report: {result.report} (search.json, metric_vs_steps.png); mlflow run {result.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
