"""A private Xvfb for tests: Xvfb picks a free display itself (-displayfd),
so parallel test runs never race for the same number."""
from __future__ import annotations

import os
import select
import subprocess

START_TIMEOUT = 15.0


class Xvfb:
    def __init__(self, screen: str = "1280x1024x24"):
        read_fd, write_fd = os.pipe()
        self.proc = subprocess.Popen(
            # -noreset: by default the server resets when its last client
            # leaves, and a client connecting meanwhile gets "Can't open
            # display" (seen: a TigerVNC viewer started right after the
            # previous test's viewer quit)
            ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", screen, "-nolisten", "tcp",
             "-noreset"],
            pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(write_fd)
        # Read the whole "N\n" line before closing our end: Xvfb may write the
        # newline separately and would die of SIGPIPE on a closed pipe.
        line = b""
        try:
            while not line.endswith(b"\n"):
                ready, _, _ = select.select([read_fd], [], [], START_TIMEOUT)
                chunk = os.read(read_fd, 32) if ready else b""
                if not chunk:
                    break
                line += chunk
        finally:
            os.close(read_fd)
        number = line.decode().strip()
        if not number.isdigit():
            self.stop()
            raise RuntimeError(f"Xvfb did not start within {START_TIMEOUT} s")
        self.display = f":{number}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
