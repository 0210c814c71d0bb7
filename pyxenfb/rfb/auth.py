"""VNC authentication (DES challenge/response) and the brute-force blacklist.

VNC auth: the server sends 16 random bytes; the client encrypts them with DES
(ECB, two independent blocks) keyed by the password's first 8 bytes, each key
byte with its bit order reversed (the RFB spec numbers DES key bits the other
way round from DES libraries).  DES comes from pycryptodome (through ctypes:
util/lean_imports.py).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

# hmac.compare_digest is OpenSSL's whenever hmac can load it, and importing
# hmac loads OpenSSL (~3.5 MB resident, for a 16-byte comparison).  The
# same constant-time comparison is built into the interpreter: it is what
# hmac itself uses without OpenSSL.
try:
    from _operator import _compare_digest as compare_digest
except ImportError:                 # an interpreter without it: hmac's
    from hmac import compare_digest

CHALLENGE_SIZE = 16


def _reverse_bits(byte: int) -> int:
    return int(f"{byte:08b}"[::-1], 2)


def des_key(password: str) -> bytes:
    """The 8-byte DES key RFB derives from a password (Latin-1, truncated/padded)."""
    raw = password.encode("latin-1", "replace")[:8].ljust(8, b"\0")
    return bytes(_reverse_bits(b) for b in raw)


def vnc_response(password: str, challenge: bytes) -> bytes:
    """What a client answers to `challenge` when it knows `password`."""
    from ..util.lean_imports import des_module
    DES = des_module()
    return DES.new(des_key(password), DES.MODE_ECB).encrypt(challenge)


def new_challenge() -> bytes:
    return os.urandom(CHALLENGE_SIZE)


def check_response(password: str, challenge: bytes, response: bytes) -> bool:
    """Constant-time comparison of the client's response with the expected one."""
    if len(response) != CHALLENGE_SIZE:
        return False
    return compare_digest(vnc_response(password, challenge), response)


# Brute force (docs/vnc.md, "Threat model"): 5 wrong passwords from an
# address block it for 10 s, each further one doubles that up to 60 s; an
# address quiet for 10 minutes starts afresh.
THRESHOLD = 5
INITIAL_BLOCK = 10.0
MAX_BLOCK = 60.0
FORGET_AFTER = 600.0
MAX_ENTRIES = 4096


@dataclass
class _Entry:
    failures: int = 0
    blocked_until: float = 0.0
    timeout: float = 0.0
    last_failure: float = 0.0


class Blacklist:
    """Refuse an address for a while after repeated wrong passwords.

    Only failures where there is a secret to guess count (the caller's
    business: protocol.AuthenticationFailed).  After `threshold` failures
    the address is blocked for `timeout` seconds; each failure after that
    doubles the block, up to `max_timeout`.  An address with no failure for
    `forget_after` seconds is forgotten (its next failure is a first one),
    as is one that authenticates.  At most `max_entries` addresses are
    remembered: the least recently failing goes first.
    """

    def __init__(self, threshold: int = THRESHOLD, timeout: float = INITIAL_BLOCK,
                 max_entries: int = MAX_ENTRIES, clock=time.monotonic, *,
                 max_timeout: float = MAX_BLOCK, forget_after: float = FORGET_AFTER):
        self.threshold = threshold
        self.initial_timeout = timeout
        self.max_timeout = max(timeout, max_timeout)
        self.forget_after = max(forget_after, self.max_timeout)
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[str, _Entry] = {}    # least recently failing first

    def __len__(self) -> int:
        return len(self._entries)

    def _current(self, address: str, now: float) -> _Entry | None:
        entry = self._entries.get(address)
        if entry is not None and now - entry.last_failure >= self.forget_after:
            del self._entries[address]
            return None
        return entry

    def blocked_for(self, address: str) -> float:
        """Seconds the address is still blocked (0 if it may try)."""
        now = self.clock()
        entry = self._current(address, now)
        if entry is None:
            return 0.0
        return max(0.0, entry.blocked_until - now)

    def failure(self, address: str) -> float:
        """Count a wrong password; returns the block it starts (0 if none)."""
        now = self.clock()
        entry = self._entries.pop(address, None)
        if entry is None or now - entry.last_failure >= self.forget_after:
            entry = _Entry()
            while len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
        self._entries[address] = entry          # now the most recent
        entry.failures += 1
        entry.last_failure = now
        if entry.failures < self.threshold:
            return 0.0
        entry.timeout = min(self.max_timeout, entry.timeout * 2 if entry.timeout else self.initial_timeout)
        entry.blocked_until = now + entry.timeout
        return entry.timeout

    def success(self, address: str) -> None:
        self._entries.pop(address, None)
