"""Data-gate internals: running GX suites on in-memory frames and writing the gate's reports.

The stage entry points (`run_validate`, `check_split_leakage`) live in `lensmith.validate`.
"""
