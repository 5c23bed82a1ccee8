"""Inference at cluster scale: the code that upscaling, the cascade, evaluation, the schedule search
and the MLflow pyfunc share. The stages' entry points stay at the top of `pipelines/`
(`upscale`, `cascade`, `evaluate`, `schedule_search`, `pyfunc`); they import from here.

| module       | what                                                                         | Ray? |
| ------------ | ---------------------------------------------------------------------------- | ---- |
| (`pipelines.sampling`, one floor down: the one sampling path, shared with the pyfunc and evaluation) | | |
| `placement`  | where the sampling actors run (GPU/CPU, autoscaling min/max pool sizes)      | yes  |
| `actors`     | the Ray Data actors: `Upscaler` (buckets), `PairScorer` (evaluation/search)  | yes  |
| `scoring`    | driver side of evaluation and search: work items out, values back in order   | yes  |
| `layout`     | output names under OUTPUT, names that cannot escape it                       | no   |
| `manifest`   | manifest and rejects: rerun rules (stale, changed, retried), compaction      | no   |
| `bucket`     | Ray Data task functions: fetch + decode, encode + write                      | no   |
| `fidelity`   | what outputs keep of their inputs: alpha, 16 bits, ICC profile, EXIF/XMP, grey | no |
| `codecs`     | image files at full depth with their metadata (16-bit PNG/TIFF read + write) | no   |
| `colour`     | ICC profiles: to sRGB for the model and back (ImageCms; matrix/TRC in float) | no   |

Modules marked "no" import neither Ray nor MLflow (`sampling` not even fsspec: the pyfunc ships it).
"""
