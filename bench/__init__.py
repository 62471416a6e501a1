"""Benchmarks (never part of the test run). ``python -m bench <name> [args]`` runs bench/<name>.py."""
