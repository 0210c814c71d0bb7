"""Shared fixtures: a simulated host process per test."""
import shutil
import sys

import pytest

from simkit import short_run_dir, start_host, stop_host


@pytest.fixture
def host():
    """A `pyxenfb-sim host` process on a fresh run dir; yields the run dir."""
    run_dir = short_run_dir()
    proc = start_host(run_dir)
    yield run_dir
    stop_host(proc)
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _twisted_reactor_once():
    """vncdotool's API runs Twisted's reactor in a thread that cannot be
    restarted: stop it once, at the end of the session, never per test."""
    yield
    if "vncdotool.api" in sys.modules:
        sys.modules["vncdotool.api"].shutdown()
