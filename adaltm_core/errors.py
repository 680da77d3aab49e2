"""The one error type users see, and how the commands turn an error into the one line they print.

`UserError` is raised for anything the user can fix (a file, a config field, a checkpoint); never for our own
bugs. The machine can refuse too (a full disk, a read-only directory, a missing path): those `OSError`s are
reported the same way. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys
import threading

# What the machine, not our code, refuses: a full disk, a quota, a read-only or unwritable place, a missing path.
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT,
                            errno.EISDIR, errno.ENOTDIR, errno.EEXIST})


class UserError(ValueError):
    """Raised for anything the user can fix (a file, a config field, a checkpoint); never for our own bugs."""


def reportable(error: BaseException) -> bool:
    """Whether `error` is the user's or the machine's (one line, exit 2) rather than a bug (a traceback)."""
    return isinstance(error, UserError) or (isinstance(error, OSError) and error.errno in MACHINE_ERRNOS)


def one_line(error: BaseException) -> str:
    """The user-facing line of an error. A `UserError` raised in a data-loader worker reaches the main process with
    the worker's whole traceback as its message; its last line is the original message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    if isinstance(error, OSError) and error.filename:
        text = f"{error.filename}: {error.strerror or text}"
    return text


def quiet_after_error() -> None:
    """Once the one error line is printed: what still writes at exit (tensorboardX's event file flushes in an atexit
    callback and a thread) meets the same full disk, and Python would print its traceback under that line. Errors
    of the user or the machine are dropped there; anything else is still shown."""
    unraisable, thread = sys.unraisablehook, threading.excepthook

    def quiet_unraisable(info):
        if not reportable(info.exc_value):
            unraisable(info)

    def quiet_thread(info):
        if not reportable(info.exc_value):
            thread(info)

    sys.unraisablehook, threading.excepthook = quiet_unraisable, quiet_thread
