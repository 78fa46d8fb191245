"""Prefect flows: training (the DAG of dvc.yaml), nightly retraining, monitoring."""
