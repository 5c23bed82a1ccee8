"""Build LR/HR pairs from image buckets into Parquet shards (see pipelines/pairs/build.py).

    python jobs/build_pairs.py --input gs://bkt/ffhq --output gs://bkt/pairs/ffhq-64-256 \\
        --recipe faces --hr-size 256 --scale 4

Each run writes a new version under OUTPUT/versions/ and commits it by writing OUTPUT/_SUMMARY.json
last (pipelines/pairs/store.py); a build that fails, or in which no file gave a pair or too many
reads failed, commits nothing and leaves the previous dataset as it was. Runs on the Ray cluster
named by --ray-address or RAY_ADDRESS (as under `ray job submit`), else on a local Ray.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

MAX_REJECT_LINES = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pipelines.runtime import add_shared_fs_flag

    parser = argparse.ArgumentParser(description="Build SR3 LR/HR pairs with Ray Data.")
    parser.add_argument("--input", action="append", required=True, help="folder or file URI; repeatable")
    parser.add_argument("--output", required=True, help="output folder URI")
    parser.add_argument("--recipe", required=True, choices=("faces", "imagenet", "patches"))
    parser.add_argument("--hr-size", type=int, required=True, help="HR side in pixels")
    parser.add_argument("--scale", type=int, required=True, help="LR = HR / scale")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--patches-per-image", type=int, default=16, help="patches recipe only")
    parser.add_argument("--seed", type=int, default=0, help="patch positions")
    parser.add_argument("--limit", type=int, default=None, help="first N files (sorted by key) only")
    parser.add_argument("--max-read-errors", type=float, default=0.05,
                        help="fraction of files that may fail to read (after retries) before the build "
                             "is refused and nothing is committed (default 0.05)")
    parser.add_argument("--keep-versions", type=int, default=2,
                        help="committed versions kept: the new one and the previous ones (default 2)")
    parser.add_argument("--ray-address", default=None, help="default: RAY_ADDRESS, else a local Ray")
    add_shared_fs_flag(parser, "--input/--output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_job

    return run_job("build_pairs", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from pipelines.pairs.build import build_pairs
    from pipelines.pairs.store import read_part

    summary = build_pairs(args.input, args.output, args.recipe, args.hr_size, args.scale,
                          val_fraction=args.val_fraction, patches_per_image=args.patches_per_image, seed=args.seed,
                          limit=args.limit, max_read_errors=args.max_read_errors, keep_versions=args.keep_versions,
                          ray_address=args.ray_address, shared_fs=args.shared_fs)
    rejects = read_part(args.output, "rejects").to_pylist()
    for row in rejects[:MAX_REJECT_LINES]:
        print(f"rejected {row['source']}: {row['reason']} ({row['detail']})")
    if len(rejects) > MAX_REJECT_LINES:
        print(f"... and {len(rejects) - MAX_REJECT_LINES} more in the rejects/ part of version {summary['version']}")
    reasons = ", ".join(f"{reason} {count}" for reason, count in summary["rejected_by_reason"].items())
    print(f"build_pairs: committed version {summary['version']} (fingerprint {summary['fingerprint']}); "
          f"kept: {', '.join([summary['version'], *summary['history']])}")
    print(
        f"build_pairs: {summary['listed']} files -> {summary['pairs']} pairs "
        f"(train {summary['train']}, val {summary['val']}), {summary['rejected']} rejected"
        f"{f' ({reasons})' if reasons else ''} in {summary['elapsed_s']:.1f}s "
        f"({summary['files_per_s']:.1f} files/s); output: {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
