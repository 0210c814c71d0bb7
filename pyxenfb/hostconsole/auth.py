"""Login for a console reachable from other machines: password file, sessions,
rate limit on failures.

Password file: one line `scrypt$N$r$p$<salt b64>$<hash b64>` (written by
`pyxenfb-console --hash-password`).  Sessions are random tokens kept in
memory (a restart logs everyone out), sent as an HttpOnly, Secure,
SameSite=Strict cookie.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass

SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
SESSION_TTL = 12 * 3600
MAX_SESSIONS = 1024
COOKIE = "pyxenfb_console"


class PasswordFileError(Exception):
    pass


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


@dataclass(frozen=True)
class PasswordHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    @classmethod
    def parse(cls, line: str) -> "PasswordHash":
        parts = line.strip().split("$")
        try:
            if len(parts) != 6 or parts[0] != "scrypt":
                raise ValueError("not scrypt$N$r$p$salt$hash")
            n, r, p = (int(x) for x in parts[1:4])
            if n < 2 or n & (n - 1) or n > 1 << 20 or not 1 <= r <= 32 or not 1 <= p <= 16:
                raise ValueError("scrypt parameters out of range")
            salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
            if len(salt) < 8 or len(digest) < 16:
                raise ValueError("salt or hash too short")
        except ValueError as e:
            raise PasswordFileError(f"password file: {e}") from None
        return cls(n, r, p, salt, digest)

    @classmethod
    def load(cls, path: str) -> "PasswordHash":
        try:
            with open(path) as f:
                return cls.parse(f.readline())
        except OSError as e:
            raise PasswordFileError(f"password file {path}: {e.strerror}") from None

    def check(self, password: str) -> bool:
        got = hashlib.scrypt(password.encode("utf-8", "replace"), salt=self.salt, n=self.n,
                             r=self.r, p=self.p, dklen=len(self.digest), maxmem=1 << 30)
        return hmac.compare_digest(got, self.digest)


class Sessions:
    def __init__(self, ttl: float = SESSION_TTL):
        self.ttl = ttl
        self._tokens: dict[str, float] = {}     # token -> expiry (monotonic)

    def new(self) -> str:
        now = time.monotonic()
        self._tokens = {t: e for t, e in self._tokens.items() if e > now}
        while len(self._tokens) >= MAX_SESSIONS:            # oldest out
            self._tokens.pop(min(self._tokens, key=self._tokens.get))
        token = secrets.token_urlsafe(32)
        self._tokens[token] = now + self.ttl
        return token

    def valid(self, token: str | None) -> bool:
        expiry = self._tokens.get(token or "")
        return expiry is not None and expiry > time.monotonic()

    def drop(self, token: str | None) -> None:
        self._tokens.pop(token or "", None)


class RateLimit:
    """After `free` failures from one address, each further attempt must wait
    a delay that doubles per failure (capped); a success forgets the address."""

    def __init__(self, free: int = 3, base: float = 1.0, cap: float = 300.0, max_entries: int = 4096):
        self.free, self.base, self.cap, self.max_entries = free, base, cap, max_entries
        self._entries: dict[str, tuple[int, float]] = {}     # addr -> (failures, blocked until)

    def retry_after(self, addr: str) -> float:
        """Seconds this address must still wait (0: may try now)."""
        _, until = self._entries.get(addr, (0, 0.0))
        return max(0.0, until - time.monotonic())

    def failed(self, addr: str) -> None:
        if len(self._entries) >= self.max_entries and addr not in self._entries:
            self._entries.pop(next(iter(self._entries)))
        failures = self._entries.get(addr, (0, 0.0))[0] + 1
        delay = 0.0 if failures <= self.free else min(self.cap, self.base * 2 ** (failures - self.free - 1))
        self._entries[addr] = (failures, time.monotonic() + delay)

    def succeeded(self, addr: str) -> None:
        self._entries.pop(addr, None)
