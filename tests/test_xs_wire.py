"""Unit tests of the sans-IO XenStore codec (pyxenfb.platform.xs_wire)."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxenfb.platform import xs_wire
from pyxenfb.platform.xs_wire import (
    HEADER, PAYLOAD_MAX, InvalidPathError, Message, MessageDecoder, ProtocolError,
    XsType, is_at_or_below, join_strings, parse_perm, split_strings, validate_path,
)

HEADER_FILE = "/usr/include/xen/io/xs_wire.h"


@pytest.mark.skipif(not (os.path.exists(HEADER_FILE) and shutil.which("gcc")),
                    reason="needs libxen-dev and gcc")
def test_numbers_match_the_c_header(tmp_path):
    names = [t.name for t in XsType]
    source = tmp_path / "probe.c"
    source.write_text(
        "#include <stdio.h>\n#include <stdint.h>\n#include <errno.h>\n#include <xen/io/xs_wire.h>\n"
        "int main(void){\n"
        + "".join(f'printf("{n} %d\\n", XS_{n});\n' for n in names)
        + 'printf("COUNT %d\\n", XS_TYPE_COUNT);\n'
        'printf("PAYLOAD %d %d %d\\n", XENSTORE_PAYLOAD_MAX, XENSTORE_ABS_PATH_MAX, XENSTORE_REL_PATH_MAX);\n'
        'for (unsigned i = 0; i < sizeof(xsd_errors)/sizeof(xsd_errors[0]); i++)\n'
        '  printf("ERR %s %d\\n", xsd_errors[i].errstring, xsd_errors[i].errnum);\n'
        "return 0;}\n")
    exe = tmp_path / "probe"
    subprocess.run(["gcc", "-o", str(exe), str(source)], check=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    values = {}
    errors = []
    for line in lines:
        key, *rest = line.split()
        if key == "ERR":
            errors.append((rest[0], int(rest[1])))
        else:
            values[key] = [int(v) for v in rest]
    for t in XsType:
        assert values[t.name] == [int(t)], t.name
    assert values["COUNT"] == [xs_wire.XS_TYPE_COUNT]
    assert values["PAYLOAD"] == [xs_wire.PAYLOAD_MAX, xs_wire.ABS_PATH_MAX, xs_wire.REL_PATH_MAX]
    assert errors == [(name, xs_wire.ERRNO_BY_NAME[name]) for name in xs_wire.ERROR_NAMES]


def test_new_opcodes_and_error_mapping():
    assert XsType.RESET_WATCHES == 21 and XsType.DIRECTORY_PART == 22
    assert xs_wire.errno_from_name(b"EAGAIN") == errno.EAGAIN
    assert xs_wire.errno_from_name("EWHATEVER") == errno.EIO
    assert xs_wire.error_name(errno.EACCES) == "EACCES"
    assert xs_wire.error_name(errno.ETIMEDOUT) == "EINVAL"


def test_encode_layout_is_little_endian_header_plus_payload():
    data = Message(XsType.WRITE, 7, 3, b"/a\0v").encode()
    assert data[:16] == bytes([11, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0])
    assert data[16:] == b"/a\0v"


def test_encode_refuses_oversize_payload():
    with pytest.raises(ProtocolError):
        Message(XsType.WRITE, 0, 0, b"x" * (PAYLOAD_MAX + 1)).encode()


def test_decoder_byte_by_byte_and_batched():
    msgs = [Message(XsType.READ, 1, 0, b"/x\0"), Message(XsType.WATCH_EVENT, 0, 0, b""),
            Message(XsType.WRITE, 2, 5, b"/y\0" + bytes(range(256)))]
    stream = b"".join(m.encode() for m in msgs)
    decoder = MessageDecoder()
    got = []
    for byte in stream:
        got += decoder.feed(bytes([byte]))
    assert got == msgs
    assert decoder.buffered == 0
    assert MessageDecoder().feed(stream) == msgs


def test_decoder_accepts_max_payload_and_refuses_more():
    decoder = MessageDecoder()
    [msg] = decoder.feed(Message(XsType.WRITE, 0, 0, b"a" * PAYLOAD_MAX).encode())
    assert len(msg.payload) == PAYLOAD_MAX
    with pytest.raises(ProtocolError, match="4097"):
        decoder.feed(HEADER.pack(XsType.WRITE, 0, 0, PAYLOAD_MAX + 1))
    with pytest.raises(ProtocolError):      # stays broken: framing is lost
        decoder.feed(Message(XsType.READ, 0, 0, b"/\0").encode())


def test_decoder_keeps_partial_header_until_complete():
    decoder = MessageDecoder()
    data = Message(XsType.READ, 9, 0, b"/p\0").encode()
    assert decoder.feed(data[:10]) == []
    assert decoder.buffered == 10
    assert decoder.feed(data[10:]) == [Message(XsType.READ, 9, 0, b"/p\0")]


@pytest.mark.parametrize("path", ["/", "/local/domain/1", "device/vfb/0", "a-b_c@d", "/" + "a" * 3071,
                                  "r" * 2048, "@releaseDomain"])
def test_valid_paths(path):
    assert validate_path(path, allow_special=True) == path


@pytest.mark.parametrize("path", ["", "//", "/a//b", "/a/", "a/", "/a.b", "/a:b", "/a b", "/ä",
                                  "/" + "a" * 3072, "r" * 2049, "@other", "/a\0b", "@releaseDomain/x"])
def test_invalid_paths(path):
    with pytest.raises(InvalidPathError):
        validate_path(path, allow_special=True)


def test_special_paths_need_allow_special():
    with pytest.raises(InvalidPathError):
        validate_path("@introduceDomain")
    with pytest.raises(InvalidPathError):
        validate_path(b"/\xff")


def test_is_at_or_below():
    assert is_at_or_below("/a/b", "/a")
    assert is_at_or_below("/a", "/a")
    assert is_at_or_below("/a", "/")
    assert not is_at_or_below("/ab", "/a")
    assert not is_at_or_below("/a", "/a/b")
    assert is_at_or_below("device/vfb/0/state", "device/vfb")


def test_strings_and_perms():
    assert join_strings("a", b"b", "") == b"a\0b\0\0"
    assert split_strings(b"a\0b\0") == [b"a", b"b"]
    assert split_strings(b"a\0tail") == [b"a", b"tail"]
    assert split_strings(b"") == []
    assert parse_perm(b"r5") == ("r", 5)
    assert parse_perm("b0") == ("b", 0)
    for bad in ["x1", "r", "r-1", "rr1", "r99999999999", "r1 "]:
        with pytest.raises(ValueError):
            parse_perm(bad)


@settings(deadline=None, max_examples=300)
@given(st.lists(st.binary(max_size=64), max_size=40))
def test_fuzz_decoder_never_fails_unexpectedly(chunks):
    decoder = MessageDecoder()
    try:
        for chunk in chunks:
            for msg in decoder.feed(chunk):
                assert len(msg.payload) <= PAYLOAD_MAX
            assert decoder.buffered < 16 + PAYLOAD_MAX
    except ProtocolError:
        pass


message_strategy = st.builds(
    Message, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
    st.binary(max_size=300))


@settings(deadline=None, max_examples=200)
@given(st.lists(message_strategy, max_size=8), st.lists(st.integers(1, 200), min_size=1, max_size=20))
def test_fuzz_roundtrip_with_arbitrary_splits(messages, cuts):
    stream = b"".join(m.encode() for m in messages)
    decoder = MessageDecoder()
    got: list[Message] = []
    pos = 0
    i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        got += decoder.feed(stream[pos:pos + step])
        pos += step
        i += 1
    assert got == messages
