"""rfb/auth.py directly: the VNC DES challenge/response and the blacklist."""
from __future__ import annotations

import pytest
from Crypto.Cipher import DES
from hypothesis import given
from hypothesis import strategies as st

from pyxenfb.rfb.auth import (
    CHALLENGE_SIZE, Blacklist, check_response, des_key, new_challenge, vnc_response,
)

# The worked example of "The DES Algorithm Illustrated" (J. Orlin Grabbe):
# key 133457799BBCDFF1, plaintext 0123456789ABCDEF -> 85E813540F0AB405.
DES_KEY = bytes.fromhex("133457799BBCDFF1")
DES_PLAIN = bytes.fromhex("0123456789ABCDEF")
DES_CIPHER = bytes.fromhex("85E813540F0AB405")


def mirrored(byte: int) -> int:
    """Bit 0 <-> bit 7 etc., by shifting (auth.py formats a string instead)."""
    out = 0
    for _ in range(8):
        out = (out << 1) | (byte & 1)
        byte >>= 1
    return out


# The password whose RFB key is that DES key: RFB mirrors each key byte.
PASSWORD_FOR_DES_KEY = bytes(mirrored(b) for b in DES_KEY).decode("latin-1")


def test_known_des_vector_through_the_rfb_key_mirroring():
    assert des_key(PASSWORD_FOR_DES_KEY) == DES_KEY
    challenge = DES_PLAIN + DES_PLAIN           # two independent ECB blocks
    assert vnc_response(PASSWORD_FOR_DES_KEY, challenge) == DES_CIPHER + DES_CIPHER
    assert check_response(PASSWORD_FOR_DES_KEY, challenge, DES_CIPHER * 2)


@given(password=st.text(max_size=12), challenge=st.binary(min_size=16, max_size=16))
def test_response_is_des_ecb_per_block_with_the_mirrored_key(password, challenge):
    raw = password.encode("latin-1", "replace")[:8].ljust(8, b"\0")
    key = bytes(mirrored(b) for b in raw)
    blocks = [DES.new(key, DES.MODE_ECB).encrypt(challenge[i:i + 8]) for i in (0, 8)]
    assert vnc_response(password, challenge) == b"".join(blocks)
    assert check_response(password, challenge, b"".join(blocks))


def test_only_the_first_eight_password_bytes_count_and_short_ones_are_nul_padded():
    challenge = bytes(range(16))
    assert vnc_response("12345678", challenge) == vnc_response("12345678-and-more", challenge)
    assert vnc_response("", challenge) == DES.new(bytes(8), DES.MODE_ECB).encrypt(challenge)
    assert vnc_response("ab", challenge) == vnc_response("ab\0\0", challenge)
    # A character outside Latin-1 is a '?', as the password can't be typed otherwise.
    assert vnc_response("p\u20acss", challenge) == vnc_response("p?ss", challenge)


def test_check_response_refuses_wrong_answers_and_lengths():
    challenge = new_challenge()
    assert len(challenge) == CHALLENGE_SIZE and new_challenge() != challenge
    good = vnc_response("secret", challenge)
    assert check_response("secret", challenge, good)
    assert not check_response("secreT", challenge, good)
    assert not check_response("secret", challenge, good[:15])
    assert not check_response("secret", challenge, good + b"\0")
    flipped = bytes([good[0] ^ 1]) + good[1:]
    assert not check_response("secret", challenge, flipped)


def test_blacklist_is_bounded_and_forgets_the_oldest_address():
    now = [0.0]
    bl = Blacklist(threshold=1, timeout=5, max_entries=3, clock=lambda: now[0])
    for address in ("a", "b", "c"):
        bl.failure(address)
    assert all(bl.blocked_for(a) == 5 for a in ("a", "b", "c"))
    bl.failure("d")                             # a fourth address pushes out the first
    assert bl.blocked_for("a") == 0 and bl.blocked_for("d") == 5


@pytest.mark.parametrize("threshold", [1, 3])
def test_blacklist_blocks_at_the_threshold_and_success_forgets(threshold):
    now = [100.0]
    bl = Blacklist(threshold=threshold, timeout=2, clock=lambda: now[0])
    for _ in range(threshold - 1):
        bl.failure("x")
    assert bl.blocked_for("x") == 0
    bl.failure("x")
    assert bl.blocked_for("x") == 2
    now[0] += 1.5
    assert bl.blocked_for("x") == pytest.approx(0.5)
    bl.success("x")
    assert bl.blocked_for("x") == 0


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_blacklist_block_is_capped_after_many_bursts():
    """Bursts of wrong passwords, each as soon as the block ends: the block
    doubles 10, 20, 40 and then stays at 60 s (it used to reach 30 days)."""
    clock = FakeClock()
    bl = Blacklist(clock=clock)
    blocks = []
    for _ in range(50):
        while bl.blocked_for("x") == 0:
            bl.failure("x")
        blocks.append(bl.blocked_for("x"))
        clock.now += blocks[-1]
    assert blocks[:4] == [10, 20, 40, 60] and set(blocks[3:]) == {60}


def test_blacklist_forgets_an_address_after_a_quiet_period():
    clock = FakeClock()
    bl = Blacklist(clock=clock)
    for _ in range(4):
        bl.failure("x")
        clock.now += 100                   # spaced out, but never quiet for 10 minutes
    assert bl.failure("x") == 10           # the fifth blocks
    for _ in range(3):
        clock.now += 61
        bl.failure("x")
    assert bl.blocked_for("x") == 60
    clock.now += 599
    assert bl.blocked_for("x") == 0 and len(bl) == 1
    clock.now += 1                         # 10 minutes without a failure: forgotten
    assert bl.blocked_for("x") == 0 and len(bl) == 0
    for _ in range(4):
        assert bl.failure("x") == 0        # a fresh count: four may fail again
    assert bl.failure("x") == 10           # and the block starts at 10 s again


def test_blacklist_memory_stays_bounded_and_keeps_the_recent_attacker():
    clock = FakeClock()
    bl = Blacklist(max_entries=100, clock=clock)
    for _ in range(5):
        bl.failure("attacker")
    for i in range(10_000):                # a spray from many addresses
        bl.failure(f"10.0.{i // 256}.{i % 256}")
        if i % 50 == 0:
            bl.failure("attacker")         # still failing: stays among the recent
        assert len(bl) <= 100
    assert bl.blocked_for("attacker") > 0


def test_blacklist_failures_of_one_address_never_block_another():
    clock = FakeClock()
    bl = Blacklist(clock=clock)
    for _ in range(100):
        bl.failure("127.0.0.2")
    assert bl.blocked_for("127.0.0.2") == 60 and bl.blocked_for("127.0.0.1") == 0
