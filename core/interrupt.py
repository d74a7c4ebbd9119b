"""Ctrl-C that is not lost.

Python raises KeyboardInterrupt wherever the main thread is when the signal is handled. Where that is a
finalizer or a weakref callback ("Exception ignored in ..."), or a library's handler that catches BaseException
and carries on, the exception is swallowed and the run goes on as if nothing had been pressed. Inside
`remembered()` the SIGINT handler does not raise inside a finalizer: it sends the signal again a moment later,
so the exception is raised in ordinary code. It also sets a flag, and the pipeline calls `check()` at its safe
points (before each stage, after each training step, between batches of the logits stage): a Ctrl-C swallowed
anywhere else stops the run there, with the same message and exit code as one that was not.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_pressed = threading.Event()
_resends: list[threading.Timer] = []


RESEND_S = 0.05  # how long after a press that landed in a finalizer the signal is sent again


def _in_finalizer(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _handler(signum: int, frame: FrameType | None) -> None:
    _pressed.set()
    if _in_finalizer(frame):
        # Raised inside a finalizer, the exception would be printed as "Exception ignored in ..." with a
        # traceback and dropped (tqdm's __del__ is one, at the end of every progress bar). Send the signal again
        # a moment later, once the finalizer has returned; check() stays the backstop.
        timer = threading.Timer(RESEND_S, os.kill, (os.getpid(), signal.SIGINT))
        timer.daemon = True
        _resends.append(timer)
        timer.start()
        return
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
        for timer in _resends:  # nothing may reach the caller's handler after the command is over
            timer.cancel()
        _resends.clear()
        signal.signal(signal.SIGINT, previous)
        _pressed.clear()


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed inside `remembered()`, even if that raise was swallowed."""
    if _pressed.is_set():
        raise KeyboardInterrupt
