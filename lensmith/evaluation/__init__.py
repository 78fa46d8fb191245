"""Evaluate-stage internals: the figures and the self-contained HTML report rendered from an `Evaluation`.

The stage entry point (`run_evaluate`) and the metrics it computes live in `lensmith.evaluate`.
"""
