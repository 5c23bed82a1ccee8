"""Kept for models logged before the pyfunc moved to `pipelines.registry.pyfunc`: MLflow pickles the
logged `SR3PyFunc` by its module path, so those models name this module when they are loaded."""

from pipelines.registry.pyfunc import SR3PyFunc, log_model, super_resolve_frame  # noqa: F401
