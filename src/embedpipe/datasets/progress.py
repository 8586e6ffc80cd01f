"""What a dataset job reports while it runs, and the rich progress bar that shows it."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn


@dataclass(slots=True)
class ProgressUpdate:
    """What a progress display shows; ``position``/``total`` are in the reader's unit."""

    rows: int = 0  # rows written to parts, including those of earlier runs
    embedded: int = 0  # rows embedded by this run
    cache_hits: int = 0  # of ``embedded``
    skipped: int = 0
    position: int = 0
    total: int = 0


@dataclass(frozen=True, slots=True)
class JobReport:
    output: Path
    rows: int
    skipped: int
    embedded: int
    resumed: int
    cache_hits: int
    seconds: float
    already_complete: bool = False
    server: str | None = None  # computed by this server (its cache hits are not known here)

    @property
    def rows_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def hit_ratio(self) -> float:
        return self.cache_hits / self.embedded if self.embedded else 0.0

    def summary(self) -> str:
        if self.already_complete:
            return (
                f"{self.output} is already complete ({self.rows:,} rows); nothing to do. "
                "Delete it to embed again."
            )
        parts = [
            f"{self.rows:,} rows -> {self.output}",
            f"embedded {self.embedded:,} in {self.seconds:.1f} s "
            f"({self.rows_per_second:,.0f} rows/s)",
            f"on {self.server}" if self.server else f"cache hits {self.hit_ratio:.1%}",
        ]
        if self.resumed:
            parts.append(f"resumed: {self.resumed:,} rows were done before")
        if self.skipped:
            parts.append(f"skipped {self.skipped:,} bad or failed rows")
        return ", ".join(parts)


class RichProgress:
    """A progress bar: rows, rows/s, ETA and cache hits, refreshed by rich ~10 times a second.

    Use as a context manager and pass ``update`` as the job's ``on_progress``.
    """

    def __init__(self, console: Console, description: str, *, cache_hits: bool = True) -> None:
        """``cache_hits=False``: the job cannot know them (a server computes the rows)."""
        self._started = time.perf_counter()
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[rows]} rows"),
            TextColumn("{task.fields[rate]} rows/s"),
        ]
        if cache_hits:
            columns.append(TextColumn("cache hits {task.fields[hits]}"))
        self._progress = Progress(
            *columns,
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task: TaskID = self._progress.add_task(
            description, total=None, rows="0", rate="-", hits="-"
        )

    def update(self, update: ProgressUpdate) -> None:
        if not self._progress.live.is_started:
            # Started by the first update: a job that finds nothing to do shows no bar.
            self._started = time.perf_counter()
            self._progress.start()
        elapsed = time.perf_counter() - self._started
        self._progress.update(
            self._task,
            total=update.total or None,
            completed=update.position,
            rows=f"{update.rows:,}",
            rate=f"{update.embedded / elapsed:,.0f}" if elapsed > 0 else "-",
            hits=f"{update.cache_hits / update.embedded:.0%}" if update.embedded else "-",
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(Exception):
            self._progress.stop()
