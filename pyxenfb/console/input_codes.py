"""The Linux input event codes pyxenfb names (linux/input-event-codes.h),
defined once: the pointer buttons, and the code ranges Linux's xen-kbdfront
routes to its keyboard and its pointer device (pvfb.md section 4).  The full
code -> name table is the generated keymaps/codes.py."""
from __future__ import annotations

KEY_ESC = 1
KEY_UNKNOWN = 240
BTN_LEFT, BTN_RIGHT, BTN_MIDDLE = 0x110, 0x111, 0x112
BTN_TASK = 0x117              # the last pointer button xen-kbdfront routes
KEY_OK = 0x160
KEY_MAX = 0x2FF


def kbdfront_device(code: int) -> str | None:
    """Which of xen-kbdfront's input devices reports `code`: "pointer",
    "keyboard", or None (Linux drops it)."""
    if BTN_LEFT <= code <= BTN_TASK:
        return "pointer"
    if KEY_ESC <= code < KEY_UNKNOWN or KEY_OK <= code < KEY_MAX:
        return "keyboard"
    return None
