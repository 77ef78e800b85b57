"""Helpers for ``python -m bench.engines`` (run in the engines venv)."""
