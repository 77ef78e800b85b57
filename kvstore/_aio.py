"""asyncio helpers shared by the store's background work."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def spawn(coro: Coroutine[Any, Any, T], tasks: set[asyncio.Task[Any]]) -> asyncio.Task[T]:
    """Run ``coro`` as a task of the running loop, held in ``tasks`` until it ends.

    The loop keeps only weak references to its tasks, so a task nothing else
    holds can be garbage-collected mid-flight; ``tasks`` holds it (and lets
    the owner cancel or await what is still running at close)."""
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task
