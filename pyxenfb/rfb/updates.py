"""FramebufferUpdates, one way from the picture to the connection.

As QEMU's ui/vnc-jobs.c: when a session may send an update, `Updates.begin`
asks its sans-IO connection what the update answers (`begin_update`: the
rectangles it can see, the encoding and format in force) and copies those
rectangles in the client's pixel format into a snapshot (once per format for
all sessions starting an update in the same loop pass, into reused buffers).
`Updates.run` then encodes the snapshot.  A small one is encoded on the loop
and handed over whole (`finish_update`).  A big one is cut into the pieces
its encoding sends (`encodings.pieces`: bands of ~64K pixels) and a worker
thread encodes piece after piece (zlib, numpy and Pillow release the GIL, so
the second core works).  To a far client (`LinkEstimate`: a slow link) each
piece goes as soon as it is encoded: the head announcing every piece first
(`open_update`), then the loop writes each as it comes (`update_data`), so
the transfer overlaps the encoding, as TigerVNC's does.  A near client's
pieces go in STREAM_BATCH batches, and an update that never fills one goes
out whole when encoded: one wake-up of the loop, not one per piece.
Nothing goes back up: the connection never sees a pixel array, and the
session only decides when.

One job per session is in flight at a time, which keeps its zlib streams in
order; other sessions, input and the guest never wait for it.
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading
import weakref
# By name, so at import: `concurrent.futures` loads its thread module on first
# use, and a zygote child's first big update comes after its chroot.
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Callable, Protocol

import numpy as np

from ..util import malloc
from ..util.pixelformat import PixelFormat
from . import encodings as enc
from .protocol import ServerConnection, UpdatePlan

# Updates this small are encoded on the loop: a thread hand-off costs more
# than encoding them (a 64x64 change must reach the client in ~1 ms).
INLINE_PIXELS = 128 * 128
# Encoder threads: two, so that two clients' frames encode at once on a
# 2-core dom0 (docs/performance.md measures one against two).
ENCODE_WORKERS = int(os.environ.get("PYXENFB_ENCODE_WORKERS", "2"))
POOL_BUFFERS = 2                # idle snapshot buffers kept for reuse
# After this long without an update the pool's frame-sized buffers and the
# encoders' scratch buffers go back to the system: a picture at rest (a text
# console, a client watching an idle guest) keeps no copy of itself
# resident, as one animating does.
QUIET_RELEASE_S = 2.0
# A streamed update's bytes reach the loop in batches of at least this much:
# each hand-over wakes the loop, passes the GIL and writes (syscalls that a
# PV dom0 pays dearly for), so ~64K-pixel pieces of a few KB each go
# together.  32 KiB is ~26 ms of a 10 Mbit/s link, so the link is busy long
# before the encoding ends.
STREAM_BATCH = 32 << 10

Rect = tuple[int, int, int, int]


class ConvertRect(Protocol):
    """Pixel conversion, the display's to give (pyxenfb/convert.py's
    `convert_rect`): the RFB library converts nothing itself."""

    def __call__(self, rows: np.ndarray, src_fmt: PixelFormat, dst_fmt: PixelFormat,
                 x: int, y: int, w: int, h: int, out: np.ndarray | None = None) -> np.ndarray: ...


class Framebuffer(Protocol):
    """What a display shows (console.Surface has this shape)."""
    width: int
    height: int
    fmt: PixelFormat
    rows: np.ndarray


class BufferPool:
    """Snapshot buffers reused between updates: a frame-sized allocation per
    update would be an mmap and munmap each time (and a page fault for each
    of its pages).

    A buffer is written over only when nothing but the pool refers to it:
    an encoder may hand its bytes on as a view (Raw does), and whoever still
    holds that view (a transport that keeps what it could not send yet)
    keeps the buffer; the pool then lets it go and takes another."""

    def __init__(self, keep: int = POOL_BUFFERS):
        self.keep = keep
        self.allocations = 0
        self._free: list[np.ndarray] = []
        # What sys.getrefcount says of a buffer only the pool's list holds,
        # measured the same way as below (the count differs between versions).
        probe = [np.empty(0, np.uint8)]
        self._alone = sys.getrefcount(probe[0])

    # By index, never list.remove(): that compares arrays with ==, element
    # by element (a ValueError for two free buffers of different sizes).
    def get(self, nbytes: int) -> np.ndarray:
        self._free = [self._free[i] for i in range(len(self._free))
                      if sys.getrefcount(self._free[i]) <= self._alone]
        fits = [i for i, b in enumerate(self._free) if b.size >= nbytes]
        if fits:
            return self._free.pop(min(fits, key=lambda i: self._free[i].size))
        self.allocations += 1
        return np.empty(max(nbytes, 1 << 16), np.uint8)

    def release_free(self) -> int:
        """Let the idle buffers go; how many there were."""
        count, self._free = len(self._free), []
        return count

    def put(self, buf: np.ndarray) -> None:
        self._free.append(buf)
        if len(self._free) > self.keep:
            del self._free[min(range(len(self._free)), key=lambda i: self._free[i].size)]


class Snapshot:
    """Rectangles copied in one pixel format, shared by the jobs using them;
    its buffer goes back to the pool when the last job lets go."""

    def __init__(self, pool: BufferPool, convert_rect: ConvertRect, rows: np.ndarray,
                 src_fmt: PixelFormat, dst_fmt: PixelFormat, rects: list[Rect]):
        bpp = dst_fmt.bytes_per_pixel
        self._pool = pool
        self.buffer = pool.get(sum(w * h * bpp for _, _, w, h in rects))
        self.pixels = []
        at = 0
        for x, y, w, h in rects:
            out = self.buffer[at:at + w * h * bpp].reshape(h, w * bpp)
            self.pixels.append(convert_rect(rows, src_fmt, dst_fmt, x, y, w, h, out=out))
            at += w * h * bpp
        self.users = 0

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self.buffer is not None:
            self.pixels = []
            self._pool.put(self.buffer)
            self.buffer = None


class UpdateJob:
    """One FramebufferUpdate: the pixels were copied (converted to the
    client's format) when it began, so neither a guest rewriting its
    framebuffer nor a surface going away afterwards can reach them.

    Its rectangles are cut into the pieces the encoding sends
    (`encodings.pieces`), so their number is known before any is encoded.
    `encode()` touches only the job and the session's encoder (its zlib
    streams), so it may run in a worker thread while the loop goes on with
    the connection, handing each piece's bytes over as it goes (`open`
    first queues the update's head); `finish()` hands the whole result to
    the connection at once, on the loop.  The encoding, pixel format and
    compression level are those in force when the job began (later changes
    apply to the next update, as if this one had already been on the wire)."""

    def __init__(self, conn: ServerConnection, encoder: enc.Encoder, plan: UpdatePlan | None,
                 pixels: list[np.ndarray], snapshots: list[Snapshot]):
        self.conn = conn
        self.plan = plan                       # None: nothing this client can see changed
        self._encoder = encoder
        self.pieces = _cut(plan, pixels) if plan else []
        self._snapshots = snapshots
        self._chunks: list[bytes] | None = None

    @property
    def pixel_count(self) -> int:
        return sum(w * h for _, _, _, w, h in self.pieces)

    def encode(self, hand_over: Callable[[list[bytes]], None] | None = None) -> None:
        """Encode every piece (the slow part; safe off the loop).  With
        hand_over, each piece's bytes go to it as they are ready (after
        `open`); else they are kept for `finish`."""
        plan = self.plan
        chunks: list[bytes] = []
        if plan.compress_level is not None:
            self._encoder.set_compress_level(plan.compress_level)
        for pixels, x, y, w, h in self.pieces:
            n, data = self._encoder.encode_chunks(plan.encoding, plan.fmt, pixels, x, y, w, h,
                                                  jpeg_quality=plan.jpeg_quality,
                                                  gradient=plan.tight_gradient)
            if n != 1:          # the head announced one rectangle a piece
                raise RuntimeError(f"a {w}x{h} piece encoded as {n} rectangles")
            if hand_over is None:
                chunks += data
            else:
                hand_over(data)
            if self.conn.closed:
                return          # nobody to send the rest to
        self._chunks = chunks

    def open(self) -> int:
        """Queue the update's head on the connection, announcing every
        piece, before `encode(hand_over)` sends them; the bytes queued."""
        return self.conn.open_update(self.plan, len(self.pieces))

    def finish(self) -> int:
        """Queue the whole FramebufferUpdate on the connection (encoding it
        first if nobody has); the number of bytes queued."""
        try:
            if self.plan is None:
                return 0
            if self._chunks is None:
                self.encode()
            return self.conn.finish_update(self.plan, self._chunks, len(self.pieces))
        finally:
            self.release()

    def release(self) -> None:
        """Let go of the snapshots (idempotent), and of every view of them
        (the pool reuses a buffer only when nothing else refers to it)."""
        self.pieces = []
        if self._chunks is not None:
            self._chunks = []
        snaps, self._snapshots = self._snapshots, []
        for snap in snaps:
            snap.release()


def _cut(plan: UpdatePlan, pixels: list[np.ndarray]) -> list[tuple]:
    """(pixels, x, y, w, h) of every piece the plan's rectangles are sent as."""
    bpp = plan.fmt.bytes_per_pixel
    out = []
    for rows, (x, y, w, h) in zip(pixels, plan.rects):
        for px, py, pw, ph in enc.pieces(plan.encoding, x, y, w, h):
            if (pw, ph) == (w, h):
                out.append((rows, x, y, w, h))
            else:
                out.append((rows[py - y:py - y + ph, (px - x) * bpp:(px - x + pw) * bpp], px, py, pw, ph))
    return out


class LinkEstimate:
    """Whether a client is far: it takes longer to take in an update (from
    the moment the update is queued to its next request: the link's rate
    and round trip, and the client's own work) than we take to make one.
    For a far client the transfer is what it waits on, so each piece goes
    the moment it is encoded (batch 0); a near one gets STREAM_BATCH
    batches, since there the hand-overs themselves are the cost.  Both
    times are smoothed (each new sample moves them a quarter of the way);
    with no request to time (continuous updates) a client counts as near."""

    WEIGHT = 0.25

    def __init__(self):
        self.make_s: float | None = None          # request -> update queued, ours
        self.take_s: float | None = None          # update queued -> next request, the client's
        self._began_at = 0.0
        self._queued_at: float | None = None

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.WEIGHT * (new - old)

    def began(self, now: float) -> None:
        """An update begins (its snapshot is taken)."""
        self._began_at = now

    def made(self, now: float) -> None:
        """The update begun last is queued on the connection."""
        self.make_s = self._mix(self.make_s, now - self._began_at)
        self._queued_at = now

    def requested(self, now: float) -> None:
        """The client asked for its next update."""
        if self._queued_at is not None:
            self.take_s = self._mix(self.take_s, now - self._queued_at)
            self._queued_at = None

    @property
    def far(self) -> bool:
        return self.take_s is not None and self.make_s is not None and self.take_s > self.make_s

    @property
    def batch(self) -> int:
        return 0 if self.far else STREAM_BATCH


class _HandOver:
    """A streamed job's bytes, from its encoder thread to the loop.  The
    thread adds each piece's bytes and wakes the loop once `batch` of
    them wait (and no wake-up is already on its way); the first batch opens
    the update on the connection.  What never reached a batch goes out with
    the whole update at the end (`take`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, job: UpdateJob, progress: Callable[[], None],
                 batch: int = STREAM_BATCH):
        self._loop = loop
        self._job = job
        self._progress = progress
        self._batch = batch
        self._lock = threading.Lock()
        self._waiting: list[bytes] = []
        self._waiting_bytes = 0
        self._woken = False
        self.opened = False                  # the head is on the connection
        self.ended = False                   # the job is over: late wake-ups do nothing
        self.nbytes = 0

    def put(self, chunks: list[bytes]) -> None:
        """In the encoder thread."""
        with self._lock:
            self._waiting += chunks
            self._waiting_bytes += sum(map(len, chunks))
            if self._woken or self._waiting_bytes < self._batch:
                return
            self._woken = True
        self._loop.call_soon_threadsafe(self.deliver)

    def take(self) -> list[bytes]:
        """Whatever waits, for the caller to queue."""
        with self._lock:
            chunks, self._waiting, self._waiting_bytes, self._woken = self._waiting, [], 0, False
        return chunks

    def deliver(self) -> None:
        """On the loop: whatever arrived goes onto the connection, after
        the update's head the first time."""
        if self.ended:
            return
        chunks = self.take()
        conn = self._job.conn
        if chunks and not conn.closed:
            if not self.opened:
                self.nbytes += self._job.open()
                self.opened = True
            self.nbytes += conn.update_data(chunks)
            self._progress()


class Updates:
    """A server's update machinery: snapshots shared within a loop pass,
    their buffer pool, the encoder threads and the heap trimming."""

    def __init__(self, convert_rect: ConvertRect, quiet_release: float = QUIET_RELEASE_S):
        self._convert_rect = convert_rect
        self._pool = BufferPool()
        self._executor: ThreadPoolExecutor | None = None
        self._trim = malloc.PeriodicTrim()
        self._pass_snapshots: dict[tuple, Snapshot] = {}
        self._quiet_release = quiet_release
        self._last_finish = 0.0
        self._quiet_timer: asyncio.TimerHandle | None = None
        self._encoders: weakref.WeakSet[enc.Encoder] = weakref.WeakSet()   # used since the last quiet
        self._in_flight = 0             # jobs in the encoder threads

    def begin(self, conn: ServerConnection, encoder: enc.Encoder, fb: Framebuffer,
              rects: list[Rect]) -> UpdateJob:
        """Start answering `conn`'s outstanding request with `rects` of `fb`:
        the pixels are copied now."""
        # Never trust the size bookkeeping further than the pixels go.
        rows = fb.rows
        plan = conn.begin_update(rows.shape[1] // fb.fmt.bytes_per_pixel, rows.shape[0], rects)
        if plan is None:
            return UpdateJob(conn, encoder, None, [], [])
        snapshots: list[Snapshot] = []
        pixels = self._snapshot(snapshots, rows, fb.fmt, plan.fmt, list(plan.rects))
        self._encoders.add(encoder)
        return UpdateJob(conn, encoder, plan, pixels, snapshots)

    def run(self, job: UpdateJob, sent: Callable[[int], None],
            failed: Callable[[BaseException], None],
            progress: Callable[[], None] = lambda: None, batch: int = STREAM_BATCH) -> None:
        """Encode `job` and queue it on its connection, then call sent(bytes)
        on the loop -- at once for a small job.  A big one is encoded by a
        worker thread and, once its bytes reach `batch` (a far client's
        LinkEstimate says 0: every piece at once), goes out batch by batch
        as they come: progress() on the loop after each batch is queued
        (the session writes them).
        failed(exc) if encoding raised (the update's head may be out: the
        session must close); neither if the connection closed meanwhile."""
        if job.plan is None or job.pixel_count <= INLINE_PIXELS or job.plan.encoding == enc.RAW:
            # Raw is no work (the snapshot's bytes go as they are): a thread
            # hand-off would cost more than it, whatever the size.
            self._finish(job, sent)
            return
        loop = asyncio.get_running_loop()
        hand_over = _HandOver(loop, job, progress, batch)
        future = loop.run_in_executor(self._encoder_pool(), job.encode, hand_over.put)
        self._in_flight += 1
        future.add_done_callback(lambda f: self._encoded(job, f, hand_over, sent, failed))

    def _encoded(self, job: UpdateJob, future, hand_over: _HandOver, sent, failed) -> None:
        """Back on the loop: a worker finished (or failed) a job."""
        self._in_flight -= 1
        conn = job.conn
        try:
            if future.cancelled() or conn.closed:
                return
            exc = future.exception()
            if hand_over.opened:
                hand_over.deliver()             # the last batch
                conn.close_update()
                nbytes = hand_over.nbytes
            elif exc is None:                   # it never filled a batch: all at once
                nbytes = conn.finish_update(job.plan, hand_over.take(), len(job.pieces))
            if exc is not None:
                failed(exc)
                return
        finally:
            hand_over.ended = True
            job.release()
        self._trim()
        self._watch_quiet()
        sent(nbytes)

    def _finish(self, job: UpdateJob, sent) -> None:
        nbytes = job.finish()
        self._trim()            # give fragmented heap memory back, once a second
        self._watch_quiet()
        sent(nbytes)

    def _watch_quiet(self) -> None:
        """Note an update; one timer (not one per update) looks for the quiet."""
        loop = asyncio.get_running_loop()
        self._last_finish = loop.time()
        if self._quiet_timer is None:
            self._quiet_timer = loop.call_later(self._quiet_release, self._quiet_check)

    def _quiet_check(self) -> None:
        loop = asyncio.get_running_loop()
        left = self._last_finish + self._quiet_release - loop.time()
        if self._in_flight:             # an encoder is busy: look again later
            left = max(left, self._quiet_release)
        if left > 0:
            self._quiet_timer = loop.call_later(left, self._quiet_check)
            return
        self._quiet_timer = None
        self._release_buffers()

    def _release_buffers(self) -> None:
        """The pool's idle buffers, the encoders' scratch and Tight's zlib
        streams back to the system (the encoders' only while no encoder
        thread is at work)."""
        self._pool.release_free()
        if not self._in_flight:
            for encoder in list(self._encoders):
                encoder.release_idle_memory()
            self._encoders = weakref.WeakSet()
        malloc.trim()

    def _encoder_pool(self) -> Executor:
        """The encoder threads, started with the first big update (never
        before: nothing to pay at start-up, and no thread exists to fork)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=max(1, ENCODE_WORKERS), thread_name_prefix="vnc-encode")
        return self._executor

    def _snapshot(self, holders: list[Snapshot], rows: np.ndarray, src_fmt: PixelFormat,
                  dst_fmt: PixelFormat, rects: list[Rect]) -> list[np.ndarray]:
        """Copies of `rects` in `dst_fmt`, converted once per loop pass for
        every session that starts an update with the same format and rects."""
        key = (dst_fmt, tuple(rects))
        snap = self._pass_snapshots.get(key)
        if snap is None:
            if not self._pass_snapshots:
                asyncio.get_running_loop().call_soon(self._end_pass)
            snap = Snapshot(self._pool, self._convert_rect, rows, src_fmt, dst_fmt, rects)
            snap.users += 1                   # the pass's own hold, dropped in _end_pass
            self._pass_snapshots[key] = snap
        snap.users += 1
        holders.append(snap)
        return snap.pixels

    def _end_pass(self) -> None:
        """The guest may write again after this pass: later updates copy anew."""
        snaps, self._pass_snapshots = self._pass_snapshots, {}
        for snap in snaps.values():
            snap.release()

    def idle(self) -> None:
        """Nobody watches: let the frame buffers go back to the system
        instead of staying resident until the next client."""
        self._release_buffers()

    def close(self) -> None:
        if self._quiet_timer is not None:
            self._quiet_timer.cancel()
            self._quiet_timer = None
        if self._executor is not None:
            # Jobs of closed sessions finish on their own; nobody waits for them.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def send_update(conn: ServerConnection, rows: np.ndarray, src_fmt: PixelFormat,
                rects: list[Rect], encoder: enc.Encoder, convert_rect: ConvertRect) -> int:
    """Begin, encode and queue one update at once, without a loop (tests,
    tools): `rects` of the surface `rows`; the number of bytes queued."""
    plan = conn.begin_update(rows.shape[1] // src_fmt.bytes_per_pixel, rows.shape[0], rects)
    if plan is None:
        return 0
    pixels = [convert_rect(rows, src_fmt, plan.fmt, *r) for r in plan.rects]
    return UpdateJob(conn, encoder, plan, pixels, []).finish()
