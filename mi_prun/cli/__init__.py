"""`mi-prun analyze | show | estimators | select | prune | eval`: a thin shell over the library.

Each command builds the library's configs from its flags (`args`), calls library functions
(`commands`) and prints (`output`). Errors a user can fix (`MiPrunError`) print one line and exit
with status 2; `--debug` shows the traceback. Blocks are numbered from 0 in all output.
"""

from __future__ import annotations

import errno
import logging
import sys

from mi_prun.cli.args import build_parser
from mi_prun.cli.commands import COMMANDS
from mi_prun.cli.output import BLOCK_NOTE, format_analysis, format_selection
from mi_prun.errors import MiPrunError

log = logging.getLogger("mi_prun")


def _quiet_libraries(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        import warnings

        warnings.filterwarnings("ignore")
    try:  # our own progress bars replace transformers' per-file ones
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if not debug:
            hf_logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 a user error, 1 a bug, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help/--version (0) or a usage error (2, printed on one line)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    _quiet_libraries(args.debug)
    try:
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # a full disk shows here, inside the handlers below
        return status
    except MiPrunError as exc:
        if args.debug:
            raise
        print(f"mi-prun: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mi-prun: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mi-prun show x | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except OSError as exc:
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


__all__ = ["BLOCK_NOTE", "build_parser", "format_analysis", "format_selection", "main"]
