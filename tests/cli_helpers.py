"""The CLI run in-process and its one-line error contract, shared by the reliability tests."""

from __future__ import annotations

import contextlib
import io

from mi_prun.cli import main


def run_cli(*argv: str) -> tuple[int, str, str]:
    """cli.main in-process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["--quiet", *argv])
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc: int, err: str, *fragments: str) -> str:
    """Status 2 and exactly one `mi-prun: error:` line holding every fragment; returns the line."""
    assert rc == 2, (rc, err)
    line = err.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, err
    assert line.startswith("mi-prun: error:"), err
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line
