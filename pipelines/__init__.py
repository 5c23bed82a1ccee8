"""Ray / MLflow / fsspec stages of SR3, one subpackage per stage; the science comes from `sr3model`.

| stage       | what                                                            | entry points (jobs/)                  |
| ----------- | --------------------------------------------------------------- | ------------------------------------- |
| `pairs/`    | LR/HR pairs from buckets (Ray Data), committed dataset versions | `build_pairs.build_pairs` (build_pairs.py) |
| `train/`    | Ray Train DDP loop, checkpoints, MLflow run, registry, promotion gate | `train.train` (train.py)        |
| `registry/` | model URIs → weights, stored sampling, the MLflow pyfunc        | `models.resolve_model`                |
| `infer/`    | Ray Data batch upscaling of buckets and the cascade             | `upscale.upscale` (upscale.py), `cascade.cascade` (cascade.py) |
| `eval/`     | metrics over held-out pairs, reports, noise-schedule search      | `run.evaluate` (evaluate.py), `search.search` (search_schedule.py) |
| `study/`    | the paper's 2AFC human study: web app, database, results         | `create`, `app.serve`, `results` (study.py) |

Shared helpers at the top, imported by every stage and importing none: `storage` (fsspec URIs),
`tracking` (the one MLflow adapter), `cli` (options from flags, one-line input errors), `runtime`
(connecting to Ray, the sampling flags), `sampling` (the one sampling path, pure torch), `images/`
(what upscaled files keep of their inputs: alpha, 16-bit depth, ICC profiles, EXIF/XMP; no Ray).
`quickstart` chains the jobs on embedded defaults.

Imports between stages run one way, as `ARROWS` lists (tests/test_layering.py keeps it true, and
that no module imports another stage's private names).
"""

SHARED = ("storage", "tracking", "cli", "runtime", "sampling", "images")
ARROWS = {  # stage → the other stages it may import
    "pairs": (),
    "registry": (),
    "infer": ("registry",),
    "eval": ("infer", "registry", "pairs"),
    "train": ("eval", "registry", "pairs"),
    "study": ("eval", "infer", "registry", "pairs"),
    "quickstart": ("pairs", "train", "registry", "infer", "eval", "study"),
    "pyfunc": ("registry",),  # the shim that loads models logged before the registry wing existed
}
