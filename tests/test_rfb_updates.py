"""rfb/updates.py: the one-way update path, from a snapshot to the sans-IO
connection's finish_update, with no socket."""
from __future__ import annotations

import asyncio
import struct
import threading

import numpy as np
import pytest

from pyxenfb.convert import convert_rect
from pyxenfb.rfb import encodings as enc
from pyxenfb.rfb import protocol as rfb
from pyxenfb.rfb.updates import INLINE_PIXELS, STREAM_BATCH, LinkEstimate, Updates
from rfb_harness import make_picture
from test_rfb_protocol import fbur, set_encodings, to_normal


def _waiting(encoding=enc.RAW) -> rfb.ServerConnection:
    conn = to_normal()
    conn.receive_data(set_encodings(encoding) + fbur(0))
    conn.data_to_send()
    return conn


async def _until_pooled(updates: Updates) -> None:
    """Until a snapshot's buffer is back in the pool: the pass's own hold
    goes in a callback the loop runs next (a bounded number of turns)."""
    for _ in range(100):
        if updates._pool._free:
            return
        await asyncio.sleep(0)


def _on_call(obj, name: str, counter: list, event: asyncio.Event, after: int = 1) -> None:
    """Wrap obj.name so that each call is counted, and `event` is set once
    there have been `after` calls."""
    real = getattr(obj, name)

    def wrapped(*args, **kw):
        result = real(*args, **kw)
        counter.append(1)
        if len(counter) >= after:
            event.set()
        return result
    setattr(obj, name, wrapped)


def test_plan_then_finish_queues_one_update_with_pseudo_first():
    conn = to_normal()
    conn.receive_data(set_encodings(enc.RAW, enc.QEMU_LED_STATE) + fbur(1))
    conn.data_to_send()
    plan = conn.begin_update(800, 600, [(790, 590, 50, 50)])
    assert plan.rects == ((790, 590, 10, 10),) and len(plan.pseudo) == 1 and not plan.full
    assert conn.pending_request is None and not conn.has_pseudo
    body = b"r" * 10
    assert conn.finish_update(plan, [body], 1) == 4 + len(plan.pseudo[0]) + len(body)
    assert conn.data_to_send() == struct.pack(">BxH", 0, 2) + plan.pseudo[0] + body


def test_nothing_visible_is_no_plan_and_the_request_stays():
    conn = to_normal()
    conn.receive_data(fbur(1))
    assert conn.begin_update(800, 600, [(900, 700, 5, 5)]) is None
    assert conn.pending_request is rfb.Request.INCREMENTAL


def test_clients_sharing_a_format_share_one_snapshot_until_the_pass_ends():
    async def scenario():
        updates = Updates(convert_rect)
        surface = make_picture(320, 240)
        a, b = _waiting(enc.ZRLE), _waiting(enc.ZRLE)     # encoded in the workers
        sent: list[int] = []
        both = asyncio.Event()

        def done(result) -> None:
            sent.append(result)
            if len(sent) == 2:
                both.set()
        jobs = [updates.begin(c, enc.Encoder(), surface, [(0, 0, 320, 240)]) for c in (a, b)]
        assert np.shares_memory(jobs[0].pieces[0][0], jobs[1].pieces[0][0])   # one conversion, two users
        assert 320 * 240 > INLINE_PIXELS
        for job in jobs:
            updates.run(job, done, done)
        await asyncio.wait_for(both.wait(), 10)
        await _until_pooled(updates)
        updates.close()
        return sent, updates._pool
    sent, pool = asyncio.run(scenario())
    assert sent[0] == sent[1] > 0
    assert len(pool._free) == 1 and pool.allocations == 1   # the buffer went back once


def test_a_big_raw_update_is_queued_at_once_without_a_thread():
    """Raw is no work: even a full frame goes without the hand-off to an
    encoder thread, its bytes the snapshot's, in order."""
    async def scenario():
        updates = Updates(convert_rect)
        surface = make_picture(320, 240)
        conn = _waiting(enc.RAW)
        sent: list[int] = []
        job = updates.begin(conn, enc.Encoder(), surface, [(0, 0, 320, 240)])
        assert 320 * 240 > INLINE_PIXELS
        updates.run(job, sent.append, sent.append)
        assert sent == [4 + 12 + 320 * 240 * 4]            # done before run() returned
        assert updates._executor is None                    # no thread was started
        data = conn.data_to_send()
        updates.close()
        return data, surface
    data, surface = asyncio.run(scenario())
    assert data[:4] == struct.pack(">BxH", 0, 1)
    assert data[4:16] == struct.pack(">HHHHi", 0, 0, 320, 240, enc.RAW)
    assert data[16:] == surface.rows[:240, :320 * 4].tobytes()


def test_the_pool_keeps_its_buffer_while_updates_flow_and_lets_it_go_when_quiet():
    """A picture at rest keeps no frame-sized copy resident (PSS per domain
    in the lab's three-domain measure); while updates flow, one buffer
    serves them all."""
    async def scenario():
        quiet = 0.3
        updates = Updates(convert_rect, quiet_release=quiet)
        releases, released = [], asyncio.Event()
        _on_call(updates, "_release_buffers", releases, released)
        surface = make_picture(320, 240)
        loop = asyncio.get_running_loop()
        kept_while_flowing = []
        start = loop.time()
        for _ in range(4):
            conn = _waiting(enc.RAW)
            job = updates.begin(conn, enc.Encoder(), surface, [(0, 0, 320, 240)])
            updates.run(job, lambda n: None, lambda e: None)
            conn.data_to_send()                      # as the transport takes it
            await _until_pooled(updates)
            kept_while_flowing.append(len(updates._pool._free))
            # The time under test: updates a third of the quiet period apart.
            await asyncio.sleep(quiet / 3)
        flowed = loop.time() - start
        released_while_flowing = len(releases)
        await asyncio.wait_for(released.wait(), 10)
        pool = updates._pool
        updates.close()
        return kept_while_flowing, flowed, released_while_flowing, pool
    kept, flowed, released_while_flowing, pool = asyncio.run(scenario())
    assert flowed > 0.3 and kept == [1, 1, 1, 1]          # outlived one quiet period
    assert released_while_flowing == 0
    assert pool.allocations == 1                           # one buffer served all four
    assert pool._free == []                                 # then released


def test_quiet_releases_the_encoders_scratch_but_never_while_one_encodes():
    """The encoders' reused buffers (ZRLE's tile stream: 3 bytes a pixel)
    go too once quiet -- but not from under a job still in a worker."""
    import threading

    class Held(enc.Encoder):
        """An encoder whose next job waits in the worker until let go."""
        gate: threading.Event | None = None

        def encode_chunks(self, *args, **kw):
            if self.gate is not None:
                self.gate.wait(10)
            return super().encode_chunks(*args, **kw)

    async def scenario():
        quiet = 0.1
        updates = Updates(convert_rect, quiet_release=quiet)
        surface = make_picture(320, 240)
        encoder = Held()
        done = asyncio.Event()

        def finished(_):
            done.set()
        # One ZRLE job in a worker: the encoder's tile-stream buffer grows.
        conn = _waiting(enc.ZRLE)
        updates.run(updates.begin(conn, encoder, surface, [(0, 0, 320, 240)]), finished, finished)
        await asyncio.wait_for(done.wait(), 10)
        conn.data_to_send()
        grown = len(encoder._zrle_scratch)
        # A second job held in its worker while the quiet check runs twice.
        checks, checked_twice = [], asyncio.Event()
        _on_call(updates, "_quiet_check", checks, checked_twice, after=2)
        done.clear()
        encoder.gate = threading.Event()
        conn = _waiting(enc.ZRLE)
        updates.run(updates.begin(conn, encoder, surface, [(0, 0, 320, 240)]), finished, finished)
        await asyncio.wait_for(checked_twice.wait(), 10)
        kept_while_encoding = len(encoder._zrle_scratch)
        releases, released = [], asyncio.Event()
        _on_call(updates, "_release_buffers", releases, released)
        encoder.gate.set()
        await asyncio.wait_for(done.wait(), 10)
        await asyncio.wait_for(released.wait(), 10)
        released_len = len(encoder._zrle_scratch)
        updates.close()
        return grown, kept_while_encoding, released_len
    grown, kept, released = asyncio.run(scenario())
    band = max(w * h for _, _, w, h in enc.pieces(enc.ZRLE, 0, 0, 320, 240))   # the largest piece
    assert grown >= band * 3
    assert kept == grown and released == 0


def _holding_second_piece(gate: threading.Event, holding: threading.Event | None = None) -> type:
    """An Encoder class whose instances hold their second piece (in the
    encoder thread) until `gate` is set, setting `holding` once there;
    `calls` counts the pieces begun."""
    class Held(enc.Encoder):
        calls = 0

        def encode_chunks(self, *args, **kw):
            self.calls += 1
            if self.calls == 2:
                if holding is not None:
                    holding.set()
                gate.wait(10)
            return super().encode_chunks(*args, **kw)
    return Held


def test_a_big_update_goes_out_piece_by_piece_and_other_messages_wait_behind_it():
    """A frame is cut into bands (enc.pieces): the head, announcing every
    band, and the first band are on the connection while the encoder
    thread still holds the second -- on a slow link the transfer overlaps
    the encoding.  A Fence the client asks for meanwhile is answered after
    the update's last rectangle, never inside it.  The whole decodes."""
    from test_rfb_encodings import Decoder
    gate = threading.Event()
    Held = _holding_second_piece(gate)

    fence_request = struct.pack(">B3xIB", 248, (1 << 31) | 0x7, 0)
    fence_answer = struct.pack(">B3xIB", 248, 0x7, 0)

    async def scenario():
        updates = Updates(convert_rect)
        surface = make_picture(320, 240)
        conn = to_normal()
        conn.receive_data(set_encodings(enc.ZRLE, enc.FENCE) + fbur(0))
        conn.data_to_send()
        progressed, done = asyncio.Event(), asyncio.Event()
        job = updates.begin(conn, Held(), surface, [(0, 0, 320, 240)])
        pieces = len(job.pieces)
        updates.run(job, lambda nbytes: done.set(), lambda exc: done.set(), progressed.set)
        await asyncio.wait_for(progressed.wait(), 10)
        early = bytes(conn.data_to_send())
        conn.receive_data(fence_request)
        held_back = bytes(conn.data_to_send())
        gate.set()
        await asyncio.wait_for(done.wait(), 10)
        rest = bytes(conn.data_to_send())
        updates.close()
        return surface, pieces, early, held_back, rest

    surface, pieces, early, held_back, rest = asyncio.run(scenario())
    assert pieces >= 2 and len(early) >= STREAM_BATCH     # the first band alone fills a batch
    assert early[:4] == struct.pack(">BxH", 0, pieces)
    first = struct.unpack(">HHHHi", early[4:16])
    assert first[:2] == (0, 0) and first[2] == 320 and first[3] < 240 and first[4] == enc.ZRLE
    assert held_back == b""                      # the Fence answer waits behind the update
    assert rest.endswith(fence_answer) and fence_answer not in early + rest[:-len(fence_answer)]
    dec = Decoder(rfb.SERVER_FORMAT, 320, 240)
    dec.update((early + rest[:-len(fence_answer)])[4:], pieces)
    assert np.array_equal(dec.fb, surface.rows[:240, :320 * 4])


@pytest.mark.parametrize("batch", [STREAM_BATCH, 0])
def test_a_big_update_with_few_bytes_goes_out_whole_unless_the_client_is_far(batch):
    """A frame of many pieces whose bytes stay under STREAM_BATCH (a smooth
    picture in Tight: a few KB) is not streamed to a near client: while the
    encoder thread works nothing is on the connection, not even the head,
    and the whole update is queued at once -- one wake-up of the loop per
    update, not one per piece.  For a far one (batch 0) the head and the
    first piece are out while the encoder still holds the second.  Both
    decode."""
    from test_rfb_encodings import Decoder
    gate, holding = threading.Event(), threading.Event()
    Held = _holding_second_piece(gate, holding)

    y, x = np.mgrid[0:600, 0:800].astype(np.uint32)
    words = ((x * 255 // 799) << 16) | ((y * 255 // 599) << 8)
    rows = np.ascontiguousarray(words.astype("<u4").view(np.uint8).reshape(600, 3200))
    surface = make_picture(800, 600)
    surface.rows[:] = rows
    encoder = Held()

    async def scenario():
        updates = Updates(convert_rect)
        conn = _waiting(enc.TIGHT)
        progress, progressed, done = [], asyncio.Event(), asyncio.Event()

        def on_progress():
            progress.append(1)
            progressed.set()
        job = updates.begin(conn, encoder, surface, [(0, 0, 800, 600)])
        pieces = len(job.pieces)
        updates.run(job, lambda nbytes: done.set(), lambda exc: done.set(), on_progress, batch=batch)
        assert await asyncio.to_thread(holding.wait, 10)     # the encoder thread holds the second piece
        if batch == 0:          # the first piece's wake-up reaches the loop
            await asyncio.wait_for(progressed.wait(), 10)
        during = bytes(conn.data_to_send())
        gate.set()
        await asyncio.wait_for(done.wait(), 10)
        whole = during + bytes(conn.data_to_send())
        updates.close()
        return pieces, during, whole, progress

    pieces, during, whole, progress = asyncio.run(scenario())
    assert encoder.calls == pieces >= 2
    if batch:
        assert during == b"" and progress == []
    else:
        assert during[:4] == struct.pack(">BxH", 0, pieces) and len(during) > 4 + 12
        assert len(progress) >= 2                # the first piece, then the rest
    assert whole[:4] == struct.pack(">BxH", 0, pieces) and len(whole) < STREAM_BATCH
    dec = Decoder(rfb.SERVER_FORMAT, 800, 600)
    dec.update(whole[4:], pieces)
    rgb = np.s_[:, :, :3]           # Tight sends 3 bytes a pixel: the padding byte is the decoder's
    assert np.array_equal(dec.fb.reshape(600, 800, 4)[rgb], rows.reshape(600, 800, 4)[rgb])


def test_link_estimate_calls_a_client_far_when_it_takes_longer_than_we_make():
    """near until both times are known; far once the client's time from an
    update to its next request passes ours from a request to the update;
    near again as it comes back; smoothed: one slow sample among fast ones
    moves the estimate only part of the way."""
    link = LinkEstimate()
    assert not link.far and link.batch == STREAM_BATCH
    link.requested(0.0)                          # nothing queued yet: nothing to time
    assert link.take_s is None
    t = 0.0
    for _ in range(5):                           # we take 5 ms, the client 1 ms: near
        link.began(t)
        link.made(t + 0.005)
        t += 0.006
        link.requested(t)
    assert not link.far and link.take_s == pytest.approx(0.001)
    link.began(t)
    link.made(t + 0.005)                          # one 40 ms answer: 1 -> 10.75 ms
    t += 0.045
    link.requested(t)
    assert link.take_s == pytest.approx(0.01075) and link.far
    for _ in range(10):                          # a far client: 60 ms round trips
        link.began(t)
        link.made(t + 0.005)
        t += 0.065
        link.requested(t)
    assert link.far and link.batch == 0
    for _ in range(20):                          # back to near
        link.began(t)
        link.made(t + 0.005)
        t += 0.0055
        link.requested(t)
    assert not link.far
