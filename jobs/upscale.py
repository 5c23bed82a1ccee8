"""Super-resolve every new image of a bucket with a registered model (see pipelines/infer/upscale.py).

    python jobs/upscale.py --model models:/sr3-natural@champion --input gs://bkt/photos \\
        --output gs://bkt/photos-x4 --steps 100 --sampler ddpm --batch-size 16 --workers 4

INPUT/a/b/name.ext → OUTPUT/a/b/name.<format> (name_s<k>.<format> when --samples > 1), plus
OUTPUT/_manifest/*.parquet, OUTPUT/_rejects/*.parquet and OUTPUT/_SUMMARY.json. Rerunning skips
what is done, so a scheduled run only processes new and changed images; outputs of another model
version or other settings are counted as stale and redone with --redo-stale (rules:
pipelines/infer/manifest.py). Sampling defaults come from the model (the schedule stored by
jobs/search_schedule.py --apply, else its config); flags override.

Outputs keep what the inputs had (pipelines/images/fidelity.py): transparency (--alpha keep|drop:
a fully opaque alpha kept or dropped), 16-bit depth (PNG/TIFF), the ICC profile (--colour keep:
converted back and embedded; srgb: sRGB, embedded), EXIF/XMP (--strip-metadata removes them and
the profile), greyscale; --format tiff too. An input the chosen format cannot hold (16 bits in
JPEG/WebP, transparency in JPEG) is refused unless --fallback convert.

Exit status: 0 when every image was written or rejected for what it is (not an image, …); 1 when
some failed to sample or write (out of memory, a sampling error: retried on the next run);
2 on an input error (one `upscale: error: …` line), also when inputs were refused for what --format
cannot hold (the rest are written).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from sr3model.config import SAMPLER_NAMES  # noqa: E402

from pipelines.cli import add_consistency_flag  # noqa: E402
from pipelines.runtime import add_sampling_worker_flags, add_shared_fs_flag  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Batch super-resolution of a bucket with Ray Data.")
    parser.add_argument("--model", required=True,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a model directory")
    parser.add_argument("--input", required=True, help="folder or bucket prefix of images (any fsspec URI)")
    parser.add_argument("--output", required=True, help="output folder or bucket prefix")
    parser.add_argument("--steps", type=int, help="refinement steps K (default: the model's)")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, help="default: the model's")
    parser.add_argument("--schedule", metavar="START,END", help="linear β schedule, e.g. 1e-4,0.2")
    parser.add_argument("--batch-size", type=int, default=8, help="images (or tiles) per network call")
    parser.add_argument("--samples", type=int, default=1, help="samples per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile", type=int, help="LR tile size for other sizes (default: the model's LR size)")
    parser.add_argument("--overlap", type=int, help="LR pixels shared by neighbouring tiles (default: tile/4)")
    parser.add_argument("--max-output-pixels", type=int, help="reject larger outputs (default 8192²)")
    parser.add_argument("--max-batch-pixels", type=int,
                        help="output pixels sampled together (× samples), default: a quarter of the actor's device "
                             "memory at ~120 bytes per pixel")
    parser.add_argument("--redo-stale", action="store_true",
                        help="redo outputs made by another model version or with other sampling settings")
    parser.add_argument("--alpha", choices=("keep", "drop"), default="keep",
                        help="a fully opaque alpha channel: keep it or drop it (an alpha that varies is always kept)")
    parser.add_argument("--colour", choices=("keep", "srgb"),
                        help="keep: outputs in the input's ICC profile, embedded; srgb: converted to sRGB, sRGB "
                             "embedded (default: keep; srgb with --strip-metadata)")
    parser.add_argument("--strip-metadata", action="store_true",
                        help="write no EXIF, XMP or ICC profile (outputs are then sRGB)")
    parser.add_argument("--fallback", choices=("refuse", "convert"), default="refuse",
                        help="an input --format cannot hold (16 bits in jpeg/webp, transparency in jpeg): refuse "
                             "it (exit status 2, the rest written) or write it converted (8 bits, alpha on white)")
    add_consistency_flag(parser)
    add_sampling_worker_flags(parser)
    add_shared_fs_flag(parser, "--input/--output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_job

    return run_job("upscale", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from pipelines.cli import from_args
    from pipelines.infer.upscale import UpscaleOptions, upscale

    summary = upscale(args.model, args.input, args.output, from_args(UpscaleOptions, args, fmt=args.format))
    reasons = ", ".join(f"{r} {n}" for r, n in summary["rejected_by_reason"].items())
    failures = ", ".join(f"{r} {n}" for r, n in summary["failed_by_reason"].items())
    print(f"upscale: {summary['listed']} listed, {summary['done']} done, {summary['skipped']} skipped "
          f"(already done), {summary['stale']} stale (not redone; --redo-stale), {summary['rejected']} rejected"
          f"{f' ({reasons})' if reasons else ''}, {summary['skipped_rejected']} rejected before, "
          f"{summary['failed']} failed{f' ({failures})' if failures else ''}, in {summary['elapsed_s']:.1f}s")
    print(f"model: {summary['model']}; output: {args.output} (manifest in _manifest/, rejects in _rejects/)")
    if summary["refused"]:
        print(f"upscale: error: {summary['refused_message']}", file=sys.stderr)
        return 2
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
