"""The one error path of every command: expected failures become one ``error: ...`` line and exit status 2.

Expected failures are the package's own errors (:class:`aqrcmt.errors.AqrcmtError`: config, data, checkpoint,
results, argument errors) and operating-system errors (a missing file, no permission, a full disk). Anything
else is a bug and keeps its traceback; ``--debug`` keeps the traceback of every error.
"""
from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable

from aqrcmt.errors import AqrcmtError

EXIT_ERROR = 2   # argparse's status for bad arguments: every refused input exits with it


class CommandError(AqrcmtError):
    """A command's arguments do not fit together (e.g. an option that needs another one)."""


def add_debug_flag(parser: argparse.ArgumentParser, default: object = False) -> None:
    """Add ``--debug``; a sub-command parser passes ``argparse.SUPPRESS`` so that it keeps the dispatcher's value."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the Python traceback of an error instead of the one-line message")


def describe_os_error(error: OSError) -> str:
    """One line for an OSError, naming its file(s): '<file>: No space left on device (disk full)'."""
    if error.strerror is None or error.filename is None:
        return str(error)
    files = f"{error.filename} -> {error.filename2}" if error.filename2 is not None else str(error.filename)
    reason = f"{error.strerror} (disk full)" if error.errno == errno.ENOSPC else error.strerror
    return f"{files}: {reason}"


def run_command(command: Callable[[], int | None], debug: bool = False) -> int:
    """Run `command` and return its exit status; an expected error prints ``error: <message>`` on stderr and
    returns :data:`EXIT_ERROR` (with `debug`, it propagates with its traceback)."""
    try:
        return int(command() or 0)
    except AqrcmtError as error:
        if debug:
            raise
        message = str(error)
    except OSError as error:
        if debug:
            raise
        message = describe_os_error(error)
    print(f"error: {message}", file=sys.stderr)
    return EXIT_ERROR
