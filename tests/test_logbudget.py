"""The log budget (pyxenfb/util/logbudget.py): a log nobody can fill.

Under dm_restrict a log past 256 KiB kills the device model (SIGXFSZ), so
what clients and guests can make us write is bounded: unit tests on a fake
clock, then 100,000 hostile VNC connections and a hostile guest storm, each
with the log's size measured through the device model's own formatter.
"""
from __future__ import annotations

import asyncio
import io
import logging
import os
import subprocess
import sys
import time

import numpy as np

from pyxenfb.devices import xenfb_abi as abi
from pyxenfb.machine.cli import _PrefixFormatter
from pyxenfb.util.logbudget import LogBudget
from rfb_harness import ServerThread
from simkit import connected_domain, wait_for, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
LOG_TARGET = 64 * 1024


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _budget(**kw):
    logger = logging.getLogger(f"test.logbudget.{id(kw)}.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    lines = Lines()
    logger.addHandler(lines)
    clock = Clock()
    return LogBudget(logger, clock=clock, **kw), lines, clock


def test_burst_then_one_summary_on_the_next_event():
    budget, out, clock = _budget(burst=3, interval=60)
    for i in range(1000):
        budget.info("refused", "client %d refused", i, what="refused connections")
    assert out.lines == ["client 0 refused", "client 1 refused", "client 2 refused"]
    clock.now += 61
    budget.info("refused", "client %d refused", 1000, what="refused connections")
    assert out.lines[3] == ("997 more refused connections in the last 61 s "
                            "(last: client 999 refused)")
    # The storm went on: a window twice as long, one line let through.
    assert out.lines[4:] == ["client 1000 refused"]
    for i in range(50):
        budget.info("refused", "client %d refused", 2000 + i)
    assert len(out.lines) == 5
    clock.now += 121
    budget.info("refused", "again")
    assert out.lines[5].startswith("50 more refused connections in the last 2 min")
    # Kinds are independent.
    budget.warning("other", "something else")
    assert out.lines[-1] == "something else"


def test_quiet_window_resets_and_counts_are_grouped():
    budget, out, clock = _budget(burst=2, interval=10)
    for _ in range(5000):
        budget.info("k", "x")
    clock.now += 10
    budget.info("k", "y")                       # summary, then window 2 (20 s, 1 line)
    clock.now += 20
    budget.info("k", "z")                       # window 2 had no suppression: summary-free reset
    clock.now += 10
    for _ in range(3):
        budget.info("k", "w")
    assert out.lines == ["x", "x", "4,998 more 'k' events in the last 10 s (last: x)",
                         "y", "z", "w", "w"]


def test_a_storm_over_a_long_life_costs_a_few_dozen_lines():
    budget, out, clock = _budget()
    for _tick in range(7 * 24 * 3600 // 30):   # a week, 10 events every 30 s
        clock.now += 30
        for _ in range(10):
            budget.info("k", "refused")
    assert len(out.lines) < 400, len(out.lines)
    assert sum(len(x) + 40 for x in out.lines) < LOG_TARGET


def test_timer_only_while_something_is_suppressed():
    """No timer wakes an idle process: one call_later, armed by the first
    suppressed line, writes the summary; nothing is armed otherwise."""
    async def body():
        budget, out, _ = _budget(burst=2, interval=0.2)
        budget.clock = asyncio.get_running_loop().time
        budget.info("a", "one")
        budget.info("a", "two")
        assert budget._kinds["a"].timer is None
        for _ in range(10):
            budget.info("a", "more")
        assert budget._kinds["a"].timer is not None
        await wait_for(lambda: len(out.lines) == 3, 5, "the summary")
        assert out.lines[2].startswith("10 more 'a' events in the last")
        assert budget._kinds["a"].timer is None
        budget.info("b", "quiet")               # within its burst: nothing armed
        assert budget._kinds["b"].timer is None
    asyncio.run(body())


def _capture(logger_name: str):
    """The device model's log format (cli.setup_logging) into a buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_PrefixFormatter("pyqemu-dm[1]"))
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)

    def done():
        logger.removeHandler(handler)
        logger.setLevel(old)
        return stream.getvalue()
    return done


def test_100000_hostile_connections_leave_a_small_log_that_says_what_happened():
    count = 100_000
    srv = ServerThread()
    done = _capture("pyxenfb.rfb")
    try:
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, os.path.join(HERE, "hostile_vnc.py"), str(srv.port),
                            str(count), "4"], capture_output=True, text=True, timeout=180)
        elapsed = time.monotonic() - t0
        assert r.stdout.strip() == f"done {count}", r.stderr[-2000:]
        wait_until(lambda: srv.call(lambda: len(srv.server.clients)) == 0, 10, "clients gone")
        srv.call(srv.server.budget.flush)         # what the window holds, as at exit
    finally:
        text = done()
        srv.close()
    size = len(text.encode())
    print(f"{count} hostile connections in {elapsed:.1f} s; log {size} bytes, "
          f"{text.count(chr(10))} lines")
    assert size < LOG_TARGET, size
    summaries = [line for line in text.splitlines() if " more " in line]
    assert any("VNC connections closed before ClientInit" in line and "protocol version" in line
               for line in summaries), summaries
    counted = sum(int(line.split(": ", 1)[1].split(" more ")[0].replace(",", ""))
                  for line in summaries if "VNC connections closed before ClientInit" in line)
    logged = sum(1 for line in text.splitlines() if "disconnected: " in line and " more " not in line)
    assert counted + logged == count, (counted, logged)


def test_hostile_guest_storm_leaves_a_small_log():
    """Bad ring indexes, impossible resizes, state cycling and a full input
    ring, tens of thousands of times: a few lines per kind, then summaries."""
    async def body():
        done = _capture("pyxenfb.xenfb")
        try:
            async with connected_domain(1) as (_run_dir, guest, be, _listener):
                fb, kbd = be.fb, be.kbd
                for i in range(20_000):
                    guest.fb.poke(abi.FB_OUT_PROD, "<I", 1000 + i)      # inconsistent indexes
                    guest.fb.poke(abi.FB_OUT_CONS, "<I", 0)
                    fb.on_event()
                guest.fb.poke(abi.FB_OUT_PROD, "<I", 0)
                guest.fb.poke(abi.FB_OUT_CONS, "<I", 0)
                for i in range(20_000):                                # resizes, good and bad
                    depth = 32 if i % 2 else 12                          # 12: refused
                    fb._handle_out_event(abi.pack_event(abi.FB_RESIZE, abi.XENFB_TYPE_RESIZE,
                                                        320 + (i % 7) * 8, 200, 3200, depth, 0))
                guest.kbd.poke(abi.KBD_IN_CONS, "<I", 0)               # the guest stops consuming
                for i in range(20_000):
                    be.console.key(30, bool(i & 1))
                for _ in range(30):                                    # frontend reboots
                    await guest.reboot()
                    await wait_for(lambda: fb.connected and kbd.connected, 10, "reconnected")
                be.ctx.budget.flush()
                # Still a working device afterwards.
                guest.fb.refresh(*guest.fb.draw_box(1))
                await wait_for(lambda: np.array_equal(
                    be.console.surface.rows[:, :guest.fb.width * 4].view("<u4")
                    .reshape(guest.fb.height, guest.fb.width), guest.fb.fb), 10, "picture")
        finally:
            text = done()
        size = len(text.encode())
        print(f"hostile guest storm: log {size} bytes, {text.count(chr(10))} lines")
        assert size < LOG_TARGET // 4, size
        summaries = [line for line in text.splitlines() if " more " in line]
        for what in ("refusals (out-ring-indexes)", "refusals (resize)", "refusals (in-ring-full)",
                     "resize events", "state events"):
            assert any(what in line for line in summaries), (what, summaries)
    asyncio.run(asyncio.wait_for(body(), 300))
