"""Tracking: MLflow runs, the model registry, version comparison and data versions."""
