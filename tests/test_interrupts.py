"""Ctrl-C at any moment of a command, including while Python is still importing torch and
transformers, prints one line `mi-prun: interrupted` and exits with status 130.
docs/RELIABILITY.md cites this test as `Int::test`."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _importing_torch(pid: int) -> bool:
    """Whether the process has mapped torch's library: it is inside `import torch`, or past it."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _as_at_a_terminal() -> None:
    """Ctrl-C's default action in the child, as for a command typed at a terminal: a suite started as a
    background job of a non-interactive shell hands its children SIGINT ignored, and the CLI would never
    see the Ctrl-C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the import start")
# 0.3 s: an interrupt inside code a C extension runs left CPython's "unhandled KeyboardInterrupt" flag set
# (the process ended with SIGINT, status -2, after printing "interrupted"); 4 s: transformers' lazy import
# wrapped Ctrl-C in its own error (an "internal error", status 1)
@pytest.mark.parametrize("when", ["importing torch", "0.3 s in", "2.5 s in", "4 s in"])
def test_ctrl_c_while_importing_prints_interrupted(tmp_path, when):
    proc = subprocess.Popen([sys.executable, "-m", "mi_prun.cli", "--quiet", "analyze", "--model", "tiny-llama",
                             "--samples", "8", "--tokens", "48", "--out", str(tmp_path / "a")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_at_a_terminal)
    if when == "importing torch":  # the moment torch's library is mapped: its import has begun
        deadline = time.monotonic() + 60
        while not _importing_torch(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    else:
        time.sleep(float(when.split()[0]))
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip() == "mi-prun: interrupted", err
    assert not (tmp_path / "a").exists()
