"""A C library through cffi's ABI mode, opened the first time it is asked
for: start-up stays cheap (a TCG dom0 pays for every dlopen), and a
library that only some hosts have (libxenevtchn, libpixman) is looked for
only by the code that needs it."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class LazyLibrary:
    """`library()` gives (ffi, lib), calling `opener` once, the first time,
    under a lock (encoder threads and the loop may ask together).  An
    optional library's opener returns lib None when it is missing; one
    that raises is tried again on the next call."""

    def __init__(self, opener: Callable[[], tuple[Any, Any]]):
        self._opener = opener
        self._lock = threading.Lock()
        self.loaded = False
        self.ffi: Any = None
        self.lib: Any = None

    def __call__(self) -> tuple[Any, Any]:
        if not self.loaded:
            with self._lock:
                if not self.loaded:
                    self.ffi, self.lib = self._opener()
                    self.loaded = True
        return self.ffi, self.lib
