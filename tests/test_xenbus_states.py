"""The backends' XenBus state machine (xenfb.BACKEND_TRANSITIONS), against a
frontend that writes any state sequence, on an in-memory XenStore."""
import asyncio
import logging

import pytest
from hypothesis import given, settings, strategies as st

from pyxenfb.devices import xenfb_abi as abi
from pyxenfb.xenfb import (BACKEND_TRANSITIONS, BackendContext, BackendDevice, DeviceError,
                           XenBusStateError)

DOMID = 5
FE = f"/local/domain/{DOMID}/device/vfb/0"
BE = f"/local/domain/0/backend/vfb/{DOMID}/0"


class MemoryXenStore:
    """The few XenStore calls the state machine makes, on a dict."""

    def __init__(self):
        self.nodes: dict[str, str] = {}
        self.closed = asyncio.get_running_loop().create_future()

    async def read_str(self, path, default=None):
        return self.nodes.get(path, default)

    async def read_int(self, path, default=None):
        try:
            return int(self.nodes[path])
        except (KeyError, ValueError):
            return default

    async def write(self, path, value):
        self.nodes[path] = str(value)

    async def watch(self, path, token, callback):
        pass


class Device(BackendDevice):
    """No shared page: connect succeeds or fails as the test says."""
    devtype = "vfb"

    def __init__(self, ctx, fail_connect=False):
        super().__init__(ctx, DOMID)
        self.fail_connect = fail_connect
        self.connects = 0
        self.moves: list[tuple[int, int]] = []

    async def _set_state(self, state):
        before = self.be_state
        await super()._set_state(state)
        if state != before:
            self.moves.append((before, state))

    async def connect(self):
        if self.fail_connect:
            raise DeviceError("refused by the test")
        self.connects += 1


async def make_device(**kw) -> tuple[MemoryXenStore, Device]:
    xs = MemoryXenStore()
    xs.nodes.update({f"{BE}/frontend": FE, f"{BE}/online": "1", f"{FE}/state": "1"})
    dev = Device(BackendContext(xs, None, None, None), **kw)
    await dev._evaluate()
    return xs, dev


async def frontend_goes(xs, dev, state) -> None:
    xs.nodes[f"{FE}/state"] = str(state)
    await dev._evaluate()


def test_table_covers_every_state_and_closing_from_anywhere_open():
    # Initialised is a frontend-only state.
    assert set(BACKEND_TRANSITIONS) == set(range(abi.CLOSED + 1)) - {abi.INITIALISED}
    for state in (abi.UNKNOWN, abi.INITIALISING, abi.INIT_WAIT, abi.CONNECTED):
        assert {abi.CLOSING, abi.CLOSED} <= BACKEND_TRANSITIONS[state]


def test_normal_connect_close_and_reconnect():
    async def body():
        xs, dev = await make_device()
        assert dev.be_state == abi.INIT_WAIT
        await frontend_goes(xs, dev, abi.INITIALISED)
        assert dev.be_state == abi.CONNECTED and dev.connected
        await frontend_goes(xs, dev, abi.CONNECTED)
        await frontend_goes(xs, dev, abi.CLOSING)
        assert dev.be_state == abi.CLOSING and not dev.connected
        await frontend_goes(xs, dev, abi.CLOSED)
        assert dev.be_state == abi.CLOSED
        await frontend_goes(xs, dev, abi.INITIALISING)
        assert dev.be_state == abi.INIT_WAIT
        await frontend_goes(xs, dev, abi.INITIALISED)
        assert dev.be_state == abi.CONNECTED and dev.connects == 2
    asyncio.run(body())


def test_illegal_frontend_states_are_ignored():
    """States that are no XenBus state for a frontend here (Reconfiguring,
    garbage, negative) neither connect nor close the device, as before."""
    async def body():
        xs, dev = await make_device()
        for state in (7, 8, 99, -1, "junk", abi.INIT_WAIT):
            await frontend_goes(xs, dev, state)
            assert dev.be_state == abi.INIT_WAIT and not dev.connected
        await frontend_goes(xs, dev, abi.CONNECTED)       # Initialised skipped: accepted
        assert dev.be_state == abi.CONNECTED and dev.connected
        for state in (7, 99, abi.INIT_WAIT):
            await frontend_goes(xs, dev, state)
            assert dev.be_state == abi.CONNECTED and dev.connected
    asyncio.run(body())


def test_refused_connect_leaves_init_wait_logged(caplog):
    async def body():
        xs, dev = await make_device(fail_connect=True)
        with caplog.at_level(logging.WARNING, "pyxenfb.xenfb"):
            await frontend_goes(xs, dev, abi.INITIALISED)
        assert dev.be_state == abi.INIT_WAIT and not dev.connected
        assert "cannot connect: refused by the test" in caplog.text
        assert xs.nodes[f"{BE}/state"] == str(abi.INIT_WAIT)
    asyncio.run(body())


def test_set_state_enforces_the_table():
    async def body():
        xs, dev = await make_device()
        with pytest.raises(XenBusStateError, match="InitWait -> Initialising"):
            await dev._set_state(abi.INITIALISING)
        assert dev.be_state == abi.INIT_WAIT and xs.nodes[f"{BE}/state"] == str(abi.INIT_WAIT)
        await dev._set_state(abi.INIT_WAIT)      # written again: always allowed
    asyncio.run(body())


frontend_state = st.one_of(st.integers(0, 8), st.sampled_from([99, -1, "x", ""]))


@settings(max_examples=300, deadline=None)
@given(states=st.lists(frontend_state, max_size=25), fail=st.booleans(),
       offline_first=st.booleans())
def test_any_frontend_sequence_stays_inside_the_table(states, fail, offline_first):
    """Whatever the frontend writes, every backend move is one the table
    allows (a XenBusStateError would surface here), and the backend ends
    connected only with a Connected/Initialised frontend."""
    async def body():
        xs = MemoryXenStore()
        xs.nodes.update({f"{BE}/frontend": FE, f"{BE}/online": "0" if offline_first else "1",
                         f"{FE}/state": "1"})
        dev = Device(BackendContext(xs, None, None, None), fail_connect=fail)
        await dev._evaluate()
        xs.nodes[f"{BE}/online"] = "1"
        for state in states:
            await frontend_goes(xs, dev, state)
            if dev.connected:
                assert dev.be_state == abi.CONNECTED
                assert xs.nodes[f"{FE}/state"] not in ("5", "6")
        for before, after in dev.moves:
            assert after in BACKEND_TRANSITIONS[before]
        assert xs.nodes[f"{BE}/state"] == str(dev.be_state)
    asyncio.run(body())
