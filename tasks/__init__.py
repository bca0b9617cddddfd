"""Pipeline steps, one module per step; each exposes a Prefect task."""
