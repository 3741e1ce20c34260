"""Benchmarks: run them with ``.venv/bin/python -m benchmarks.<name>`` (see README.md)."""
