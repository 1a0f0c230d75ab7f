"""Measurements behind design decisions: `python -m benchmarks.<name> --config=configs/<recipe>.py`.
Each prints one JSON line; the numbers and what was decided from them are in RESULTS.md."""
