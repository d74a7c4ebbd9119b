"""A wall-clock limit for one invocation (`make distill TIME_LIMIT=<seconds>`), for leased or queued GPU time.

The pipeline stops cleanly before the limit instead of being killed at it: no stage starts with less than
`MIN_STAGE_S` left, and the training loops save a checkpoint and stop when the next steps would not fit.
The same command run again resumes where this one stopped (finished stages are reused, training restarts
from its checkpoint). The limit travels in the environment as an absolute time, so every process of a
multi-process launch and every stage sees the same one.
"""
from __future__ import annotations

import os
import time

ENV = "DISTILL_DEADLINE"  # unix time after which no new work should start
MIN_STAGE_S = 60.0  # no stage starts with less than this left: its loading alone takes tens of seconds
EXIT_CODE = 75  # EX_TEMPFAIL: not finished, run the same command again


class TimeLimitReached(RuntimeError):
    """The invocation's time limit is near; everything finished so far is kept and a rerun continues."""


def set_time_limit(seconds: float) -> None:
    """Start the clock: the deadline is `seconds` from now (0 or less: no limit)."""
    if seconds > 0:
        os.environ[ENV] = f"{time.time() + seconds:.3f}"
    else:
        os.environ.pop(ENV, None)


def remaining() -> float | None:
    """Seconds left before the deadline, or None without one."""
    raw = os.environ.get(ENV)
    if not raw:
        return None
    try:
        return float(raw) - time.time()
    except ValueError:
        raise ValueError(f"{ENV}={raw!r} is not a unix time; unset it or use TIME_LIMIT=<seconds>") from None


def check_stage_start(stage: str) -> None:
    """Raise TimeLimitReached if too little time is left to start `stage`."""
    left = remaining()
    if left is not None and left < MIN_STAGE_S:
        raise TimeLimitReached(f"{max(left, 0):.0f} s left of the time limit, too little to start stage {stage}")


def training_should_stop(step_seconds: float, save_seconds: float = 30.0) -> bool:
    """True when two more steps of `step_seconds` and a checkpoint save would not fit before the deadline."""
    left = remaining()
    return left is not None and left < 2 * step_seconds + save_seconds
