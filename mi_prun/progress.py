"""The library-wide progress protocol, and the time-left estimate the shells put next to it.

Long-running library calls accept `progress(stage, fraction, message)`: `stage` names the step
(load, capture, score, select, verify, heal, perplexity, ...), `fraction` lies in [0, 1], `message`
is a short human-readable line. The CLI renders it with tqdm, the app with a progress bar; raising
from the callback (e.g. the app's `Cancelled`) aborts the call cleanly.

Long steps made of countable units (the verified search's sets, healing's batches, perplexity's
windows) report `fraction` 0.0 when they start, then `done / total` after every unit, and their
message says both ("set 7 of at most 22, 15 left in the budget"). A shell estimates the time left
from that alone (`TimeLeft`): the rate since the stage's first report, applied to what is left.
The core never prints and never estimates times.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

Progress = Callable[[str, float, str], None]
FractionProgress = Callable[[float], None]  # inner loops that report only a fraction of their own work


class TimeLeft:
    """Seconds left of each stage, from its progress since the stage's first report.

    `update(stage, fraction)` returns the estimate, or None until the stage has moved. A fraction
    below the last one starts the stage over (the same stage run again, e.g. a second perplexity).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.first: dict[str, tuple[float, float]] = {}  # stage -> (time, fraction) of its first report
        self.last: dict[str, float] = {}

    def update(self, stage: str, fraction: float) -> float | None:
        now = self.clock()
        f = min(max(float(fraction), 0.0), 1.0) if math.isfinite(fraction) else 0.0
        if stage not in self.first or f < self.last[stage]:
            self.first[stage] = (now, f)
        self.last[stage] = f
        t0, f0 = self.first[stage]
        if f >= 1.0:
            return 0.0
        if f <= f0 or now <= t0:
            return None
        return (now - t0) * (1.0 - f) / (f - f0)


def time_left_text(seconds: float | None) -> str:
    """"about 40 s left", "about 12 min left"; "estimating the time left" while unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "estimating the time left"
    if seconds < 1.0:
        return "almost done"
    if seconds < 90:
        return f"about {seconds:.0f} s left"
    if seconds < 90 * 60:
        return f"about {seconds / 60:.0f} min left"
    return f"about {seconds / 3600:.1f} h left"


__all__ = ["FractionProgress", "Progress", "TimeLeft", "time_left_text"]
