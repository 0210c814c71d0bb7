"""The README's demo command, as a process: it serves an animating guest on
VNC, the picture is the guest's, and everything is gone after it stops."""
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from pyxenfb.sim.fbdump import FbdumpError, fbdump_array



def test_demo_serves_the_guest_and_cleans_up():
    from vncdotool import api
    proc = subprocess.Popen([sys.executable, "-m", "pyxenfb.sim.cli", "demo", "--vnc", ":17"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        # A thread reads stdout: the demo prints several lines at once.
        out: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [out.put(x) for x in proc.stdout], daemon=True).start()
        lines = []
        while not lines or "running; Ctrl-C to stop" not in lines[-1]:
            try:
                lines.append(out.get(timeout=60))
            except queue.Empty:
                raise AssertionError(f"demo printed {lines} then nothing for 60 s") from None
        text = "".join(lines)
        run_dir = re.search(r"simulated host in (\S+)", text).group(1)
        port = int(re.search(r"on VNC 127\.0\.0\.1:(\d+)", text).group(1))
        assert port >= 5917
        deadline = time.monotonic() + 30
        while True:                    # the guest boots once its device model runs
            try:
                fbdump_array(run_dir, 1)
                break
            except FbdumpError:
                assert time.monotonic() < deadline, "the demo's guest never set up its framebuffer"
                time.sleep(0.1)
        client = api.connect(f"127.0.0.1::{port}", timeout=10)
        try:
            shot = np.asarray(client.refreshScreen().screen.convert("RGB"))
        finally:
            client.disconnect()
        dump = fbdump_array(run_dir, 1)
        assert shot.shape == dump.shape == (600, 800, 3)
        # The guest animates a 48x48 square: everything else is identical.
        assert (shot != dump).any(axis=2).sum() <= 2 * 48 * 48
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert not os.path.exists(run_dir)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
