"""The machine's hook for a launcher that forked it (docs/zygote.md).

A cold device model is the process the toolstack exec'd; one forked by a
launcher (the zygote) is not: the exec'd process stays as a stand-in.  The
launcher registers a `Supervisor` before it hands over to the cold path
(machine.cli.main); the machine asks it, never the launcher's package,
which process the toolstack exec'd and how to learn that it is gone.
Without a registration the defaults describe a cold start.

Only the standard library (os): the stand-in's path imports this module
before the hand-over, for seconds_since_exec.
"""
from __future__ import annotations

import os


class Supervisor:
    """A cold start's answers; a launcher registers a subclass."""

    def exec_pid(self) -> int | str:
        """The process the toolstack exec'd for this device model ("self")."""
        return "self"

    def watch(self, loop, on_lost=None) -> None:
        """Called by the machine once its loop runs: a launcher adds its
        readers here (its signals, its stand-in's death -> on_lost, then exit)."""


_current = Supervisor()


def register(supervisor: Supervisor) -> None:
    """Before the machine starts: the launcher's answers from now on."""
    global _current
    _current = supervisor


def current() -> Supervisor:
    return _current


def seconds_since_exec(pid: int | str = "self") -> float | None:
    """How long ago pid was started (its exec, for one the toolstack
    started): /proc's start time against the uptime, 10 ms resolution."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return max(0.0, float(f.read().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return None
