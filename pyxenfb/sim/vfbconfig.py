"""An xl `vfb = [ "..." ]` entry: what the toolstack is told about a
domain's framebuffer, parsed as xl_parse.c does, with libxl's defaults."""
from __future__ import annotations

from dataclasses import dataclass

from ..rfb.listener import VNC_BASE_PORT
from .rundir import ToolstackError


@dataclass
class VfbConfig:
    """An xl `vfb = [ "..." ]` entry, with libxl's defaults filled in."""
    vnc: bool = True
    vncdisplay: int = 0
    vnclisten: str = "127.0.0.1"
    vncpasswd: str | None = None
    vncunused: bool = True
    sdl: bool = False
    opengl: bool = False
    keymap: str | None = None
    display: str | None = None          # SDL: DISPLAY for the DM
    xauthority: str | None = None       # SDL: XAUTHORITY for the DM


def _flag(key: str, value: str) -> bool:
    if value not in ("0", "1"):
        raise ToolstackError(f"vfb: {key}={value!r}: expected 0 or 1")
    return value == "1"


def parse_vfb(spec: str) -> VfbConfig:
    """Parse "vnc=1,vncdisplay=D,vnclisten=ADDR,..." as xl_parse.c does."""
    cfg = VfbConfig()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ToolstackError(f"vfb: {item!r} is not key=value")
        if key in ("vnc", "vncunused", "sdl", "opengl"):
            setattr(cfg, key, _flag(key, value))
        elif key == "vncdisplay":
            if not value.isdigit() or int(value) > 65535 - VNC_BASE_PORT:
                raise ToolstackError(f"vfb: vncdisplay={value!r}: expected a display number")
            cfg.vncdisplay = int(value)
        elif key in ("vnclisten", "vncpasswd", "keymap", "display", "xauthority"):
            if any(c in value for c in "\0\n"):
                raise ToolstackError(f"vfb: {key} contains a control character")
            setattr(cfg, key, value)
        else:
            raise ToolstackError(f"vfb: unknown key {key!r}")
    return cfg
