"""The library-wide progress protocol.

Long-running library calls accept `progress(stage, fraction, message)`: `stage` names the step
(load, capture, score, select, verify, heal, ...), `fraction` lies in [0, 1], `message` is a short
human-readable line. The CLI renders it with tqdm, the app with a progress bar; raising from the
callback (e.g. the app's `Cancelled`) aborts the call cleanly.
"""

from __future__ import annotations

from typing import Callable

Progress = Callable[[str, float, str], None]
FractionProgress = Callable[[float], None]  # inner loops that report only a fraction of their own work

__all__ = ["Progress", "FractionProgress"]
