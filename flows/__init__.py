"""Prefect flows: orchestration only; every computation lives in ``gdro_core``."""
