"""A domain dies with its host.

A supervisor (or a test's cleanup) stops a sim host by signalling its
process group: SIGTERM, then SIGKILL 0.5 s later.  Every guest and device
model of that host must then be gone within 5 s: the guests and the device
models notice their XenStore connection is lost.  With SIGKILL alone the
host gets no chance to kill its domains, so only that notice ends them.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyxenfb.sim.dmprocess import alive
from pyxenfb.sim.toolstack import create_domain
from simkit import HOST_START_TIMEOUT, read_line, short_run_dir, wait_frontends_connected, wait_until

GONE_WITHIN = 5.0               # the bound, from the SIGKILL
BOOT_TIMEOUT = 60.0             # 16 Python guests booting on 2 busy cores
WITH_DM = 2                     # domains with a full device model (the others: guest only)


def _start_host_group(run_dir: str) -> subprocess.Popen:
    """The host as the leader of a process group of its own."""
    proc = subprocess.Popen([sys.executable, "-m", "pyxenfb.sim.cli", "host", "--run-dir", run_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            process_group=0)
    assert "host ready" in read_line(proc, HOST_START_TIMEOUT)
    return proc


async def _create(run_dir: str, count: int):
    results = []
    for i in range(count):
        domid = i + 1
        if i < WITH_DM:
            r = await create_domain(run_dir, domid, f"hd{domid}",
                                    vfb="vnc=1,vnclisten=127.0.0.1,vncunused=1", dm="default")
        else:
            # Guest only: half with a vfb whose backend never comes, half without one.
            r = await create_domain(run_dir, domid, f"hd{domid}", dm=None,
                                    vfb="vnc=0" if i % 2 else None)
        results.append(r)
    return results


def _guest_log(run_dir: str, domid: int) -> str:
    try:
        return Path(run_dir, f"dom{domid}", "guest.log").read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _kill_host_and_measure(count: int, sigterm_first: bool) -> float:
    run_dir = short_run_dir()
    host = _start_host_group(run_dir)
    pids: list[int] = []
    logs: dict[int, str] = {}
    dm_logs: dict[int, str] = {}
    try:
        results = asyncio.run(asyncio.wait_for(_create(run_dir, count), BOOT_TIMEOUT))
        pids = [p for r in results for p in (r.guest_pid, r.dm_pid) if p]
        assert len(pids) == count + WITH_DM
        # "while domains run": every guest booted (its probe done, its log line out)
        wait_until(lambda: all("guest running" in _guest_log(run_dir, r.domid) for r in results),
                   BOOT_TIMEOUT, lambda: [r.domid for r in results
                                          if "guest running" not in _guest_log(run_dir, r.domid)])
        # ... and every device model past its start-up: it announces `running`
        # before its display stack loads (libxl's 60 s), so a guest can be up
        # while its DM still opens the event channels; killed then, a DM
        # reports that failure instead of the lost XenStore connection.
        for r in results[:WITH_DM]:
            asyncio.run(wait_frontends_connected(run_dir, r.domid, BOOT_TIMEOUT))
        if sigterm_first:
            os.killpg(host.pid, signal.SIGTERM)
            try:
                host.wait(0.5)          # half a second for a clean end, then the SIGKILL
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(host.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass                        # the host finished on SIGTERM alone
        killed = time.monotonic()
        host.wait(GONE_WITHIN)
        wait_until(lambda: not any(alive(p) for p in pids), GONE_WITHIN,
                   lambda: f"still alive: {[p for p in pids if alive(p)]}")
        took = time.monotonic() - killed
        logs = {r.domid: _guest_log(run_dir, r.domid) for r in results}
        dm_logs = {r.domid: Path(r.dm_log).read_text(errors="replace") for r in results if r.dm_log}
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            try:
                os.waitpid(pid, 0)      # our children (create_domain spawned them)
            except ChildProcessError:
                pass
        if host.poll() is None:
            host.kill()
        host.wait()
        host.stdout.close()
        host.stderr.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    for domid, text in logs.items():
        assert "Traceback" not in text, (domid, text)
    if not sigterm_first:
        # Nobody killed the guests: each one saw its host go and said so once.
        for domid, text in logs.items():
            assert text.count("XenStore connection lost") == 1, (domid, text)
        # ... and so did each device model, waiting on XenStore as it was.
        assert len(dm_logs) == WITH_DM
        for domid, text in dm_logs.items():
            assert "XenStore connection lost, exiting" in text, (domid, text)
    for domid, text in dm_logs.items():
        assert "Traceback" not in text, (domid, text)
    print(f"{count} domains, {'SIGTERM+SIGKILL' if sigterm_first else 'SIGKILL'}: "
          f"all gone {took:.2f} s after the SIGKILL")
    return took


@pytest.mark.parametrize("count", [2, 16])
def test_guests_and_device_models_die_with_their_host(count):
    _kill_host_and_measure(count, sigterm_first=True)


@pytest.mark.parametrize("count", [2, 16])
def test_guests_notice_a_host_killed_outright(count):
    _kill_host_and_measure(count, sigterm_first=False)
