"""Quickstart: the whole pipeline on embedded defaults (local Ray, local files, MLflow in SQLite).

    python jobs/quickstart.py [--workdir quickstart] [--steps 400]

Builds pairs from the photos bundled with scikit-image (Ray Data), trains a `tiny` SR3 model
(Ray Train, tracked in MLflow, registered as models:/sr3-quickstart@champion), upscales held-out
photos through the registry (Ray Data) and evaluates bicubic vs SR3 into an HTML report.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.quickstart import run  # noqa: E402
from sr3model.config import SAMPLER_NAMES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("quickstart"), help="where everything goes")
    parser.add_argument("--steps", type=int, default=400, help="training steps of the tiny model")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (2 workers)")
    parser.add_argument("--patches-per-image", type=int, default=48)
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, help="default: the model's (the preset's)")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--eval-limit", type=int, default=64, help="held-out pairs the evaluation scores")
    args = parser.parse_args()
    run(args.workdir, steps=args.steps, batch_size=args.batch_size, patches=args.patches_per_image,
        sampler=args.sampler, sample_steps=args.sample_steps, eval_limit=args.eval_limit)


if __name__ == "__main__":
    main()
