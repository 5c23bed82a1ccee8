"""Evaluation: metrics over held-out pairs, the HTML/MLflow report, and the noise-schedule search.

| module     | what                                                                                  |
| ---------- | ------------------------------------------------------------------------------------- |
| `data`     | the val/ split of a committed pairs dataset as `EvalSet`; the bicubic baseline         |
| `measures` | the metric table (`sr3model.metrics.per_image`) accumulated per method; FID/IS/LPIPS   |
| `scoring`  | work items out to the sampling actors (`PairScorer`), metric values back in order      |
| `run`      | `evaluate()`: bicubic, the model and its baselines → report + one MLflow run (jobs/evaluate.py) |
| `search`   | `search()`: the inference schedule per step budget (jobs/search_schedule.py)           |
| `report`   | metrics.json, index.html with the image grid, the MLflow run                            |

Evaluation samples through the inference layer below it (`pipelines.infer.placement`, `pipelines.sampling`).
"""

from pipelines.eval.data import EvalSet, bicubic, check_model, load_val
from pipelines.eval.measures import (BASE_METRICS, EXTRA_METRICS, FID_ENV, LOWER_IS_BETTER, LPIPS_ENV, METRICS,
                                     Perceptual, Running, base_scores)
from pipelines.eval.run import EvalResult, evaluate

__all__ = ["BASE_METRICS", "EXTRA_METRICS", "FID_ENV", "LOWER_IS_BETTER", "LPIPS_ENV", "METRICS", "EvalResult",
           "EvalSet", "Perceptual", "Running", "base_scores", "bicubic", "check_model", "evaluate", "load_val"]
