"""Distillation (jobs/distill.py): a registered SR3 teacher → a registered 1/2/4-step student.

| module       | what                                                                                     |
| ------------ | ---------------------------------------------------------------------------------------- |
| `teacher.py` | the teacher's outputs on the train pairs (Ray Data, the upscale job's sampling actors), a committed dataset version reused by reruns |
| `run.py`     | `distill()`: checks, teacher outputs, the student's Ray Train run (`pipelines.train`), lineage |

The science (the student, its loss, its sampler) is `sr3model.distill`.
"""

from pipelines.distill.run import DistillOptions, DistillResult, distill  # noqa: F401
