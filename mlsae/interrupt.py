"""A process-wide "stop at the next safe point" request (Ctrl-C in the CLI).

The CLI's SIGINT handler calls request_stop(); long loops call check() (or
training its should_stop) at their step boundaries, after their last write is
complete, so a stopped run resumes exactly where it stopped.
"""

from __future__ import annotations

import threading

_STOP = threading.Event()

RERUN_HINT = "run the same command again to continue from the last finished step"


class Interrupted(RuntimeError):
    """Work stopped at a safe point because a stop was requested."""

    def __init__(self, what: str = "interrupted") -> None:
        super().__init__(f"{what}: {RERUN_HINT}")


def request_stop() -> None:
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def clear() -> None:
    _STOP.clear()


def check(what: str = "interrupted") -> None:
    """Raise Interrupted when a stop was requested."""
    if _STOP.is_set():
        raise Interrupted(what)
