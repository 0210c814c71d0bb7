"""Test kit for pyxenfb-console: start it as a process, talk HTTP to it."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from simkit import read_line

START_TIMEOUT = 30.0
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ConsoleProcess:
    """`pyxenfb-console --sim DIR --port 0 ...`; .url once it printed its ready line."""

    def __init__(self, run_dir: str, *extra: str, env: dict | None = None, nofile: int | None = None):
        """nofile: RLIMIT_NOFILE for the console (soft and hard)."""
        # The log goes to a file: a pipe nobody reads would stop the console once full.
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyxenfb.hostconsole.cli", "--sim", run_dir, "--port", "0", *extra],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
            start_new_session=True, preexec_fn=None if nofile is None else
            (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))))
        line = read_line(self.proc, START_TIMEOUT)
        if "serving " not in line:
            raise AssertionError(f"console did not start: {line!r} {self.close()}")
        self.url = line.split("serving ", 1)[1].split()[0].rstrip("/")

    def log_text(self) -> str:
        """The log so far (the console keeps running)."""
        self.log.flush()
        with open(f"/proc/self/fd/{self.log.fileno()}") as f:
            return f.read()

    def close(self) -> str:
        """Stop it; returns its log (stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.seek(0)
        return self.log.read()


def get(url: str, headers: dict | None = None, timeout: float = 10.0, opener=NO_PROXY):
    """(status, headers, body bytes); HTTP errors are answers too."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def api_domains(base: str) -> list[dict]:
    status, _, body = get(f"{base}/api/domains")
    assert status == 200, (status, body)
    return json.loads(body)


def wait_api(base: str, predicate, timeout: float, what: str) -> tuple[list[dict], float]:
    """Poll the API (an external process) until predicate(list); returns (list, seconds taken)."""
    t0 = time.monotonic()
    while True:
        domains = api_domains(base)
        if predicate(domains):
            return domains, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"API: {what} not within {timeout} s: {domains}")
        time.sleep(0.02)
