"""util/shorttimer.py: a one-shot sub-millisecond timer on a timerfd, with
call_later as the fallback."""
from __future__ import annotations

import asyncio
import time

import pytest

from pyxenfb.util import shorttimer
from pyxenfb.util.shorttimer import ShortTimer


def _run(body):
    return asyncio.run(asyncio.wait_for(body(), 10))


@pytest.mark.parametrize("timerfd", [True, False], ids=["timerfd", "call_later"])
def test_fires_once_not_before_its_time_and_cancel_stops_it(monkeypatch, timerfd):
    if not timerfd:
        shorttimer._timerfd_calls.cache_clear()
        monkeypatch.setattr(shorttimer, "_timerfd_calls", lambda: None)

    async def body():
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        done = asyncio.Event()

        def callback():
            fired.append(time.perf_counter())
            done.set()
        timer = ShortTimer(loop, callback)
        assert timer.precise is timerfd
        t0 = time.perf_counter()
        timer.start(0.0003)
        assert timer.active
        await done.wait()
        assert len(fired) == 1 and fired[0] - t0 >= 0.0003 and not timer.active
        # cancelled: its time passes with nothing.  The barrier is a second
        # ShortTimer 50x later: the first, had it stayed armed, fires before it.
        timer.start(0.0002)
        timer.cancel()
        barrier = asyncio.Event()
        later = ShortTimer(loop, barrier.set)
        later.start(0.01)
        await barrier.wait()
        later.close()
        # restarted while armed: one call, at the later time (the final count
        # shows the earlier time, long past by then, fired nothing)
        done.clear()
        t1 = time.perf_counter()
        timer.start(0.0002)
        timer.start(0.002)
        await done.wait()
        timer.close()
        return fired, t1
    fired, t1 = _run(body)
    assert len(fired) == 2 and fired[1] - t1 >= 0.002


def test_a_closed_timer_leaves_no_fd_on_the_loop():
    async def body():
        loop = asyncio.get_running_loop()
        timer = ShortTimer(loop, lambda: None)
        fd = timer._fd
        assert fd >= 0
        timer.close()
        assert timer._fd == -1
        assert not loop.remove_reader(fd)          # not registered any more
    _run(body)
