"""Keyboard input translation: VNC keysyms, QEMU key numbers and USB HID
usages to Linux input codes (the KEY_* values a XENKBD KEY event carries).

The tables live in the generated package ``pyxenfb.console.keymaps`` (built by
scripts/gen_keymaps.py from QEMU's keymaps, keycodemapdb and X11/Linux
headers).  Semantics follow QEMU's ``-k`` keysym path: a keysym maps to the
key that produces it on the layout; modifier keysyms map to their keys; a
shifted or AltGr symbol maps to its key without the modifier (the VNC client
presses Shift/AltGr itself).  See docs/keymaps.md.
"""

from __future__ import annotations

import importlib
import logging
from functools import cache

from pyxenfb.console.keymaps import codes
from pyxenfb.console.keymaps.index import LAYOUT_MODULES

log = logging.getLogger(__name__)

DEFAULT_LAYOUT = "en-us"

# Modifier bits of a layout entry (scancode | modifiers << 8), as generated.
MOD_SHIFT = 1
MOD_ALTGR = 2
MOD_CTRL = 4
_SCANCODE_MASK = 0xFF

_XK_TAB = 0xFF09
_XK_ISO_LEFT_TAB = 0xFE20
_MAX_KEYSYM = 0x1FFFFFFF  # keysyms are 29-bit values
_UNICODE_KEYSYM_BASE = 0x01000000
_MAX_CODEPOINT = 0x10FFFF


def _is_layout_independent(keysym: int) -> bool:
    """Function, cursor, keypad, modifier and vendor keysyms: the same key on
    every layout, so a layout that lacks one can borrow it from en-us."""
    return 0xFD00 <= keysym <= 0xFFFF or keysym >= 0x10000000


class UnknownKeymap(ValueError):
    """A keyboard layout name QEMU does not ship."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"unknown keymap {name!r}; available: {', '.join(available_layouts())}"
        )


def available_layouts() -> list[str]:
    return sorted(LAYOUT_MODULES)


@cache
def _unicode_to_legacy_keysym() -> dict[int, int]:
    reverse: dict[int, int] = {}
    for keysym, codepoint in sorted(codes.KEYSYM_TO_UNICODE.items()):
        reverse.setdefault(codepoint, keysym)
    return reverse


def _codepoint_of(keysym: int) -> int | None:
    if 0x20 <= keysym <= 0x7E or 0xA0 <= keysym <= 0xFF:
        return keysym  # Latin-1 keysyms are their code points
    if _UNICODE_KEYSYM_BASE + 0x20 <= keysym <= _UNICODE_KEYSYM_BASE + _MAX_CODEPOINT:
        return keysym - _UNICODE_KEYSYM_BASE
    return codes.KEYSYM_TO_UNICODE.get(keysym)


def _keysyms_for_codepoint(codepoint: int) -> list[int]:
    """Both spellings of a character: legacy keysym (if any) and Unicode keysym."""
    forms = []
    if 0x20 <= codepoint <= 0x7E or 0xA0 <= codepoint <= 0xFF:
        forms.append(codepoint)
    elif (legacy := _unicode_to_legacy_keysym().get(codepoint)) is not None:
        forms.append(legacy)
    forms.append(_UNICODE_KEYSYM_BASE + codepoint)
    return forms


def _lookup_order(keysym: int) -> list[int]:
    """Keysyms to try, best first: the keysym itself, the other spelling of
    the same character (clients differ in legacy vs Unicode keysyms), then
    the other case of a letter (old keymaps list only lowercase letters)."""
    order = [keysym]
    if keysym == _XK_ISO_LEFT_TAB:
        order.append(_XK_TAB)  # QEMU treats Shift+Tab's keysym as Tab
    codepoint = _codepoint_of(keysym)
    if codepoint is None:
        return order
    order += _keysyms_for_codepoint(codepoint)
    char = chr(codepoint)
    for other in {char.lower(), char.upper()}:
        if len(other) == 1 and other != char:
            order += _keysyms_for_codepoint(ord(other))
    return list(dict.fromkeys(order))


class Keymap:
    """One QEMU keyboard layout (``-k NAME``)."""

    def __init__(self, name: str, table: dict[int, int | tuple[int, ...]],
                 fallback: "Keymap | None") -> None:
        self.name = name
        self._table = table
        self._fallback = fallback

    @classmethod
    def load(cls, name: str = DEFAULT_LAYOUT) -> "Keymap":
        if not isinstance(name, str) or name not in LAYOUT_MODULES:
            raise UnknownKeymap(str(name))
        return _load(name)

    def entries(self, keysym: int) -> tuple[int, ...]:
        """Packed (scancode | modifiers << 8) entries for a keysym, QEMU's
        preference order; empty if the layout cannot type it."""
        if not isinstance(keysym, int) or not 0 < keysym <= _MAX_KEYSYM:
            return ()
        for candidate in _lookup_order(keysym):
            found = self._table.get(candidate)
            if found is not None:
                return found if isinstance(found, tuple) else (found,)
        if self._fallback is not None and _is_layout_independent(keysym):
            return self._fallback.entries(keysym)
        return ()

    def keysym_to_linux(self, keysym: int, *, modifiers: int | None = None) -> int | None:
        """Linux KEY_* code of the key producing keysym on this layout.

        Where several keys produce it, QEMU prefers the one whose modifiers
        (MOD_SHIFT | MOD_ALTGR | MOD_CTRL) equal those currently held, else
        the first listed; pass ``modifiers`` to get exactly that choice.
        Without it, the first key needing neither AltGr nor Ctrl is taken:
        a client's Shift state usually matches the symbol it sends, while
        AltGr alternatives (de: AltGr+ä for '^') are rarely what was typed."""
        entries = self.entries(keysym)
        if not entries:
            return None
        if modifiers is None:
            chosen = next((e for e in entries if not e >> 8 & ~MOD_SHIFT), entries[0])
        else:
            chosen = next((e for e in entries if e >> 8 == modifiers), entries[0])
        return qnum_to_linux(chosen & _SCANCODE_MASK)

    def keysym_to_linux_candidates(self, keysym: int) -> list[int]:
        """All Linux codes that produce keysym, in the layout's order."""
        found = (qnum_to_linux(e & _SCANCODE_MASK) for e in self.entries(keysym))
        return list(dict.fromkeys(c for c in found if c is not None))

    def __repr__(self) -> str:
        return f"Keymap({self.name!r})"


@cache
def _load(name: str) -> Keymap:
    module = importlib.import_module(f"pyxenfb.console.keymaps.{LAYOUT_MODULES[name]}")
    fallback = None if name == DEFAULT_LAYOUT else _load(DEFAULT_LAYOUT)
    return Keymap(name, module.KEYSYM_TO_SCANCODES, fallback)


def qnum_to_linux(qnum: int) -> int | None:
    """QEMU Extended Key Event keycode -> Linux code.

    Accepts QEMU's numbering (XT set-1 scancode, E0-prefixed keys as
    0x80 | code) and the raw two-byte form 0xE0xx."""
    if not isinstance(qnum, int):
        return None
    if 0xE000 <= qnum <= 0xE07F:
        qnum = 0x80 | (qnum & 0x7F)
    return codes.QNUM_TO_LINUX.get(qnum)


def usb_hid_to_linux(usage: int) -> int | None:
    """USB HID keyboard usage (= SDL2 scancode) -> Linux code."""
    return codes.USB_TO_LINUX.get(usage) if isinstance(usage, int) else None


def linux_key_name(code: int) -> str:
    """'KEY_A' for 30; a placeholder naming the number for unknown codes."""
    return codes.LINUX_KEY_NAMES.get(code, f"KEY_UNKNOWN_{code}")


# Keys whose being held selects among a keysym's alternatives (QEMU's
# shift / altgr / ctrl modifier state), as Linux codes from the tables.
_MODIFIER_KEYS: dict[int, int] = {
    code: bit
    for qnum, bit in ((0x2A, MOD_SHIFT), (0x36, MOD_SHIFT), (0xB8, MOD_ALTGR),
                      (0x1D, MOD_CTRL), (0x9D, MOD_CTRL))
    if (code := codes.QNUM_TO_LINUX.get(qnum)) is not None
}


class KeysymDecoder:
    """Per-client keysym press/release -> Linux code, with QEMU's state rules.

    On press, among a keysym's keys the one matching the held modifiers wins;
    on release, the key that the press chose (or any of its keys that is
    down) is released, so a key never stays stuck when the modifier changed
    in between.  Bounded: at most MAX_HELD keysyms are tracked as held."""

    MAX_HELD = 128

    def __init__(self, keymap: Keymap) -> None:
        self.keymap = keymap
        self._held: dict[int, int] = {}  # keysym -> Linux code sent on press

    def modifiers(self) -> int:
        bits = 0
        for code in self._held.values():
            bits |= _MODIFIER_KEYS.get(code, 0)
        return bits

    def press(self, keysym: int) -> int | None:
        if keysym in self._held:
            return self._held[keysym]  # auto-repeat: same key again
        code = self.keymap.keysym_to_linux(keysym, modifiers=self.modifiers())
        if code is None:
            log.info("keymap %s: no key for keysym %#x", self.keymap.name, keysym)
            return None
        if len(self._held) >= self.MAX_HELD:
            log.warning("keymap %s: too many keys held, ignoring keysym %#x",
                        self.keymap.name, keysym)
            return None
        self._held[keysym] = code
        return code

    def release(self, keysym: int) -> int | None:
        code = self._held.pop(keysym, None)
        if code is not None:
            return code
        candidates = self.keymap.keysym_to_linux_candidates(keysym)
        held_codes = set(self._held.values())
        for candidate in candidates:
            if candidate in held_codes:
                for held_keysym, held_code in list(self._held.items()):
                    if held_code == candidate:
                        del self._held[held_keysym]
                return candidate
        return candidates[0] if candidates else None

    def release_all(self) -> list[int]:
        """Codes to release when the client goes away (no stuck keys)."""
        codes_down = list(dict.fromkeys(self._held.values()))
        self._held.clear()
        return codes_down
