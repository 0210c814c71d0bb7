"""Login for a console reachable from other machines: password file, sessions,
rate limit on failures.

Password file: one line `scrypt$N$r$p$<salt b64>$<hash b64>` (written by
`pyxenfb-console --hash-password`; new lines use N=2^17, r=8, p=1 — OWASP's
current guidance — and lines with other parameters, such as the N=2^14 ones
written before, still verify with their own).  Sessions are random tokens kept in
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

SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 17, 8, 1     # 128 MiB and ~0.3-0.7 s per hash

SESSION_TTL = 12 * 3600
MAX_SESSIONS = 1024
COOKIE = "pyxenfb_console"


def scrypt_maxmem(n: int, r: int, p: int) -> int:
    """hashlib.scrypt refuses to use more than `maxmem`; the work area is
    128*N*r bytes (plus 128*r*p), so give it that and a margin."""
    return 128 * n * r + 128 * r * p + (1 << 20)


class PasswordFileError(Exception):
    pass


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=32, maxmem=scrypt_maxmem(SCRYPT_N, SCRYPT_R, SCRYPT_P))
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
            if n < 2 or n & (n - 1) or n > 1 << 20 or not 1 <= r <= 32 or not 1 <= p <= 16 \
                    or 128 * n * r > 1 << 30:
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
                             r=self.r, p=self.p, dklen=len(self.digest),
                             maxmem=scrypt_maxmem(self.n, self.r, self.p))
        return hmac.compare_digest(got, self.digest)


class Sessions:
    """`on_end(token)` is called when a session is dropped (logout) or evicted, so
    what it opened (relays) can end with it; expiry is `expiry(token)`."""

    def __init__(self, ttl: float = SESSION_TTL, on_end=None):
        self.ttl = ttl
        self.on_end = on_end
        self._tokens: dict[str, float] = {}     # token -> expiry (monotonic)

    def new(self) -> str:
        now = time.monotonic()
        self._tokens = {t: e for t, e in self._tokens.items() if e > now}
        while len(self._tokens) >= MAX_SESSIONS:            # oldest out
            self._end(min(self._tokens, key=self._tokens.get))
        token = secrets.token_urlsafe(32)
        self._tokens[token] = now + self.ttl
        return token

    def valid(self, token: str | None) -> bool:
        expiry = self._tokens.get(token or "")
        return expiry is not None and expiry > time.monotonic()

    def expiry(self, token: str | None) -> float | None:
        """When the session ends (time.monotonic()), None if it is not valid."""
        return self._tokens.get(token or "") if self.valid(token) else None

    def drop(self, token: str | None) -> None:
        if token and token in self._tokens:
            self._end(token)

    def _end(self, token: str) -> None:
        del self._tokens[token]
        if self.on_end is not None:
            self.on_end(token)


@dataclass
class _Attempts:
    failures: int = 0           # recent failures (one forgiven per `cap` seconds of quiet)
    last: float = 0.0           # when the count last changed
    until: float = 0.0          # no new attempt before this (monotonic)
    inflight: int = 0           # attempts being checked right now


class LoginThrottle:
    """Login attempts per client address, counted *before* the password is
    checked, so parallel guesses can't all slip past a limit meant for serial ones.

    `free` attempts (failed or in flight) are allowed at once; past them an
    address gets one attempt at a time, each after a delay that doubles per
    failure (base, 2*base, ...) up to `cap`.  The cap is low on purpose: an
    attacker and the admin may share an address (NAT, an SSH tunnel's
    loopback), and the admin must get in soon after an attack stops; the
    hashing cost and the console-wide bound on hashes (app.py) limit the
    guessing rate, not this.  Failures are forgiven one per `cap` seconds of
    quiet, and a success forgets the address.
    """

    def __init__(self, free: int = 3, base: float = 1.0, cap: float = 10.0,
                 max_entries: int = 4096, clock=time.monotonic):
        self.free, self.base, self.cap, self.max_entries = free, base, cap, max_entries
        self.clock = clock
        self._entries: dict[str, _Attempts] = {}

    def _entry(self, addr: str, now: float) -> _Attempts | None:
        e = self._entries.get(addr)
        if e is not None and e.failures and now - e.last >= self.cap:
            forgiven = int((now - e.last) // self.cap)
            e.failures = max(0, e.failures - forgiven)
            e.last += forgiven * self.cap
        if e is not None and not e.failures and not e.inflight:
            del self._entries[addr]
            return None
        return e

    def retry_after(self, addr: str) -> float:
        """Seconds until `begin(addr)` could admit an attempt (0: now)."""
        now = self.clock()
        e = self._entry(addr, now)
        if e is None or e.failures + e.inflight < self.free:
            return 0.0
        if e.inflight:
            return max(1.0, e.until - now)      # one attempt at a time: about a hash's time
        return max(0.0, e.until - now)

    def begin(self, addr: str) -> float:
        """Admit an attempt (returns 0; call `end` after) or say how long to wait."""
        wait = self.retry_after(addr)
        if wait > 0:
            return wait
        e = self._entries.get(addr)
        if e is None:
            if len(self._entries) >= self.max_entries:
                # Full: drop an address that has nothing in flight (the oldest such).
                for old, entry in self._entries.items():
                    if not entry.inflight:
                        del self._entries[old]
                        break
            e = self._entries[addr] = _Attempts(last=self.clock())
        e.inflight += 1
        return 0.0

    def end(self, addr: str, ok: bool | None) -> None:
        """The attempt `begin` admitted is over: ok=True logged in, False failed,
        None no verdict (refused for another reason before the check)."""
        e = self._entries.get(addr)
        if e is None:
            return
        e.inflight = max(0, e.inflight - 1)
        now = self.clock()
        if ok:
            e.failures, e.until = 0, 0.0
        elif ok is False:
            e.failures += 1
            e.last = now
            if e.failures >= self.free:
                e.until = now + min(self.cap, self.base * 2 ** (e.failures - self.free))
        self._entry(addr, now)          # drops the address once nothing is left to remember
