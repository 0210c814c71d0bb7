"""Our vfb/vkbd layouts against the real Xen headers (Debian libxen-dev).

A small C program prints sizes and offsets from xen/io/fbif.h and kbdif.h;
every number pyxenfb.devices.xenfb_abi uses must match, for x86_64 and (where gcc
can build -m32) i386.
"""
import shutil
import subprocess

import pytest

from pyxenfb.devices import xenfb_abi as abi

HEADERS = "/usr/include/xen/io/fbif.h"

PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <xen/io/fbif.h>
#include <xen/io/kbdif.h>
#define P(name, v) printf("%s %ld\n", name, (long)(v))
int main(void) {
    P("fb.in_cons", offsetof(struct xenfb_page, in_cons));
    P("fb.in_prod", offsetof(struct xenfb_page, in_prod));
    P("fb.out_cons", offsetof(struct xenfb_page, out_cons));
    P("fb.out_prod", offsetof(struct xenfb_page, out_prod));
    P("fb.width", offsetof(struct xenfb_page, width));
    P("fb.height", offsetof(struct xenfb_page, height));
    P("fb.line_length", offsetof(struct xenfb_page, line_length));
    P("fb.mem_length", offsetof(struct xenfb_page, mem_length));
    P("fb.depth", offsetof(struct xenfb_page, depth));
    P("fb.pd", offsetof(struct xenfb_page, pd));
    P("fb.pd_entry", sizeof(((struct xenfb_page *)0)->pd[0]));
    P("fb.pd_count", sizeof(((struct xenfb_page *)0)->pd) / sizeof(((struct xenfb_page *)0)->pd[0]));
    P("fb.in_ring_offs", XENFB_IN_RING_OFFS);
    P("fb.in_ring_len", XENFB_IN_RING_LEN);
    P("fb.out_ring_offs", XENFB_OUT_RING_OFFS);
    P("fb.out_ring_len", XENFB_OUT_RING_LEN);
    P("fb.event_size", sizeof(union xenfb_out_event));
    P("fb.in_event_size", sizeof(union xenfb_in_event));
    P("fb.update.x", offsetof(struct xenfb_update, x));
    P("fb.update.y", offsetof(struct xenfb_update, y));
    P("fb.update.width", offsetof(struct xenfb_update, width));
    P("fb.update.height", offsetof(struct xenfb_update, height));
    P("fb.resize.width", offsetof(struct xenfb_resize, width));
    P("fb.resize.height", offsetof(struct xenfb_resize, height));
    P("fb.resize.stride", offsetof(struct xenfb_resize, stride));
    P("fb.resize.depth", offsetof(struct xenfb_resize, depth));
    P("fb.resize.offset", offsetof(struct xenfb_resize, offset));
    P("fb.refresh.period", offsetof(struct xenfb_refresh_period, period));
    P("fb.TYPE_UPDATE", XENFB_TYPE_UPDATE);
    P("fb.TYPE_RESIZE", XENFB_TYPE_RESIZE);
    P("fb.TYPE_REFRESH_PERIOD", XENFB_TYPE_REFRESH_PERIOD);
    P("kbd.in_cons", offsetof(struct xenkbd_page, in_cons));
    P("kbd.in_prod", offsetof(struct xenkbd_page, in_prod));
    P("kbd.out_cons", offsetof(struct xenkbd_page, out_cons));
    P("kbd.out_prod", offsetof(struct xenkbd_page, out_prod));
    P("kbd.in_ring_offs", XENKBD_IN_RING_OFFS);
    P("kbd.in_ring_len", XENKBD_IN_RING_LEN);
    P("kbd.out_ring_offs", XENKBD_OUT_RING_OFFS);
    P("kbd.out_ring_len", XENKBD_OUT_RING_LEN);
    P("kbd.event_size", sizeof(union xenkbd_in_event));
    P("kbd.key.pressed", offsetof(struct xenkbd_key, pressed));
    P("kbd.key.keycode", offsetof(struct xenkbd_key, keycode));
    P("kbd.motion.rel_x", offsetof(struct xenkbd_motion, rel_x));
    P("kbd.motion.rel_y", offsetof(struct xenkbd_motion, rel_y));
    P("kbd.motion.rel_z", offsetof(struct xenkbd_motion, rel_z));
    P("kbd.pos.abs_x", offsetof(struct xenkbd_position, abs_x));
    P("kbd.pos.abs_y", offsetof(struct xenkbd_position, abs_y));
    P("kbd.pos.rel_z", offsetof(struct xenkbd_position, rel_z));
    P("kbd.TYPE_MOTION", XENKBD_TYPE_MOTION);
    P("kbd.TYPE_KEY", XENKBD_TYPE_KEY);
    P("kbd.TYPE_POS", XENKBD_TYPE_POS);
    return 0;
}
"""


def _field_offset(st, index):
    """Byte offset of field `index` of a struct.Struct format like '<B3xiiii'."""
    import struct
    import re
    fmt = st.format
    offs, pos = [], 0
    for count, code in re.findall(r"(\d*)([a-zA-Z])", fmt[1:]):
        count = int(count) if count else 1
        size = struct.calcsize("<" + code)
        if code == "x":
            pos += count
            continue
        for _ in range(count):
            offs.append(pos)
            pos += size
    return offs[index]


def _ours(entry_size):
    a = abi.ABI_X86_32 if entry_size == 4 else abi.ABI_X86_64
    return {
        "fb.in_cons": abi.FB_IN_CONS, "fb.in_prod": abi.FB_IN_PROD,
        "fb.out_cons": abi.FB_OUT_CONS, "fb.out_prod": abi.FB_OUT_PROD,
        "fb.width": abi.FB_WIDTH, "fb.height": abi.FB_HEIGHT,
        "fb.line_length": abi.FB_LINE_LENGTH, "fb.mem_length": abi.FB_MEM_LENGTH,
        "fb.depth": abi.FB_DEPTH, "fb.pd": a.pd_offset, "fb.pd_entry": a.entry_size,
        "fb.pd_count": abi.FB_PD_COUNT,
        "fb.in_ring_offs": abi.FB_IN_RING_OFFS, "fb.in_ring_len": abi.FB_IN_RING_LEN,
        "fb.out_ring_offs": abi.FB_OUT_RING_OFFS, "fb.out_ring_len": abi.FB_OUT_RING_LEN,
        "fb.event_size": abi.EVENT_SIZE, "fb.in_event_size": abi.EVENT_SIZE,
        "fb.update.x": _field_offset(abi.FB_UPDATE, 1), "fb.update.y": _field_offset(abi.FB_UPDATE, 2),
        "fb.update.width": _field_offset(abi.FB_UPDATE, 3), "fb.update.height": _field_offset(abi.FB_UPDATE, 4),
        "fb.resize.width": _field_offset(abi.FB_RESIZE, 1), "fb.resize.height": _field_offset(abi.FB_RESIZE, 2),
        "fb.resize.stride": _field_offset(abi.FB_RESIZE, 3), "fb.resize.depth": _field_offset(abi.FB_RESIZE, 4),
        "fb.resize.offset": _field_offset(abi.FB_RESIZE, 5),
        "fb.refresh.period": _field_offset(abi.FB_REFRESH, 1),
        "fb.TYPE_UPDATE": abi.XENFB_TYPE_UPDATE, "fb.TYPE_RESIZE": abi.XENFB_TYPE_RESIZE,
        "fb.TYPE_REFRESH_PERIOD": abi.XENFB_TYPE_REFRESH_PERIOD,
        "kbd.in_cons": abi.KBD_IN_CONS, "kbd.in_prod": abi.KBD_IN_PROD,
        "kbd.out_cons": abi.KBD_OUT_CONS, "kbd.out_prod": abi.KBD_OUT_PROD,
        "kbd.in_ring_offs": abi.KBD_IN_RING_OFFS, "kbd.in_ring_len": abi.KBD_IN_RING_LEN,
        "kbd.out_ring_offs": abi.KBD_OUT_RING_OFFS, "kbd.out_ring_len": abi.KBD_OUT_RING_LEN,
        "kbd.event_size": abi.EVENT_SIZE,
        "kbd.key.pressed": _field_offset(abi.KBD_KEY, 1), "kbd.key.keycode": _field_offset(abi.KBD_KEY, 2),
        "kbd.motion.rel_x": _field_offset(abi.KBD_MOTION, 1), "kbd.motion.rel_y": _field_offset(abi.KBD_MOTION, 2),
        "kbd.motion.rel_z": _field_offset(abi.KBD_MOTION, 3),
        "kbd.pos.abs_x": _field_offset(abi.KBD_POS, 1), "kbd.pos.abs_y": _field_offset(abi.KBD_POS, 2),
        "kbd.pos.rel_z": _field_offset(abi.KBD_POS, 3),
        "kbd.TYPE_MOTION": abi.XENKBD_TYPE_MOTION, "kbd.TYPE_KEY": abi.XENKBD_TYPE_KEY,
        "kbd.TYPE_POS": abi.XENKBD_TYPE_POS,
    }


def _compile_and_run(tmp_path, flags):
    src = tmp_path / "layout.c"
    src.write_text(PROGRAM)
    exe = tmp_path / ("layout" + "".join(flags))
    r = subprocess.run(["gcc", *flags, "-o", str(exe), str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        return None, r.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}, ""


@pytest.mark.skipif(not shutil.which("gcc") or not __import__("os").path.exists(HEADERS),
                    reason="needs gcc and Debian libxen-dev headers")
@pytest.mark.parametrize("flags,entry_size", [([], 8), (["-m32"], 4)])
def test_layout_matches_xen_headers(tmp_path, flags, entry_size):
    theirs, err = _compile_and_run(tmp_path, flags)
    if theirs is None:
        if flags:
            pytest.skip(f"gcc cannot build {flags}: {err.strip().splitlines()[-1] if err else ''}")
        pytest.fail(err)
    ours = _ours(entry_size)
    mismatches = {k: (ours[k], theirs[k]) for k in theirs if ours[k] != theirs[k]}
    assert not mismatches, mismatches
    assert set(ours) == set(theirs)


def test_usable_pd_entries_stop_before_the_rings():
    # pd[] overlaps the in ring at 1024: entries at or past it are not usable.
    assert abi.ABI_X86_64.usable_pd_entries == 123
    assert abi.ABI_X86_32.usable_pd_entries == 247
    for a in (abi.ABI_X86_64, abi.ABI_X86_32):
        assert a.pd_offset + a.usable_pd_entries * a.entry_size <= abi.FB_IN_RING_OFFS


# ---- libpixman-1 (Debian libpixman-1-dev) -----------------------------------------

PIXMAN_HEADER = "/usr/include/pixman-1/pixman.h"
needs_pixman_h = pytest.mark.skipif(not shutil.which("gcc") or not __import__("os").path.exists(PIXMAN_HEADER),
                                    reason="needs gcc and Debian libpixman-1-dev")


def _gcc(tmp_path, source: str, *flags: str) -> subprocess.CompletedProcess:
    src = tmp_path / "pixman_check.c"
    src.write_text(source)
    return subprocess.run(["gcc", "-std=c11", "-I/usr/include/pixman-1", *flags, "-o",
                           str(tmp_path / "pixman_check"), str(src)], capture_output=True, text=True, timeout=60)


@needs_pixman_h
def test_pixman_declarations_agree_with_the_header(tmp_path):
    """gcc rejects a prototype of ours that conflicts with pixman.h; the enums
    we declare as unsigned int have that ABI."""
    from pyxenfb.displays import pixman_cdefs
    source = ("#include <pixman.h>\n" + pixman_cdefs.FUNCTIONS +
              "_Static_assert(sizeof(pixman_op_t) == sizeof(unsigned int), \"op\");\n"
              "_Static_assert(sizeof(pixman_format_code_t) == sizeof(unsigned int), \"format\");\n"
              "_Static_assert((pixman_op_t)-1 > 0 && (pixman_format_code_t)-1 > 0, \"unsigned\");\n"
              "_Static_assert(sizeof(pixman_bool_t) == sizeof(int), \"bool\");\n")
    r = _gcc(tmp_path, source, "-Werror", "-fsyntax-only")
    assert r.returncode == 0, r.stderr
    bad = "#include <pixman.h>\npixman_bool_t pixman_image_unref(pixman_image_t *image, int extra);\n"
    assert _gcc(tmp_path, bad, "-fsyntax-only").returncode != 0      # the check can fail


@needs_pixman_h
def test_pixman_format_codes_match_the_header(tmp_path):
    from pyxenfb.displays import pixman
    body = "".join(f'    printf("{name} %u\\n", (unsigned)PIXMAN_{name});\n' for name in pixman.FORMATS)
    body += '    printf("OP_SRC %u\\n", (unsigned)PIXMAN_OP_SRC);\n'
    r = _gcc(tmp_path, "#include <stdio.h>\n#include <pixman.h>\nint main(void) {\n" + body + "    return 0;\n}\n")
    assert r.returncode == 0, r.stderr
    out = subprocess.run([str(tmp_path / "pixman_check")], capture_output=True, text=True, check=True).stdout
    theirs = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    ours = {name: pixman.code(*args) for name, args in pixman.FORMATS.items()}
    ours["OP_SRC"] = pixman.OP_SRC
    assert ours == theirs


@pytest.mark.skipif(not shutil.which("gcc") or not __import__("os").path.exists("/usr/include/xenevtchn.h"),
                    reason="needs gcc and Debian libxen-dev headers")
def test_restrict_prototypes_match_xen_headers(tmp_path):
    """dm_restrict's two calls: domid_t is uint16_t; gcc rejects a conflicting
    redeclaration, so a wrong width in xen_cdefs fails here."""
    import re

    from pyxenfb.platform import xen_cdefs
    decls = [line for line in (xen_cdefs.EVTCHN + xen_cdefs.FOREIGNMEMORY).splitlines()
             if re.search(r"\b(xenevtchn|xenforeignmemory)_restrict\(", line)]
    assert len(decls) == 2, decls
    src = tmp_path / "restrict.c"
    src.write_text("#include <xenevtchn.h>\n#include <xenforeignmemory.h>\n"
                   "_Static_assert(sizeof(domid_t) == 2, \"domid_t\");\n" + "\n".join(decls) + "\n")
    r = subprocess.run(["gcc", "-std=c11", "-Werror", "-fsyntax-only", str(src)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    wrong = [d.replace("uint16_t domid", "uint32_t domid") for d in decls]
    src.write_text("#include <xenevtchn.h>\n#include <xenforeignmemory.h>\n" + "\n".join(wrong) + "\n")
    r = subprocess.run(["gcc", "-std=c11", "-fsyntax-only", str(src)], capture_output=True, timeout=60)
    assert r.returncode != 0              # the check can fail
