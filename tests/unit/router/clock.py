"""A clock for code that takes one: it moves only when a test moves it."""

from __future__ import annotations


class Clock:
    """Stands in for `time.monotonic`: returns `now`, which only the test changes."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
