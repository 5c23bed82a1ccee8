"""Inference at cluster scale: batch upscaling of buckets and the cascade, on Ray Data actor pools.

| module      | what                                                                           | Ray? |
| ----------- | ------------------------------------------------------------------------------ | ---- |
| `upscale`   | `upscale()`: list → plan (manifest) → decode → sample → encode + write (jobs/upscale.py) | yes |
| `cascade`   | `cascade()`: unconditional base → SR stages → bucket (jobs/cascade.py)          | yes  |
| `actors`    | `Upscaler`, the sampling actor: its model loaded once, rows in, sampled rows out | yes  |
| `placement` | where sampling actors run (GPU/CPU, autoscaling min/max pool sizes); `setup_actor` | yes |
| `bucket`    | Ray Data task functions: fetch + decode before the actors, encode + write after | no   |
| `manifest`  | manifest and rejects: rerun rules (stale, changed, retried), compaction         | no   |
| `layout`    | output names under OUTPUT, names that cannot escape it                          | no   |

The sampling itself is `pipelines.sampling`, and what outputs keep of their inputs (alpha, 16 bits,
ICC profile, EXIF/XMP) `pipelines.images` — both shared with the pyfunc; evaluation's
scoring actors (`pipelines.eval.scoring`) use this stage's placement. Modules marked "no" import
neither Ray nor MLflow.
"""
