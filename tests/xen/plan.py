"""What the real-Xen tier sends to the guest and what Linux must report.

One source of truth for both sides: conftest.py writes the VNC actions into
the share for the dom0 script (tests/xen/dom0/tier.sh), and test_real_xen.py
compares the guest's evdev log with the expected Linux codes below.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Linux input codes (linux/input-event-codes.h)
EV_KEY, EV_REL, EV_ABS = 1, 2, 3
ABS_X, ABS_Y, REL_WHEEL = 0, 1, 8
BTN_LEFT, BTN_RIGHT, BTN_MIDDLE = 272, 273, 274
KEY_LEFTSHIFT, KEY_RIGHTALT, KEY_LEFTCTRL = 42, 100, 29
SENTINEL_KEYSYM, SENTINEL_CODE = 0x78, 45     # 'x' -> KEY_X, the last key of every plan

SHIFT_L, CONTROL_L, ISO_LEVEL3_SHIFT = 0xFFE1, 0xFFE3, 0xFE03


@dataclass
class KeyPlan:
    """VNC key actions and the (code, value) key events Linux must log for them."""
    actions: list[str] = field(default_factory=list)
    expected: list[tuple[int, int]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    def tap(self, label: str, keysym: int, code: int) -> KeyPlan:
        self.actions.append(f"key:{keysym:#x}")
        self.expected += [(code, 1), (code, 0)]
        self.labels.append(label)
        return self

    def chord(self, label: str, mod_keysym: int, mod_code: int,
              keys: list[tuple[int, int]]) -> KeyPlan:
        """Modifier held while the (keysym, code) keys are tapped: what a client sends."""
        self.actions.append(f"down:{mod_keysym:#x}")
        self.expected.append((mod_code, 1))
        for keysym, code in keys:
            self.actions.append(f"key:{keysym:#x}")
            self.expected += [(code, 1), (code, 0)]
        self.actions.append(f"up:{mod_keysym:#x}")
        self.expected.append((mod_code, 0))
        self.labels.append(label)
        return self

    def finish(self) -> KeyPlan:
        self.tap("sentinel x", SENTINEL_KEYSYM, SENTINEL_CODE)
        return self

    def chunks(self, max_events: int = 16) -> list[tuple[int, list[str]]]:
        """(key events expected so far, actions) per chunk, chords never split.

        The guest logs events with a busybox reader that TCG can starve; Linux
        evdev keeps 64 entries per reader (32 key events with their SYN) and
        then drops (SYN_DROPPED). dom0 sends one chunk, then waits until the
        guest has logged it."""
        out: list[tuple[int, list[str]]] = []
        current: list[str] = []
        events = total = 0
        for action in self.actions:
            current.append(action)
            events += 1 if action.startswith(("down:", "up:")) else 2
            if self._in_chord(current):
                continue
            if events >= max_events:
                total += events
                out.append((total, current))
                current, events = [], 0
        if current:
            out.append((total + events, current))
        return out

    @staticmethod
    def _in_chord(actions: list[str]) -> bool:
        return sum(a.startswith("down:") for a in actions) > sum(a.startswith("up:") for a in actions)


def us_keys() -> KeyPlan:
    """Default keymap (libxl passes no -k: en-us)."""
    p = KeyPlan()
    for ch, code in zip("azqm", (30, 44, 16, 50)):
        p.tap(f"letter {ch}", ord(ch), code)
    for ch, code in zip("105", (2, 11, 6)):
        p.tap(f"digit {ch}", ord(ch), code)
    p.chord("Shift+a -> A", SHIFT_L, KEY_LEFTSHIFT, [(ord("A"), 30)])
    p.chord("Shift+1 -> !, Shift+2 -> @, Shift+/ -> ?", SHIFT_L, KEY_LEFTSHIFT,
            [(ord("!"), 2), (ord("@"), 3), (ord("?"), 53)])
    p.chord("Ctrl+c", CONTROL_L, KEY_LEFTCTRL, [(ord("c"), 46)])
    for label, keysym, code in [("F1", 0xFFBE, 59), ("F5", 0xFFC2, 63), ("F12", 0xFFC9, 88),
                                ("Return", 0xFF0D, 28), ("Escape", 0xFF1B, 1),
                                ("BackSpace", 0xFF08, 14), ("Tab", 0xFF09, 15),
                                ("space", 0x20, 57), ("Left", 0xFF51, 105),
                                ("minus", ord("-"), 12), ("slash", ord("/"), 53)]:
        p.tap(label, keysym, code)
    return p.finish()


def de_keys() -> KeyPlan:
    """keymap="de": the keysyms a German client sends -> the German key positions."""
    p = KeyPlan()
    for label, keysym, code in [("z (QWERTZ)", ord("z"), 21), ("y (QWERTZ)", ord("y"), 44),
                                ("udiaeresis", 0xFC, 26), ("odiaeresis", 0xF6, 39),
                                ("adiaeresis", 0xE4, 40), ("ssharp", 0xDF, 12),
                                ("numbersign", ord("#"), 43), ("minus", ord("-"), 53),
                                ("less", ord("<"), 86), ("digit 1", ord("1"), 2),
                                ("F1", 0xFFBE, 59)]:
        p.tap(label, keysym, code)
    p.chord('Shift+2 -> "', SHIFT_L, KEY_LEFTSHIFT, [(ord('"'), 3)])
    p.chord("Shift+7 -> /", SHIFT_L, KEY_LEFTSHIFT, [(ord("/"), 8)])
    p.chord("Shift+z -> Z", SHIFT_L, KEY_LEFTSHIFT, [(ord("Z"), 21)])
    p.chord("AltGr+q -> @", ISO_LEVEL3_SHIFT, KEY_RIGHTALT, [(ord("@"), 16)])
    p.chord("AltGr+e -> EuroSign", ISO_LEVEL3_SHIFT, KEY_RIGHTALT, [(0x20AC, 18)])
    return p.finish()


# Pointer: (x, y, VNC button mask). Mask bits: 1 left, 2 middle, 4 right, 8/16 wheel up/down.
# Each click is preceded by a plain move there, as clients send them: Debian's
# QEMU delivers a button before the motion that came with it, so a press sent
# with a new position lands at the old one.
POINTER_ACTIONS = [
    (200, 150, 0), (799, 599, 0), (0, 0, 0), (123, 456, 0),
    (123, 456, 1), (123, 456, 0),                                  # left click
    (640, 480, 0), (640, 480, 4), (640, 480, 0),                   # right click
    (321, 123, 0), (321, 123, 2), (321, 123, 0),                   # middle click
    (400, 300, 0), (400, 300, 8), (400, 300, 0),                   # wheel up
    (400, 300, 16), (400, 300, 0),                                 # wheel down
    (7, 5, 0), (7, 5, 1), (7, 5, 0),                               # sentinel: left click
]
POINTER_POSITIONS = [(200, 150), (799, 599), (0, 0), (123, 456), (640, 480),
                     (321, 123), (400, 300), (7, 5)]
POINTER_BUTTONS = [   # (code, value, at position)
    (BTN_LEFT, 1, (123, 456)), (BTN_LEFT, 0, (123, 456)),
    (BTN_RIGHT, 1, (640, 480)), (BTN_RIGHT, 0, (640, 480)),
    (BTN_MIDDLE, 1, (321, 123)), (BTN_MIDDLE, 0, (321, 123)),
    (BTN_LEFT, 1, (7, 5)), (BTN_LEFT, 0, (7, 5)),
]
WHEEL = [1, -1]      # REL_WHEEL values: up, then down


def pointer_actions() -> list[str]:
    # The leading sync sends SetEncodings first, as every real client does: until
    # then QEMU treats the pointer as relative, which the Xen absolute pointer drops.
    return ["sync"] + [f"ptr:{x},{y},{m}" for x, y, m in POINTER_ACTIONS] + ["sync"]


ENCODINGS = ["raw", "rre", "hextile", "zlib", "zrle", "tight"]
VNC_PASSWORD = "s3cretpw"      # VNC uses at most 8 bytes
WRONG_PASSWORD = "wrongpw1"
