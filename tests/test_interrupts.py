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


@pytest.mark.parametrize("delay", [0.4, 1.5])
def test_ctrl_c_while_importing_prints_interrupted(tmp_path, delay):
    proc = subprocess.Popen([sys.executable, "-m", "mi_prun.cli", "--quiet", "analyze", "--model", "tiny-llama",
                             "--samples", "8", "--tokens", "48", "--out", str(tmp_path / "a")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)  # torch and transformers take seconds to import on this machine
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip() == "mi-prun: interrupted", err
    assert not (tmp_path / "a").exists()
