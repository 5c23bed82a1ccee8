"""Distil a registered SR3 teacher into a 1/2/4-step student, registered and served like any model.

    python jobs/distill.py --teacher models:/sr3-natural@champion --pairs gs://bkt/pairs/photos-64-256 \\
        --student-steps 4 --register sr3-natural-fast --storage gs://bkt/runs --steps 20000 \\
        --num-workers 8 --use-gpu

1. The teacher's deterministic sampler (--teacher-sampler dpmpp-2m or ddim, --teacher-steps 20; its LR
   consistency as the registry serves it, recorded in the outputs' summary) runs
   on the train pairs on the upscale job's Ray Data sampling actors, --outputs-per-pair start noises
   each, seeded per output; the outputs are committed as a dataset version (--teacher-outputs,
   default STORAGE/teacher-outputs/NAME-vN-SAMPLER-STEPS-seedS). A rerun with the same teacher
   version, sampler, steps, seed and pairs reuses them.
2. The student — the teacher's network and weights, run at K = --student-steps fixed levels — trains
   on Ray Train (MLflow run, checkpoints, resume by --run-name, validation every --val-every steps,
   registry, promotion gate: everything jobs/train.py has) to reproduce each output from its noise.
3. It is registered as --register NAME (the gate decides whether --alias moves to it) with its teacher
   (models:/NAME/VERSION) as param `distill.teacher` and tag `sr3.teacher`; jobs/upscale.py,
   evaluate.py, study.py and the pyfunc sample it with `distilled`, K steps, with no extra flags
   (LR-consistent as its teacher is served; --consistency on|off there as for any model).

A bad input (a teacher that does not resolve or is unconditional, K not in {1, 2, 4}, pairs of
another size, any bad flag) is one `distill: error:` line with exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from pipelines.cli import OneLineParser  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="distill", description="Distil an SR3 teacher into a 1/2/4-step student.")
    parser.add_argument("--teacher", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a model directory")
    parser.add_argument("--pairs", required=True, help="committed pairs URI (jobs/build_pairs.py) whose train split "
                                                       "the teacher upscales")
    parser.add_argument("--student-steps", type=int, required=True, choices=(1, 2, 4),
                        help="K: network passes per output of the student")
    parser.add_argument("--register", required=True, help="registered model name of the student")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--storage", help="checkpoint root URI (local, gs://, s3://); default ~/ray_results")
    parser.add_argument("--steps", type=int, default=1000, help="total training steps of the student's run")
    parser.add_argument("--teacher-steps", type=int, default=20, help="steps of the teacher's sampler (default 20)")
    parser.add_argument("--teacher-sampler", default="dpmpp-2m", help="dpmpp-2m (default) or ddim: deterministic")
    parser.add_argument("--teacher-outputs", help="URI of the teacher-output dataset (default: under --storage)")
    parser.add_argument("--outputs-per-pair", type=int, default=2, help="teacher outputs (start noises) per pair")
    parser.add_argument("--seed", type=int, default=0, help="seed of the teacher outputs' start noise")
    parser.add_argument("--hr-weight", type=float, help="weight of the HR term (default 0: pure distillation)")
    parser.add_argument("--lr", type=float, help="the student's learning rate (default 1e-3)")
    parser.add_argument("--warmup-steps", type=int, help="learning-rate warm-up steps (default 50)")
    parser.add_argument("--batch-size", type=int, help="global batch (default: the teacher's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the student's config; repeatable")
    parser.add_argument("--limit", type=int, help="only the first N train pairs (a trial)")
    parser.add_argument("--sample-batch", type=int, default=16, help="outputs per sampling call of the teacher")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the teacher's sampling actors run (auto: GPUs when the cluster has them)")
    parser.add_argument("--workers", type=int, help="sampling actors of the teacher")
    parser.add_argument("--num-gpus-per-worker", type=float, help="GPUs per sampling actor (default 1)")
    # the student's training run: jobs/train.py's flags of the same names
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--cpus-per-worker", type=float, help="default 0.5 on CPU, 1 with GPUs")
    parser.add_argument("--micro-batch", type=int, metavar="N", help="gradient accumulation (as jobs/train.py)")
    parser.add_argument("--checkpoint-every", type=int, help="steps (default: every 5000 steps or 30 minutes)")
    parser.add_argument("--checkpoint-minutes", type=float)
    parser.add_argument("--keep-checkpoints", type=int, default=3)
    parser.add_argument("--val-every", type=int, default=0, help="steps; 0: validate at the end only")
    parser.add_argument("--val-images", type=int, default=4)
    parser.add_argument("--val-pairs", help="pairs whose val/ split validation and the gate use (default: --pairs)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--max-failures", type=int, default=3)
    parser.add_argument("--run-name", help="default: REGISTER-studentK-of-TEACHER-vN; rerun with it to resume")
    parser.add_argument("--experiment", default="sr3-distill", help="MLflow experiment")
    parser.add_argument("--promote-metric", help="one metric decides the gate (default: jobs/train.py's guards)")
    parser.add_argument("--promote-limit", type=int, default=64, help="val pairs the gate evaluates (default 64)")
    parser.add_argument("--promote-samples", type=int, default=2, help="outputs per val pair the gate compares")
    parser.add_argument("--force-alias", action="store_true")
    parser.add_argument("--ray-address", default=None, help="default: RAY_ADDRESS, else a local Ray")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_job

    return run_job("distill", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from pipelines.cli import from_args
    from pipelines.distill import DistillOptions, distill
    from pipelines.train import TrainOptions
    from pipelines.train.promote import GateConfig

    gate = GateConfig(metric=args.promote_metric, limit=args.promote_limit, samples=args.promote_samples,
                      force=args.force_alias)
    training = from_args(TrainOptions, args, storage_uri=args.storage, gate=gate)
    options = from_args(DistillOptions, args, overrides=tuple(args.overrides))
    result = distill(args.teacher, args.pairs, options, training)
    run = result.training
    print(f"teacher: {result.teacher}; its outputs: {result.outputs} version {result.outputs_version}"
          f"{' (reused)' if result.reused_outputs else ''}")
    print(f"run {run.run_name}: {run.steps} steps in {run.seconds:.0f} s{' (resumed)' if run.resumed else ''}")
    print(f"mlflow: {run.tracking_uri} experiment {run.experiment} run {run.run_id}")
    shown = {k: round(v, 4) for k, v in run.metrics.items() if isinstance(v, float) and k.startswith("val_")}
    if shown:
        print(f"validation ({options.student_steps} step(s)): {shown}")
    if run.model_uri:
        print(f"model: {run.model_uri}" + (f" (version {run.registered_version})" if run.registered_version else ""))
    if run.promotion is not None:
        print(f"alias {args.alias}: {'moved' if run.promotion.moved else 'not moved'}: {run.promotion.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
