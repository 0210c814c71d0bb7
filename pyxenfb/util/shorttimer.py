"""A one-shot timer for delays below a millisecond, on an asyncio loop.

`loop.call_later(0.0002, ...)` fires after ~1.2 ms: asyncio sleeps in
epoll_wait, whose timeout is whole milliseconds (selectors rounds up), and
the wake-up adds its own.  A timerfd (timerfd_create(2), through ctypes:
os.timerfd_* arrive with Python 3.13) is armed to the nanosecond and wakes
the loop as a readable fd, within a few µs of its time.  Where there is no
timerfd (another libc, another OS) the timer falls back to call_later.
"""
from __future__ import annotations

import asyncio
import ctypes
import functools
import os
from typing import Callable

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = 0o4000
TFD_CLOEXEC = 0o2000000


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


@functools.cache
def _timerfd_calls():
    """(timerfd_create, timerfd_settime) from the C library in the process, or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    create.argtypes, create.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
    settime.restype = ctypes.c_int
    return create, settime


class ShortTimer:
    """start(delay) runs `callback` on `loop` once, `delay` seconds later
    (a start while armed moves it); cancel() disarms; close() frees the fd."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]):
        self._loop = loop
        self._callback = callback
        self._fd = -1
        self._handle: asyncio.TimerHandle | None = None     # the fallback
        self.active = False
        calls = _timerfd_calls()
        if calls is not None:
            fd = calls[0](CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
            if fd >= 0:
                self._fd, self._settime = fd, calls[1]
                loop.add_reader(fd, self._fired)

    @property
    def precise(self) -> bool:
        """A timerfd serves (else call_later's millisecond steps)."""
        return self._fd >= 0

    def start(self, delay: float) -> None:
        self.active = True
        if self._fd < 0:
            if self._handle is not None:
                self._handle.cancel()
            self._handle = self._loop.call_later(delay, self._fired)
            return
        ns = max(1, int(delay * 1e9))            # 0 would disarm
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(ns // 1_000_000_000, ns % 1_000_000_000))
        if self._settime(self._fd, 0, ctypes.byref(spec), None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def cancel(self) -> None:
        self.active = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._fd >= 0:
            self._settime(self._fd, 0, ctypes.byref(_Itimerspec()), None)

    def _fired(self) -> None:
        if self._fd >= 0:
            try:
                os.read(self._fd, 8)                 # the expiry count: clears the fd
            except BlockingIOError:
                return                               # disarmed after it became readable
        self._handle = None
        if self.active:
            self.active = False
            self._callback()

    def close(self) -> None:
        self.cancel()
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
