"""Dirty regions: the one clip and the one coalescer every display shares.

The console clips what a device marks dirty and coalesces it into a batch
per loop pass; a VNC client that has not asked for an update yet keeps
adding batches to its own `DirtyRegion` of the same kind.
"""
from __future__ import annotations

Rect = tuple[int, int, int, int]          # x, y, w, h

# Beyond this many rectangles a region becomes their bounding box: a few
# rectangles keep a small change small, hundreds would cost more in
# per-rectangle headers and encoder calls than the extra pixels do.
MAX_RECTS = 16


def clip(x: int, y: int, w: int, h: int, width: int, height: int) -> Rect | None:
    """(x, y, w, h) cut to a width x height surface; None when nothing is left."""
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(width, x + w), min(height, y + h)
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1 - x0, y1 - y0)


def _contains(outer: Rect, inner: Rect) -> bool:
    return (outer[0] <= inner[0] and outer[1] <= inner[1]
            and inner[0] + inner[2] <= outer[0] + outer[2]
            and inner[1] + inner[3] <= outer[1] + outer[3])


def bounding_box(rects: list[Rect]) -> Rect:
    x0 = min(r[0] for r in rects)
    y0 = min(r[1] for r in rects)
    x1 = max(r[0] + r[2] for r in rects)
    y1 = max(r[1] + r[3] for r in rects)
    return (x0, y0, x1 - x0, y1 - y0)


class DirtyRegion:
    """A few rectangles: one inside another is dropped, beyond `max_rects`
    they merge into their bounding box.  Rectangles come in clipped."""

    def __init__(self, max_rects: int = MAX_RECTS):
        self.max_rects = max_rects
        self.rects: list[Rect] = []

    def __bool__(self) -> bool:
        return bool(self.rects)

    def add(self, rect: Rect) -> None:
        if rect[2] <= 0 or rect[3] <= 0:
            return
        if any(_contains(r, rect) for r in self.rects):
            return
        self.rects = [r for r in self.rects if not _contains(rect, r)]
        self.rects.append(rect)
        if len(self.rects) > self.max_rects:
            self.rects = [bounding_box(self.rects)]

    def update(self, rects) -> None:
        for rect in rects:
            self.add(rect)

    def take(self) -> list[Rect]:
        rects, self.rects = self.rects, []
        return rects
