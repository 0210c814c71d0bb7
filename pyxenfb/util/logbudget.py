"""Log lines an outside party can cause, on a budget.

A VNC client can connect 100,000 times and a hostile guest can send bad ring
events forever; one log line each would fill the disk (libxl never rotates
/var/log/xen/qemu-dm-NAME.log) or, under dm_restrict, pass RLIMIT_FSIZE
(256 KiB) and kill the device model with SIGXFSZ.  So each *kind* of line
(a fixed key chosen by the caller, never the variable text) gets `burst`
lines per window; the rest are counted and summarised in one line when the
window closes:

    12,345 more refused VNC connections in the last 60 s (last: VNC: client 127.0.0.1:4242 disconnected: ...)

While a storm goes on, each following window is twice as long (up to
`max_interval`) and lets one line through, so a storm that lasts a guest's
life costs a few dozen lines, not one per minute.  A quiet window resets the
kind.  Nothing wakes an idle process: a summary is written on the next line
of its kind after its window, or by one `call_later` armed only while
something is suppressed (and only when called inside a running loop).
"""
from __future__ import annotations

import asyncio
import logging
import time

BURST = 10                # lines of a kind per window, before summarising
INTERVAL = 60.0           # first window, seconds
MAX_INTERVAL = 3600.0     # windows double while a storm lasts, up to this
LAST_TEXT = 160           # how much of the last suppressed line a summary quotes


class _Kind:
    __slots__ = ("start", "interval", "allowed", "lines", "suppressed", "last", "level", "timer")

    def __init__(self, now: float, interval: float, burst: int):
        self.start = now
        self.interval = interval
        self.allowed = burst
        self.lines = 0
        self.suppressed = 0
        self.last = ""
        self.level = logging.INFO
        self.timer: asyncio.TimerHandle | None = None


class LogBudget:
    """`budget.log(kind, level, msg, *args, what="refused VNC connections")`."""

    def __init__(self, logger: logging.Logger, *, burst: int = BURST, interval: float = INTERVAL,
                 max_interval: float = MAX_INTERVAL, clock=time.monotonic):
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.max_interval = max_interval
        self.clock = clock
        self._kinds: dict[str, _Kind] = {}
        self._what: dict[str, str] = {}

    def log(self, kind: str, level: int, msg: str, *args, what: str | None = None) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = self.clock()
        k = self._kinds.get(kind)
        if k is None:
            k = self._kinds[kind] = _Kind(now, self.interval, self.burst)
        elif now - k.start >= k.interval:
            self._roll(kind, k, now)
        if what:
            self._what[kind] = what
        if k.lines < k.allowed:
            k.lines += 1
            self.logger.log(level, msg, *args, stacklevel=3)   # the caller's line
            return
        k.suppressed += 1
        k.level = max(k.level, level)
        k.last = (msg % args if args else msg)[:LAST_TEXT]
        if k.timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return                  # no loop: the next line of this kind summarises
            k.timer = loop.call_later(max(0.0, k.start + k.interval - now), self._expire, kind)

    def info(self, kind: str, msg: str, *args, what: str | None = None) -> None:
        self.log(kind, logging.INFO, msg, *args, what=what)

    def warning(self, kind: str, msg: str, *args, what: str | None = None) -> None:
        self.log(kind, logging.WARNING, msg, *args, what=what)

    def flush(self) -> None:
        """Write every pending summary now (at exit)."""
        now = self.clock()
        for kind, k in list(self._kinds.items()):
            if k.suppressed:
                self._summarise(kind, k, now)
                k.suppressed = 0

    def _expire(self, kind: str) -> None:
        k = self._kinds.get(kind)
        if k is not None:
            k.timer = None
            self._roll(kind, k, self.clock())

    def _roll(self, kind: str, k: _Kind, now: float) -> None:
        """Close the window of `kind`: summarise it, size the next one."""
        if k.timer is not None:
            k.timer.cancel()
            k.timer = None
        if k.suppressed:
            self._summarise(kind, k, now)
            k.interval = min(k.interval * 2, self.max_interval)
            k.allowed = 1               # the storm goes on: one line, then count
        else:
            k.interval, k.allowed = self.interval, self.burst
        k.start, k.lines, k.suppressed, k.last, k.level = now, 0, 0, "", logging.INFO

    def _summarise(self, kind: str, k: _Kind, now: float) -> None:
        span = now - k.start
        span_text = f"{span:.0f} s" if span < 120 else f"{span / 60:.0f} min"
        what = self._what.get(kind, f"'{kind}' events")
        self.logger.log(k.level, "%s more %s in the last %s (last: %s)",
                        f"{k.suppressed:,}", what, span_text, k.last)
