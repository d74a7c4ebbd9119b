"""Ctrl-C that is not lost.

Python raises KeyboardInterrupt wherever the main thread is when the signal is handled. Where that is a
finalizer or a weakref callback ("Exception ignored in ..."), or a library's handler that catches BaseException
and carries on, the exception is swallowed and the run goes on as if nothing had been pressed. Inside
`remembered()` the SIGINT handler also sets a flag, and the pipeline calls `check()` at its safe points (before
each stage, after each training step, between batches of the logits stage): a swallowed Ctrl-C stops the run
there, with the same message and exit code as one that was not.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_pressed = threading.Event()


def _handler(signum: int, frame: FrameType | None) -> None:
    _pressed.set()
    raise KeyboardInterrupt


@contextmanager
def remembered() -> Iterator[None]:
    """Remember Ctrl-C for `check()` while the block runs, then restore the previous handler. Outside the
    main thread (where no signal handler can be set) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _handler)
    _pressed.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _pressed.clear()


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed inside `remembered()`, even if that raise was swallowed."""
    if _pressed.is_set():
        raise KeyboardInterrupt
