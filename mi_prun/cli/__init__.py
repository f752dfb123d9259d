"""`mi-prun analyze | show | estimators | select | prune | eval`: a thin shell over the library.

Each command builds the library's configs from its flags (`args`), calls library functions
(`commands`) and prints (`output`). Errors a user can fix (`MiPrunError`) print one line and exit
with status 2; `--debug` shows the traceback. Blocks are numbered from 0 in all output.

This module imports nothing heavy at import time: torch, transformers and the commands are imported
inside `main`, so that Ctrl-C while they load (seconds on a cold disk) prints "interrupted" too.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import signal
import sys
import threading
import warnings
from typing import Any, Iterator

from mi_prun.errors import MiPrunError

log = logging.getLogger("mi_prun")


def _quiet_libraries(debug: bool) -> None:
    hf_logging = importlib.import_module("transformers.utils.logging")  # imported late: see the module docstring
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        warnings.filterwarnings("ignore")
    hf_logging.disable_progress_bar()  # our own progress bars replace transformers' per-file ones
    if not debug:
        hf_logging.set_verbosity_error()


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler's time limit), raised like Ctrl-C so that every cleanup
    that runs on an interrupt (temporary folders, hooks) runs on it too."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises `Terminated` while the command runs (main thread only; restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 a user error, 1 a bug, 130 interrupted, 143
    terminated by SIGTERM)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:  # torch and transformers load here (see the module docstring), as mi_prun's lazy names do
        build_parser = importlib.import_module("mi_prun.cli.args").build_parser
        COMMANDS = importlib.import_module("mi_prun.cli.commands").COMMANDS
    except KeyboardInterrupt:  # Ctrl-C while torch and transformers are still being imported
        print("mi-prun: interrupted", file=sys.stderr)
        return 130
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help/--version (0) or a usage error (2, printed on one line)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        _quiet_libraries(args.debug)
        with _sigterm_raises():
            status = COMMANDS[args.command](args)
            sys.stdout.flush()  # a full disk shows here, inside the handlers below
        return status
    except MiPrunError as exc:
        if args.debug:
            raise
        print(f"mi-prun: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("mi-prun: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("mi-prun: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mi-prun show x | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG and not args.debug:  # a path no check above caught
            print(f"mi-prun: error: a path is too long for the file system ({exc.filename}). Fix: use "
                  "a shorter path.", file=sys.stderr)
            return 2
        if args.debug or exc.errno not in (errno.ENOSPC, errno.EIO, errno.EDQUOT):
            if args.debug:
                raise
            return _internal(exc)
        # e.g. `mi-prun show x > /dev/full`: the output cannot be written
        print(f"mi-prun: error: cannot write the output: {exc.strerror}. Fix: free disk space or "
              "redirect the output elsewhere.", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug in mi-prun: still one line, the traceback with --debug
        if args.debug:
            raise
        return _internal(exc)


def _internal(exc: BaseException) -> int:
    first = (str(exc).splitlines() or [""])[0]
    print(f"mi-prun: internal error: {type(exc).__name__}: {first} (rerun with --debug for the "
          "traceback, and please report it)", file=sys.stderr)
    return 1


_LAZY = {"BLOCK_NOTE": "mi_prun.cli.output", "format_analysis": "mi_prun.cli.output",
         "format_selection": "mi_prun.cli.output", "build_parser": "mi_prun.cli.args"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mi_prun.cli' has no attribute {name!r}")


__all__ = ["BLOCK_NOTE", "build_parser", "format_analysis", "format_selection", "main"]
