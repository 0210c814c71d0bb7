"""VNC authentication (DES challenge/response) and the brute-force blacklist.

VNC auth: the server sends 16 random bytes; the client encrypts them with DES
(ECB, two independent blocks) keyed by the password's first 8 bytes, each key
byte with its bit order reversed (the RFB spec numbers DES key bits the other
way round from DES libraries).  DES comes from pycryptodome.
"""
from __future__ import annotations

import hmac
import os
import time
from dataclasses import dataclass

CHALLENGE_SIZE = 16


def _reverse_bits(byte: int) -> int:
    return int(f"{byte:08b}"[::-1], 2)


def des_key(password: str) -> bytes:
    """The 8-byte DES key RFB derives from a password (Latin-1, truncated/padded)."""
    raw = password.encode("latin-1", "replace")[:8].ljust(8, b"\0")
    return bytes(_reverse_bits(b) for b in raw)


def vnc_response(password: str, challenge: bytes) -> bytes:
    """What a client answers to `challenge` when it knows `password`."""
    from Crypto.Cipher import DES
    return DES.new(des_key(password), DES.MODE_ECB).encrypt(challenge)


def new_challenge() -> bytes:
    return os.urandom(CHALLENGE_SIZE)


def check_response(password: str, challenge: bytes, response: bytes) -> bool:
    """Constant-time comparison of the client's response with the expected one."""
    if len(response) != CHALLENGE_SIZE:
        return False
    return hmac.compare_digest(vnc_response(password, challenge), response)


@dataclass
class _Entry:
    failures: int = 0
    blocked_until: float = 0.0
    timeout: float = 0.0


class Blacklist:
    """Refuse an address for a while after repeated authentication failures.

    After `threshold` failures the address is blocked for `timeout` seconds;
    each failure after a block doubles the timeout (as TigerVNC does).
    A success forgets the address.
    """

    def __init__(self, threshold: int = 5, timeout: float = 10.0, max_entries: int = 4096,
                 clock=time.monotonic):
        self.threshold = threshold
        self.initial_timeout = timeout
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def blocked_for(self, address: str) -> float:
        """Seconds the address is still blocked (0 if it may try)."""
        entry = self._entries.get(address)
        if entry is None:
            return 0.0
        return max(0.0, entry.blocked_until - self._clock())

    def failure(self, address: str) -> None:
        entry = self._entries.get(address)
        if entry is None:
            if len(self._entries) >= self.max_entries:
                # Bounded memory: forget the oldest address.
                self._entries.pop(next(iter(self._entries)))
            entry = self._entries[address] = _Entry()
        entry.failures += 1
        if entry.failures >= self.threshold:
            entry.timeout = entry.timeout * 2 if entry.timeout else self.initial_timeout
            entry.blocked_until = self._clock() + entry.timeout

    def success(self, address: str) -> None:
        self._entries.pop(address, None)
