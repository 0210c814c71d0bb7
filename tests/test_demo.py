"""The README's demo command, as a process: it serves an animating guest on
VNC, the picture is the guest's, and everything is gone after it stops."""
import contextlib
import os
import re
import signal
import urllib.request

import numpy as np

from pyxenfb.sim.fbdump import FbdumpError, fbdump_array
from simkit import start_demo, wait_until


@contextlib.contextmanager
def demo(*args: str):
    """The demo up to its "running" line: (process, what it printed, its run
    dir); killed on the way out if a test left it running."""
    proc, text = start_demo(*args)
    try:
        yield proc, text, re.search(r"simulated host in (\S+)", text).group(1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def assert_clean_stop(proc, run_dir: str) -> None:
    """Ctrl-C: exit status 0 (not 130) and the run dir gone."""
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    assert not os.path.exists(run_dir)


def test_demo_serves_the_guest_and_cleans_up():
    from vncdotool import api
    with demo("--vnc", ":17") as (proc, text, run_dir):
        port = int(re.search(r"on VNC 127\.0\.0\.1:(\d+)", text).group(1))
        assert port >= 5917
        # A browser is sent to the web console (its own relay), not to a
        # WebSocket on pyqemu-dm's VNC port.
        assert "noVNC" not in text and "WebSocket" not in text and f"port={port}" not in text, text
        console = re.search(r"web console: (http://127\.0\.0\.1:\d+/) \(for a browser.*?(http://\S+/domain/1/)", text)
        assert console, text
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with no_proxy.open(console.group(2), timeout=10) as page:
            assert page.status == 200 and b"<title>Console" in page.read()
        def framebuffer_set_up():     # the guest boots once its device model runs
            try:
                return fbdump_array(run_dir, 1) is not None
            except FbdumpError:
                return False
        wait_until(framebuffer_set_up, 30, "the demo's guest setting up its framebuffer")
        client = api.connect(f"127.0.0.1::{port}", timeout=10)
        try:
            shot = np.asarray(client.refreshScreen().screen.convert("RGB"))
        finally:
            client.disconnect()
        dump = fbdump_array(run_dir, 1)
        assert shot.shape == dump.shape == (600, 800, 3)
        # The guest animates a 48x48 square: everything else is identical.
        assert (shot != dump).any(axis=2).sum() <= 2 * 48 * 48
        assert_clean_stop(proc, run_dir)


def test_ctrl_c_as_soon_as_the_demo_says_running_is_a_clean_stop():
    """The stop signals are caught (handlers and a wakeup socket) before the
    line that invites Ctrl-C: one sent the moment the line appears (a loaded
    machine may not have run the demo any further) stops it cleanly, exit
    status 0, not 130."""
    for _ in range(3):
        with demo("--vnc", ":18", "--console-port", "-1") as (proc, text, run_dir):
            assert_clean_stop(proc, run_dir)
