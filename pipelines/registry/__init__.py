"""The model registry's side: model URIs → weights, the sampling stored with a version, the pyfunc.

| module    | what                                                                                      |
| --------- | ----------------------------------------------------------------------------------------- |
| `models`  | `resolve_model` (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/…, a directory) → `ModelRef`; stored sampling (`sampling_for`, `store_sampling`) |
| `pyfunc`  | SR3 as an MLflow pyfunc (`mlflow models serve`), logged and registered by training          |
"""
