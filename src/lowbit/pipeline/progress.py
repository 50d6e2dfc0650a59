"""Progress bars for long work (rich), with elapsed time, ETA and peak memory so far."""

from __future__ import annotations

import resource
import sys

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class ProgressReporter:
    """A rich progress bar, or nothing when ``enabled`` is false (tests, ``--json``, pipes)."""

    def __init__(self, enabled: bool, total: int, description: str):
        self.enabled = enabled
        self.total = total
        self.description = description
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> ProgressReporter:
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("peak {task.fields[mem]}"),
                # the status (a layer name) gives way first on a narrow terminal, not the bar and the ETA
                TextColumn(
                    "{task.fields[status]}", table_column=Column(no_wrap=True, overflow="ellipsis", max_width=24)
                ),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total, mem=_mem(), status="")
        return self

    def update(self, status: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, status=status, mem=_mem())

    def skip(self, n: int) -> None:
        """Count ``n`` items done earlier (a resumed run)."""
        if self._progress is not None and n:
            self._progress.update(self._task, completed=n)

    def advance(self, status: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, status=status, mem=_mem())

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def _mem() -> str:
    return f"{peak_rss_bytes() / 2**30:.2f} GiB"
