"""Pipelines: configuration, stages wired together, MLflow tracking. May import every other package."""
