"""Keyboard tables: keysym/QEMU key number/USB HID -> Linux input code.

Expected codes come from evdev.ecodes (built from the kernel headers, not
from our tables) so a wrong generated table cannot agree with itself."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import evdev.ecodes as ec
import pytest
from hypothesis import given, settings, strategies as st

from pyxenfb.console.keymap import (
    MOD_ALTGR, MOD_SHIFT, Keymap, KeysymDecoder, UnknownKeymap, available_layouts,
    linux_key_name, qnum_to_linux, usb_hid_to_linux,
)
from pyxenfb.console.keymaps import codes
from pyxenfb.console.keymaps.index import LAYOUT_MODULES, SOURCES_SHA256

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "scripts" / "gen_keymaps.py"

# X11 keysym values by name, from the X11 headers when installed (an
# independent source); the few names used in tests otherwise.
XK = {
    "Return": 0xFF0D, "BackSpace": 0xFF08, "Tab": 0xFF09, "Escape": 0xFF1B,
    "Home": 0xFF50, "Left": 0xFF51, "Up": 0xFF52, "Right": 0xFF53, "Down": 0xFF54,
    "Page_Up": 0xFF55, "Page_Down": 0xFF56, "End": 0xFF57, "Insert": 0xFF63,
    "Delete": 0xFFFF, "KP_Enter": 0xFF8D, "Shift_L": 0xFFE1, "Shift_R": 0xFFE2,
    "Control_L": 0xFFE3, "Control_R": 0xFFE4, "Alt_L": 0xFFE9,
    "ISO_Level3_Shift": 0xFE03, "ISO_Left_Tab": 0xFE20, "ssharp": 0x00DF,
    "adiaeresis": 0x00E4, "Adiaeresis": 0x00C4, "EuroSign": 0x20AC,
    "asciicircum": 0x005E, "less": 0x003C, "Pause": 0xFF13,
    **{f"F{i}": 0xFFBD + i for i in range(1, 13)},
    **{f"KP_{i}": 0xFFB0 + i for i in range(10)},
    "KP_Add": 0xFFAB, "KP_Subtract": 0xFFAD, "KP_Multiply": 0xFFAA,
    "KP_Divide": 0xFFAF, "KP_Decimal": 0xFFAE,
}
_KEYSYMDEF = Path("/usr/include/X11/keysymdef.h")
if _KEYSYMDEF.exists():  # confirm the literals above against the header
    _defined = dict(re.findall(r"#define XK_(\w+)\s+(0x[0-9a-fA-F]+)", _KEYSYMDEF.read_text()))
    assert all(int(_defined[n], 16) == v for n, v in XK.items()), "XK literal typo"


def typed(layout: str, text: str) -> list[int | None]:
    km = Keymap.load(layout)
    return [km.keysym_to_linux(ord(ch) if ord(ch) < 0x100 else 0x01000000 | ord(ch))
            for ch in text]


# ---------------------------------------------------------------- layouts


def test_layouts_are_qemus():
    layouts = available_layouts()
    assert layouts == sorted(layouts)
    for name in ("en-us", "en-gb", "de", "de-ch", "fr", "fr-be", "fr-ca", "fr-ch",
                 "it", "es", "pt", "pt-br", "sv", "no", "da", "fi", "nl", "ja",
                 "is", "lt", "lv", "mk", "pl", "ru", "sl", "th", "tr", "hr",
                 "hu", "et", "ar", "bepo", "cz"):
        assert name in layouts
    assert Keymap.load().name == "en-us"


def test_en_us_letters_digits_and_shifted_symbols():
    assert typed("en-us", "aA") == [ec.KEY_A, ec.KEY_A]
    assert typed("en-us", "zZ") == [ec.KEY_Z, ec.KEY_Z]
    letters = "abcdefghijklmnopqrstuvwxyz"
    assert typed("en-us", letters) == [getattr(ec, f"KEY_{c.upper()}") for c in letters]
    assert typed("en-us", letters.upper()) == typed("en-us", letters)
    assert typed("en-us", "0123456789") == [getattr(ec, f"KEY_{d}") for d in "0123456789"]
    assert typed("en-us", "!@#$%^&*()") == [getattr(ec, f"KEY_{d}") for d in "1234567890"]
    assert typed("en-us", "-_=+[{]};:'\",<.>/?`~\\| ") == [
        ec.KEY_MINUS, ec.KEY_MINUS, ec.KEY_EQUAL, ec.KEY_EQUAL,
        ec.KEY_LEFTBRACE, ec.KEY_LEFTBRACE, ec.KEY_RIGHTBRACE, ec.KEY_RIGHTBRACE,
        ec.KEY_SEMICOLON, ec.KEY_SEMICOLON, ec.KEY_APOSTROPHE, ec.KEY_APOSTROPHE,
        ec.KEY_COMMA, ec.KEY_COMMA, ec.KEY_DOT, ec.KEY_DOT, ec.KEY_SLASH, ec.KEY_SLASH,
        ec.KEY_GRAVE, ec.KEY_GRAVE, ec.KEY_BACKSLASH, ec.KEY_BACKSLASH, ec.KEY_SPACE,
    ]


def test_de_layout_differences():
    de = Keymap.load("de")
    assert typed("de", "zyZY") == [ec.KEY_Y, ec.KEY_Z, ec.KEY_Y, ec.KEY_Z]
    assert de.keysym_to_linux(XK["ssharp"]) == ec.KEY_MINUS
    assert de.keysym_to_linux(ord("@")) == ec.KEY_Q  # AltGr+Q; client sends AltGr
    assert de.keysym_to_linux(XK["adiaeresis"]) == ec.KEY_APOSTROPHE
    assert de.keysym_to_linux(XK["Adiaeresis"]) == ec.KEY_APOSTROPHE
    assert de.keysym_to_linux(XK["EuroSign"]) == ec.KEY_E
    assert de.keysym_to_linux(XK["less"]) == ec.KEY_102ND
    assert de.keysym_to_linux(XK["ISO_Level3_Shift"]) == ec.KEY_RIGHTALT
    # en-us differs: same keysyms, other keys
    assert typed("en-us", "zy@") == [ec.KEY_Z, ec.KEY_Y, ec.KEY_2]


def test_fr_azerty():
    assert typed("fr", "aAqQzwm") == [ec.KEY_Q, ec.KEY_Q, ec.KEY_A, ec.KEY_A,
                                      ec.KEY_W, ec.KEY_Z, ec.KEY_SEMICOLON]


def test_unicode_and_legacy_keysyms_are_the_same_character():
    de = Keymap.load("de")
    assert de.keysym_to_linux(0x01000000 | 0xE4) == ec.KEY_APOSTROPHE  # U+00E4 ä
    assert de.keysym_to_linux(0x01000000 | 0x20AC) == ec.KEY_E         # U+20AC €
    assert Keymap.load("en-us").keysym_to_linux(0x01000000 | ord("q")) == ec.KEY_Q


LAYOUT_INDEPENDENT = {
    "Return": ec.KEY_ENTER, "BackSpace": ec.KEY_BACKSPACE, "Tab": ec.KEY_TAB,
    "ISO_Left_Tab": ec.KEY_TAB, "Escape": ec.KEY_ESC,
    **{f"F{i}": getattr(ec, f"KEY_F{i}") for i in range(1, 13)},
    "Up": ec.KEY_UP, "Down": ec.KEY_DOWN, "Left": ec.KEY_LEFT, "Right": ec.KEY_RIGHT,
    "Home": ec.KEY_HOME, "End": ec.KEY_END, "Page_Up": ec.KEY_PAGEUP,
    "Page_Down": ec.KEY_PAGEDOWN, "Insert": ec.KEY_INSERT, "Delete": ec.KEY_DELETE,
    "KP_Enter": ec.KEY_KPENTER, "Shift_L": ec.KEY_LEFTSHIFT, "Shift_R": ec.KEY_RIGHTSHIFT,
    "Control_L": ec.KEY_LEFTCTRL, "Control_R": ec.KEY_RIGHTCTRL, "Alt_L": ec.KEY_LEFTALT,
    **{f"KP_{i}": getattr(ec, f"KEY_KP{i}") for i in range(10)},
    "KP_Add": ec.KEY_KPPLUS, "KP_Subtract": ec.KEY_KPMINUS,
    "KP_Multiply": ec.KEY_KPASTERISK, "KP_Divide": ec.KEY_KPSLASH,
    "Pause": ec.KEY_PAUSE,
}


@pytest.mark.parametrize("layout", sorted(LAYOUT_MODULES))
def test_function_cursor_keypad_keys_on_every_layout(layout):
    km = Keymap.load(layout)
    got = {name: km.keysym_to_linux(XK[name]) for name in LAYOUT_INDEPENDENT}
    assert got == LAYOUT_INDEPENDENT
    assert km.keysym_to_linux(ord(" ")) == ec.KEY_SPACE
    # some layouts (da, de, ...) list the keypad comma key first, as QEMU does
    assert km.keysym_to_linux(XK["KP_Decimal"]) in (ec.KEY_KPDOT, ec.KEY_KPCOMMA)


def test_alternatives_follow_held_modifiers_like_qemu():
    us = Keymap.load("en-us")
    # '<' is Shift+comma and the plain 102nd key on pc105 en-us
    assert us.keysym_to_linux_candidates(XK["less"]) == [ec.KEY_COMMA, ec.KEY_102ND]
    assert us.keysym_to_linux(XK["less"], modifiers=MOD_SHIFT) == ec.KEY_COMMA
    assert us.keysym_to_linux(XK["less"], modifiers=0) == ec.KEY_102ND
    de = Keymap.load("de")
    # de '^': AltGr+ä is listed first, but the plain ^ key is what was typed
    assert de.keysym_to_linux_candidates(XK["asciicircum"])[0] == ec.KEY_APOSTROPHE
    assert de.keysym_to_linux(XK["asciicircum"]) == ec.KEY_GRAVE
    assert de.keysym_to_linux(XK["asciicircum"], modifiers=0) == ec.KEY_GRAVE
    assert de.keysym_to_linux(XK["asciicircum"], modifiers=MOD_ALTGR) == ec.KEY_APOSTROPHE


def test_decoder_tracks_modifiers_and_releases_the_pressed_key():
    dec = KeysymDecoder(Keymap.load("en-us"))
    assert dec.press(XK["Shift_L"]) == ec.KEY_LEFTSHIFT
    assert dec.modifiers() == MOD_SHIFT
    assert dec.press(XK["less"]) == ec.KEY_COMMA
    assert dec.release(XK["Shift_L"]) == ec.KEY_LEFTSHIFT
    # released after Shift went up: still the key that went down
    assert dec.release(XK["less"]) == ec.KEY_COMMA
    assert dec.press(XK["less"]) == ec.KEY_102ND
    assert dec.press(XK["less"]) == ec.KEY_102ND  # auto-repeat
    assert dec.release_all() == [ec.KEY_102ND]
    # press 'a', release under another spelling ('A'): the held key goes up
    assert dec.press(ord("a")) == ec.KEY_A
    assert dec.release(ord("A")) == ec.KEY_A
    assert dec.release_all() == []
    assert dec.press(0x12345) is None  # unmapped keysym


def test_decoder_bounds_held_keys():
    dec = KeysymDecoder(Keymap.load("en-us"))
    keysyms = [ord(c) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    keysyms += [0x01000000 | ord(c) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    keysyms += [0xFFBE + i for i in range(12)] + [0xFFB0 + i for i in range(10)]
    keysyms += [ord(c) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ!@#$%^&*()"]
    keysyms += [0x01000000 | ord(c) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    pressed = [dec.press(k) for k in keysyms]
    assert len(keysyms) > KeysymDecoder.MAX_HELD
    assert all(p is not None for p in pressed[:KeysymDecoder.MAX_HELD])
    assert all(p is None for p in pressed[KeysymDecoder.MAX_HELD:])


def test_unknown_keysyms_and_hostile_values():
    us = Keymap.load()
    for bad in (0, -1, 0x20000000, 2**64, 0x0000FFFFFF, "a", None, 1.5):
        assert us.keysym_to_linux(bad) is None
    assert Keymap.load("ru").keysym_to_linux(0x06C1) is not None  # Cyrillic_a
    assert us.keysym_to_linux(0x06C1) is None


@settings(deadline=None, max_examples=300)
@given(st.integers(min_value=-2**40, max_value=2**40), st.sampled_from(sorted(LAYOUT_MODULES)))
def test_any_keysym_gives_none_or_a_named_key(keysym, layout):
    code = Keymap.load(layout).keysym_to_linux(keysym)
    assert code is None or code in ec.KEY


def test_unknown_layout_error_is_one_readable_line():
    with pytest.raises(UnknownKeymap) as info:
        Keymap.load("xx-nope")
    text = str(info.value)
    assert "\n" not in text
    assert "xx-nope" in text
    assert "en-us" in text and "de-ch" in text and "fr" in text
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnknownKeymap):
        Keymap.load(None)  # type: ignore[arg-type]


def test_layouts_load_lazily_and_fast():
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "from pyxenfb.console.keymap import Keymap\n"
        "assert not [m for m in sys.modules if 'keymaps.layout_' in m], sys.modules\n"
        "Keymap.load('de')\n"
        "print(sorted(m for m in sys.modules if 'keymaps.layout_' in m))\n"
        "print(time.perf_counter() - t)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True, timeout=60).stdout.splitlines()
    assert out[0] == "['pyxenfb.console.keymaps.layout_de', 'pyxenfb.console.keymaps.layout_en_us']"
    assert float(out[1]) < 1.0


# ---------------------------------------------------------------- code tables


def test_qnum_table():
    assert qnum_to_linux(0x1E) == ec.KEY_A
    assert qnum_to_linux(0x01) == ec.KEY_ESC
    assert qnum_to_linux(0x1C) == ec.KEY_ENTER
    assert qnum_to_linux(0x9C) == ec.KEY_KPENTER
    assert qnum_to_linux(0x48) == ec.KEY_KP8
    assert qnum_to_linux(0xC8) == ec.KEY_UP
    assert qnum_to_linux(0xE048) == ec.KEY_UP
    assert qnum_to_linux(0xE01C) == ec.KEY_KPENTER
    assert qnum_to_linux(0x38) == ec.KEY_LEFTALT
    assert qnum_to_linux(0xB8) == ec.KEY_RIGHTALT
    assert qnum_to_linux(0x1D) == ec.KEY_LEFTCTRL
    assert qnum_to_linux(0x9D) == ec.KEY_RIGHTCTRL
    assert qnum_to_linux(0xCB) == ec.KEY_LEFT
    assert qnum_to_linux(0xD3) == ec.KEY_DELETE
    assert qnum_to_linux(0x53) == ec.KEY_KPDOT
    assert qnum_to_linux(0x57) == ec.KEY_F11
    assert qnum_to_linux(0x54) == ec.KEY_SYSRQ
    assert qnum_to_linux(0xB7) == ec.KEY_SYSRQ
    assert qnum_to_linux(0xDB) == ec.KEY_LEFTMETA
    for bad in (0, -1, 0x100, 0xE100, 0xE0FF, 2**40, "x", None):
        assert qnum_to_linux(bad) is None


def test_qnum_table_agrees_with_xkb_data():
    """xkb-data's 'xfree86' keycodes are XT scancode + 8 for the plain
    (non-E0) keys and its 'evdev' keycodes are Linux code + 8: an independent
    source for the unprefixed half of the table."""
    base = Path("/usr/share/X11/xkb/keycodes")
    if not (base / "xfree86").exists():
        pytest.skip("xkb-data not installed")

    def section(path: Path, name: str) -> dict[str, int]:
        text = path.read_text().split(f'xkb_keycodes "{name}"', 1)[1].split("};")[0]
        return {n: int(v) for n, v in re.findall(r"^\s*<(\w+)>\s*=\s*(\d+);", text, re.M)}

    xfree86 = section(base / "xfree86", "basic")
    evdev_codes = section(base / "evdev", "evdev")
    checked = 0
    for name, xcode in xfree86.items():
        scancode = xcode - 8
        if 1 <= scancode <= 0x58 and name in evdev_codes:
            assert qnum_to_linux(scancode) == evdev_codes[name] - 8, name
            checked += 1
    assert checked >= 80


def test_usb_table():
    assert usb_hid_to_linux(4) == ec.KEY_A
    assert usb_hid_to_linux(29) == ec.KEY_Z
    assert usb_hid_to_linux(40) == ec.KEY_ENTER
    assert usb_hid_to_linux(82) == ec.KEY_UP
    assert usb_hid_to_linux(88) == ec.KEY_KPENTER
    assert usb_hid_to_linux(224) == ec.KEY_LEFTCTRL
    assert usb_hid_to_linux(230) == ec.KEY_RIGHTALT
    for bad in (0, -1, 1000, 2**40, None):
        assert usb_hid_to_linux(bad) is None


# SDL and Linux spell these differently (SDL BREAK is USB Pause, etc.)
SDL_LINUX_NAME_CLASHES = {"BREAK", "CLEAR", "EURO", "MODE", "PRINT", "UNKNOWN"}


def test_usb_table_agrees_with_sdl_scancodes():
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    pygame = pytest.importorskip("pygame")
    checked = 0
    for attr in dir(pygame):
        suffix = attr.removeprefix("KSCAN_")
        if attr.startswith("KSCAN_") and suffix not in SDL_LINUX_NAME_CLASHES \
                and hasattr(ec, f"KEY_{suffix}"):
            assert usb_hid_to_linux(getattr(pygame, attr)) == getattr(ec, f"KEY_{suffix}"), attr
            checked += 1
    assert checked >= 80


def test_linux_key_names_match_evdev():
    assert linux_key_name(ec.KEY_A) == "KEY_A"
    assert linux_key_name(ec.KEY_UP) == "KEY_UP"
    assert linux_key_name(ec.BTN_LEFT) == "BTN_LEFT"
    assert linux_key_name(0x2FE).startswith("KEY_UNKNOWN")
    for code, name in codes.LINUX_KEY_NAMES.items():
        expected = ec.KEY.get(code) or ec.BTN.get(code)
        names = expected if isinstance(expected, (list, tuple)) else [expected]
        assert name in names, (code, name, expected)


def test_every_table_code_is_a_linux_key():
    for code in [*codes.QNUM_TO_LINUX.values(), *codes.USB_TO_LINUX.values()]:
        assert code in ec.KEY
    for layout in LAYOUT_MODULES:
        km = Keymap.load(layout)
        for keysym in km._table:
            assert km.keysym_to_linux(keysym) in ec.KEY, (layout, hex(keysym))


# ---------------------------------------------------------------- generator


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_keymaps", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_keymaps"] = module
    spec.loader.exec_module(module)
    return module


def test_generator_parses_qemu_keymap_format(tmp_path):
    gen = _load_generator()
    keysyms = {"a": 0x61, "A": 0x41, "at": 0x40, "Shift_L": 0xFFE1, "ssharp": 0xDF}
    (tmp_path / "common").write_text("Shift_L 0x2a\n")
    (tmp_path / "test").write_text(
        "# comment\nmap 0x407\ninclude common\n\n"
        "a 0x1e addupper\nat 0x10 altgr\nat 0x03 shift\nssharp 0x0c localstate\n"
        "U20AC 0x12 altgr\n0x01000041 0x1e shift\nnosuchkeysym 0x20\n"
        "at 0x10 altgr\nat 0x11 ctrl\nat 0x12\nat 0x13\nbadline\nat 0x1ff\n"
    )
    table = gen.parse_qemu_layout(tmp_path, "test", keysyms)
    assert table == {
        0xFFE1: [0x2A],
        0x61: [0x1E],
        0x41: [0x11E],
        0x40: [0x210, 0x103, 0x411, 0x12],  # duplicate dropped, capped at 4
        0xDF: [0x0C],
        0x010020AC: [0x212],
        0x01000041: [0x11E],
    }


def test_generator_qnum_encoding():
    gen = _load_generator()
    assert gen.set1_to_qnum(0x1E) == 0x1E
    assert gen.set1_to_qnum(0xE048) == 0xC8
    assert gen.set1_to_qnum(0xF1) == 0x71
    with pytest.raises(ValueError):
        gen.set1_to_qnum(0xE148)


def _keycodemapdb_source() -> Path | None:
    for candidate in (os.environ.get("PYXENFB_KEYCODEMAPDB"),
                      "/work/.mirror/qemu+keycodemapdb/repo"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    return None


def _without_source_lines(text: str) -> str:
    # Source lines name package versions and paths; content is pinned by SOURCES_SHA256
    return "\n".join(line for line in text.splitlines() if not line.startswith("Source: "))


def test_generator_reproduces_committed_tables(tmp_path):
    gen = _load_generator()
    csv_source = _keycodemapdb_source()
    missing = [str(p) for p in (gen.DEFAULT_QEMU_KEYMAPS, gen.DEFAULT_X11_INCLUDE / "keysymdef.h",
                                gen.DEFAULT_LINUX_INPUT_HEADER) if not p.exists()]
    if csv_source is None:
        missing.append("keycodemapdb (set PYXENFB_KEYCODEMAPDB to keymaps.csv or its git dir)")
    if missing:
        pytest.skip(f"keymap sources not installed: {', '.join(missing)}")
    rc = subprocess.run([sys.executable, str(GENERATOR), "--keycodemapdb", str(csv_source),
                         "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert rc.returncode == 0, rc.stderr
    fresh = {p.name: p.read_text() for p in tmp_path.glob("*.py")}
    fresh_sha = re.search(r'SOURCES_SHA256 = "(\w+)"', fresh["index.py"]).group(1)
    if fresh_sha != SOURCES_SHA256:
        pytest.skip("installed keymap sources differ from those the committed tables "
                    "were generated from; run scripts/gen_keymaps.py to update them")
    package = ROOT / "pyxenfb" / "console" / "keymaps"
    committed = {p.name: p.read_text() for p in package.glob("*.py") if p.name != "__init__.py"}
    assert sorted(committed) == sorted(fresh)
    for name in fresh:
        assert _without_source_lines(committed[name]) == _without_source_lines(fresh[name]), name


def test_input_codes_match_linux():
    """console/input_codes.py, the one home of the Linux codes pyxenfb names."""
    from pyxenfb.console import input_codes as ic
    for name in ("KEY_ESC", "KEY_UNKNOWN", "BTN_LEFT", "BTN_RIGHT", "BTN_MIDDLE", "BTN_TASK",
                 "KEY_OK", "KEY_MAX"):
        assert getattr(ic, name) == getattr(ec, name), name
    assert ic.kbdfront_device(ec.BTN_LEFT) == ic.kbdfront_device(ec.BTN_TASK) == "pointer"
    assert ic.kbdfront_device(ec.KEY_A) == ic.kbdfront_device(ec.KEY_OK) == "keyboard"
    assert ic.kbdfront_device(ec.KEY_UNKNOWN) is None and ic.kbdfront_device(ec.KEY_MAX) is None
