"""`lensmith serve`: FastAPI + ONNX Runtime prediction service that feeds the data flywheel (no torch)."""
