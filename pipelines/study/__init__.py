"""The paper's human evaluation (SR3 §4.3, Fig. 6 and 11): a two-alternative forced-choice (2AFC)
fool-rate study, run as a web app with answers in a real database.

    jobs/study.py create   val pairs ─Ray Data sampling (pipelines.infer.upscale)─> STUDY/images/*.png
                           (opaque names, one encoding) + STUDY/study.json (plan, who made what)
    jobs/study.py serve    FastAPI + uvicorn; raters' answers → SQLAlchemy (SQLite or PostgreSQL)
    jobs/study.py results  fool rate per model with 95% intervals, catch-trial exclusions,
                           STUDY/results/index.html (Fig. 11), optionally MLflow metrics

| module        | what                                                                     |
| ------------- | ------------------------------------------------------------------------ |
| `plan.py`     | the protocol (tasks, questions), the per-rater trial plans, `study.json`  |
| `images.py`   | one encoding for every stored image, opaque names, catch degradation, the per-response jitter |
| `create.py`   | building a study from val pairs and models (Ray Data sampling)           |
| `db.py`       | the database: schema, sessions, issuing trials, sending images once, answers, export |
| `access.py`   | invites or open sessions (per-address limit), client address and https behind trusted proxies |
| `app.py`      | the web app (rater pages, JSON API, token image route, admin endpoints)  |
| `stats.py`    | fool rates, Wilson and rater-bootstrap intervals, catch exclusions       |
| `results.py`  | the results job: JSON, the HTML page, MLflow metrics                     |

Importing this package imports none of torch, Ray or MLflow; `app`, `db`, `plan` and `stats` never do.
"""
