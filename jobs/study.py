"""The paper's human evaluation: a 2AFC fool-rate study (see pipelines/study/).

    python jobs/study.py create --model models:/sr3-faces@champion --baseline bicubic \\
        --pairs gs://bkt/pairs/ffhq-16-128 --task 1 --images 100 --per-rater 50 --display-seconds 3 \\
        --study gs://bkt/studies/faces-task1
    python jobs/study.py serve --study gs://bkt/studies/faces-task1 \\
        --db postgresql://study@db-host/studies --host 0.0.0.0 --port 8000 \\
        --trusted-proxy 10.0.0.0/8 --secure      # invite-only; SR3_STUDY_ADMIN_TOKEN
    python jobs/study.py results --study gs://bkt/studies/faces-task1 --db postgresql://… --mlflow

create samples every model's outputs through Ray Data (pipelines.infer.upscale) and writes images under
opaque names plus study.json; serve runs the raters' web app (answers in SQLite by default, any
SQLAlchemy URL); results writes STUDY/results/index.html + results.json (fool rates, 95% intervals,
catch-trial exclusions, the highest and lowest fool-rate images) and optionally MLflow metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import os  # noqa: E402

from pipelines.cli import add_consistency_flag  # noqa: E402
from sr3model.config import SAMPLER_NAMES  # noqa: E402


def _default_db(study: str) -> str | None:
    """SQLite beside a local study (`STUDY/answers.db`); remote studies need --db."""
    from pipelines import storage

    if storage.protocol(study) in ("file", "local"):
        return "sqlite:///" + os.path.abspath(os.path.join(storage.resolve(study)[1], "answers.db"))
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="2AFC fool-rate study: create, serve, results.")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="sample the models' outputs and write the study")
    create.add_argument("--model", action="append", required=True, metavar="URI",
                        help="model to evaluate (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/…, a model "
                             "directory); repeatable")
    create.add_argument("--baseline", action="append", default=[], metavar="bicubic|URI",
                        help="a baseline: bicubic, or a (regression) model URI sampled like any model; repeatable")
    create.add_argument("--pairs", required=True, help="jobs/build_pairs.py output (its val/ split is used)")
    create.add_argument("--study", required=True, help="where the study goes (any fsspec URI; must be new)")
    create.add_argument("--task", type=int, choices=(1, 2), default=1, help="1: LR shown between (paper's Task 1); 2: no LR")
    create.add_argument("--images", type=int, default=100, help="test images (default 100, the paper's)")
    create.add_argument("--per-rater", type=int, default=50, help="test images per rater (default 50)")
    create.add_argument("--catch", type=int, default=3, help="catch trials per rater (extra val pairs; default 3)")
    create.add_argument("--raters", type=int, default=50, help="planned rater slots (default 50; more reuse them)")
    create.add_argument("--display-seconds", type=float, default=3.0, help="how long images are shown (default 3)")
    create.add_argument("--seed", type=int, default=0)
    create.add_argument("--steps", type=int, help="refinement steps (default: each model's)")
    create.add_argument("--sampler", choices=SAMPLER_NAMES, help="default: each model's")
    create.add_argument("--schedule", metavar="START,END", help="linear β schedule (default: stored, else config)")
    add_consistency_flag(create)
    create.add_argument("--batch-size", type=int, default=8)
    create.add_argument("--workers", type=int, help="sampling actors (default: as jobs/upscale.py)")
    create.add_argument("--ray-address", default=None, help="default: RAY_ADDRESS, else a local Ray")
    serve = sub.add_parser("serve", help="run the raters' web app")
    serve.add_argument("--study", required=True)
    serve.add_argument("--db", help="SQLAlchemy URL (default: sqlite:///STUDY/answers.db for a local study)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--admin-token", help="admin token (default: $SR3_STUDY_ADMIN_TOKEN, else a new one, printed)")
    who = serve.add_mutually_exclusive_group()
    who.add_argument("--invite-only", action="store_true",
                     help="sessions need a one-time invite (POST /admin/invites): the default")
    who.add_argument("--open", action="store_true",
                     help="anyone may start a session (invites still work), at most --per-address per address")
    serve.add_argument("--per-address", type=int, default=3,
                       help="open sessions one client address may start per --per-address-hours (default 3)")
    serve.add_argument("--per-address-hours", type=float, default=24.0, help="the limit's window (default 24)")
    serve.add_argument("--trusted-proxy", action="append", default=[], metavar="CIDR",
                       help="a proxy whose X-Forwarded-For/-Proto are believed (repeatable; default: none)")
    serve.add_argument("--secure", action="store_true",
                       help="always mark the session cookie Secure (the study is reached over https through a proxy)")
    results = sub.add_parser("results", help="fool rates, intervals, exclusions, the HTML page")
    results.add_argument("--study", required=True)
    results.add_argument("--db", help="as for serve")
    results.add_argument("--report", help="output folder or URI (default STUDY/results)")
    results.add_argument("--mlflow", action="store_true", help="log the fool rates to each model version's evaluation run")
    results.add_argument("--max-catch-misses", type=int, default=0, help="exclude raters who miss more catch trials")
    results.add_argument("--top", type=int, default=5, help="images shown with the highest / lowest fool rates")
    args = parser.parse_args(argv)
    if args.command in ("serve", "results"):
        args.db = args.db or _default_db(args.study)
        if args.db is None:
            parser.error("--db is required for a study that is not on local disk")
    return args


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_job

    return run_job("study", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from pipelines.cli import from_args

    def say(message: str) -> None:
        print(f"study: {message}", flush=True)

    if args.command == "create":
        from pipelines.study.create import StudyOptions, create_study

        options = from_args(StudyOptions, args, baselines=tuple(args.baseline))
        create_study(args.model, args.pairs, args.study, options, progress=say)
        say(f"next: python jobs/study.py serve --study {args.study}")
    elif args.command == "serve":
        from pipelines.study.app import ServeOptions, serve_study

        serve_study(args.study, args.db, from_args(ServeOptions, args, trusted_proxy=tuple(args.trusted_proxy)),
                    say=say)
    else:
        from pipelines.study.results import results

        doc = results(args.study, args.db, report_uri=args.report, log_mlflow=args.mlflow,
                      max_catch_misses=args.max_catch_misses, top=args.top, say=say)
        say(f"report: {doc['report']}/index.html (results.json beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
