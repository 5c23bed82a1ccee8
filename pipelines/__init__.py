"""Ray / MLflow / fsspec stages of SR3: one module per stage, science imported from `sr3model`."""
