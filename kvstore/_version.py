"""The release (one place: the package, the server's start-up line and metrics,
and what L2 records of who wrote it; pyproject.toml carries the same)."""

__version__ = "0.29.9"
