"""Prefect flows (the pipeline wiring) and the `quantmill` command line."""
