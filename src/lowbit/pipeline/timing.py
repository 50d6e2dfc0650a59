"""Where the time of a run went: wall and CPU seconds per phase (loading, capture, each step ...).

CPU seconds are the process's (every thread's) time, so on a machine with several cores they can
exceed the wall time; their ratio shows how well a phase uses the cores.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

#: phases in the order a run meets them (steps, named after the step, come between capture and sanity)
LOAD, CAPTURE, SANITY, WRITE = "load", "capture", "sanity check", "write"


@dataclass
class PhaseTimes:
    """Accumulated wall and CPU seconds per phase. Phases do not nest: entering one while another
    is open pauses the outer one, so the phases add up to the time spent inside any of them."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    _open: list[str] = field(default_factory=list, repr=False)
    _since: tuple[float, float] = field(default=(0.0, 0.0), repr=False)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._switch()
        self._open.append(name)
        try:
            yield
        finally:
            self._switch()
            self._open.pop()

    def _switch(self) -> None:
        """Charge the time since the last switch to the phase that was running."""
        now = (time.perf_counter(), time.process_time())
        if self._open:
            name = self._open[-1]
            self.wall[name] = self.wall.get(name, 0.0) + now[0] - self._since[0]
            self.cpu[name] = self.cpu.get(name, 0.0) + now[1] - self._since[1]
        self._since = now

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {name: {"wall_s": round(self.wall[name], 3), "cpu_s": round(self.cpu[name], 3)} for name in self.wall}


def timings_table(timings: dict[str, dict[str, float]], total_wall: float, total_cpu: float | None = None):
    """A rich table of :meth:`PhaseTimes.to_dict`, with the rest of the run as ``other``."""
    from rich.table import Table

    t = Table(title="where the time went")
    t.add_column("phase")
    t.add_column("wall", justify="right")
    t.add_column("CPU", justify="right")
    t.add_column("share", justify="right")
    for name, v in timings.items():
        t.add_row(name, f"{v['wall_s']:.1f}s", f"{v['cpu_s']:.1f}s", f"{v['wall_s'] / max(total_wall, 1e-9):.0%}")
    other = total_wall - sum(v["wall_s"] for v in timings.values())
    other_cpu = None if total_cpu is None else total_cpu - sum(v["cpu_s"] for v in timings.values())
    t.add_row("other", f"{max(other, 0.0):.1f}s", "" if other_cpu is None else f"{max(other_cpu, 0.0):.1f}s", "")
    t.add_row("total", f"{total_wall:.1f}s", "" if total_cpu is None else f"{total_cpu:.1f}s", "", style="bold")
    return t
