"""The reference guest's input log (DIR/dom<N>/input.log, one JSON object per
line): reading it and following it like `tail -f`."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from .rundir import ToolstackError, input_log_path


def read_input_log(run_dir: str | None, domid: int) -> list[dict]:
    """The reference guest's input events so far (unparseable lines skipped)."""
    try:
        text = Path(input_log_path(run_dir, domid)).read_text(errors="replace")
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue                    # a line still being written
        if isinstance(event, dict):
            events.append(event)
    return events


def follow_input_log(run_dir: str | None, domid: int, emit: Callable[[str], None],
                     follow: bool, stop: Callable[[], bool] = lambda: False) -> None:
    """Print the log; with follow, keep printing what is appended.

    The stdlib has no inotify, so --follow sleeps 0.2 s between reads, as
    `tail -f` does without inotify.  This is a CLI convenience only; nothing
    in the sim waits like this.
    """
    path = input_log_path(run_dir, domid)
    pending = b""
    while True:
        try:
            f = open(path, "rb")
            break
        except FileNotFoundError:
            if not follow:
                raise ToolstackError(f"no input log at {path}") from None
            if stop():
                return
            time.sleep(0.2)
    with f:
        while True:
            chunk = f.read(65536)
            if chunk:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    emit(line.decode(errors="replace"))
                continue
            if not follow or stop():
                if pending:
                    emit(pending.decode(errors="replace"))
                return
            time.sleep(0.2)
