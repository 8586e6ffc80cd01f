"""Starting several real processes (servers, workers) at once: each loads the model, so on a
small machine starting them together saves most of the wait.

    processes: list[Startable] = [ServerProcess(...), ServerProcess(...), WorkerProcess(...)]
    start_together(processes)
    try:
        ...
    finally:
        stop_all(processes)
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar


class Startable(Protocol):
    def start(self) -> object: ...

    def stop(self) -> None: ...


P = TypeVar("P", bound=Startable)


def start_together(processes: Sequence[P]) -> list[P]:
    """Start every process concurrently and wait until all are ready. If one fails to start,
    every one is stopped and the first error is raised."""
    with ThreadPoolExecutor(max_workers=len(processes)) as pool:
        futures = [pool.submit(process.start) for process in processes]
        errors = [future.exception() for future in futures]
    failed = [error for error in errors if error is not None]
    if failed:
        stop_all(processes)
        raise failed[0]
    return list(processes)


def stop_all(processes: Sequence[Startable]) -> None:
    """Stop in reverse order (workers before the servers they follow), never raising before
    every process had its turn."""
    errors = []
    for process in reversed(processes):
        try:
            process.stop()
        except Exception as error:  # a stuck process must not leave the others running
            errors.append(error)
    if errors:
        raise errors[0]
