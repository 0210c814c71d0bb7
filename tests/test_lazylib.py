"""pyxenfb.util.lazylib: a library opened once, on first use."""
from __future__ import annotations

import threading

import pytest

from pyxenfb.util.lazylib import LazyLibrary


def test_opened_once_however_many_threads_ask_together():
    calls = []
    gate = threading.Barrier(8)

    def opener():
        calls.append(1)
        return "ffi", "lib"

    library = LazyLibrary(opener)
    assert not library.loaded and calls == []
    results = []

    def ask():
        gate.wait(timeout=10)
        results.append(library())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results == [("ffi", "lib")] * 8 and len(calls) == 1 and library.loaded


def test_a_missing_optional_library_is_remembered_as_none():
    calls = []
    library = LazyLibrary(lambda: calls.append(1) or ("ffi", None))
    assert library() == ("ffi", None) and library() == ("ffi", None) and len(calls) == 1


def test_an_opener_that_raises_is_tried_again():
    attempts = []

    def opener():
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("libxenevtchn.so.1: cannot open shared object file")
        return "ffi", "lib"

    library = LazyLibrary(opener)
    with pytest.raises(OSError):
        library()
    assert not library.loaded
    assert library() == ("ffi", "lib") and len(attempts) == 2
