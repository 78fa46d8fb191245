"""Thin Prefect tasks: each runs one pipeline stage and publishes what it produced as artifacts."""
