"""Simulated xenstored: the real xs_wire protocol on unix sockets.

DIR/xenstored.sock serves dom0 (privileged).  After INTRODUCE of domain N,
DIR/dom<N>/xenstored.sock serves connections that act as domain N
(relative paths under /local/domain/N, permissions enforced).  The tree,
permissions, watches and transactions follow C xenstored's rules closely
enough for libxenstore (xenstore-utils), pyxs and our own client; the
differences are listed in docs/sim-xenstore.md.

Everything runs in the caller's event loop.  Each request is handled to the
end synchronously, so requests never interleave.  Every client is hostile:
malformed requests get an error reply, broken framing or a client that does
not read its output gets the connection closed, and nothing a client sends
can take down the daemon or another connection.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..platform.xenconst import DOMID_FIRST_RESERVED
from ..platform.xs_wire import (
    ABS_PATH_MAX, PAYLOAD_MAX, SPECIAL_WATCH_PATHS, InvalidPathError, Message,
    MessageDecoder, ProtocolError, XsType, error_name, is_at_or_below,
    join_strings, parse_perm, validate_path,
)

log = logging.getLogger(__name__)

READ, WRITE, OWNER = 1, 2, 4
_LETTER_ACCESS = {"n": 0, "r": READ, "w": WRITE, "b": READ | WRITE}
INTRODUCE_DOMAIN, RELEASE_DOMAIN = SPECIAL_WATCH_PATHS

Perms = tuple[tuple[str, int], ...]     # (letter, domid); the first entry is the owner
DEFAULT_PERMS: Perms = (("n", 0),)


@dataclass(frozen=True, slots=True)
class Limits:
    max_nodes_per_domain: int = 1000
    max_watches_per_connection: int = 128
    max_transactions_per_connection: int = 10
    max_pending_output: int = 256 * 1024    # bytes queued to a client that isn't reading


class Refused(Exception):
    """A request answered with an XS_ERROR; `reason` goes to the log."""

    def __init__(self, err: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = err
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Node:
    """One immutable node version; every change makes a new object."""
    value: bytes
    perms: Perms
    children: tuple[str, ...]
    gen: int

    @property
    def owner(self) -> int:
        return self.perms[0][1]


@dataclass(frozen=True, slots=True)
class Caller:
    domid: int
    privileged: bool


def access_for(caller: Caller, perms: Perms) -> int:
    """READ/WRITE/OWNER bits a caller has on a node, by xenstored's rules."""
    if caller.privileged or perms[0][1] == caller.domid:
        return READ | WRITE | OWNER
    for letter, domid in perms[1:]:
        if domid == caller.domid:
            return _LETTER_ACCESS[letter]
    return _LETTER_ACCESS[perms[0][0]]


def format_perms(perms: Perms) -> list[str]:
    return [f"{letter}{domid}" for letter, domid in perms]


def parent_of(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def basename(path: str) -> str:
    return path.rsplit("/", 1)[1]


def child_path(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


@dataclass(slots=True)
class Change:
    """A change that fires watches: `path` changed; `removed` holds a deleted subtree."""
    path: str
    perms: Perms
    removed: dict[str, Node] | None = None


class Tree:
    """A set of nodes with the operations on them.

    The live store is one Tree; each transaction works on its own copy of
    the node dict, remembering the first version of every node it touched
    (for the conflict check at commit) and which nodes it wrote.
    """

    def __init__(self, daemon: "XenStored", nodes: dict[str, Node], owner_counts: dict[int, int],
                 in_transaction: bool) -> None:
        self.daemon = daemon
        self.nodes = nodes
        self.owner_counts = owner_counts     # live counts (shared, read-only inside a transaction)
        self.in_transaction = in_transaction
        self.first_seen: dict[str, Node | None] = {}
        self.written: set[str] = set()
        self.count_delta: dict[int, int] = {}

    # -- raw access with bookkeeping --
    def get(self, path: str) -> Node | None:
        node = self.nodes.get(path)
        if self.in_transaction and path not in self.first_seen:
            self.first_seen[path] = node
        return node

    def put(self, path: str, node: Node | None) -> None:
        old = self.get(path)
        if old is not None:
            self._count(old.owner, -1)
        if node is None:
            self.nodes.pop(path, None)
        else:
            self.nodes[path] = node
            self._count(node.owner, +1)
        self.written.add(path)

    def _count(self, owner: int, delta: int) -> None:
        counts = self.count_delta if self.in_transaction else self.owner_counts
        counts[owner] = counts.get(owner, 0) + delta

    def nodes_owned(self, domid: int) -> int:
        return self.owner_counts.get(domid, 0) + (self.count_delta.get(domid, 0) if self.in_transaction else 0)

    # -- permission helpers --
    def require(self, caller: Caller, path: str, perm: int) -> Node:
        """The node at path if the caller has `perm` on it, else Refused.

        A missing node gives ENOENT only if the caller has `perm` on the
        nearest existing ancestor; otherwise EACCES, so that nothing leaks.
        """
        node = self.get(path)
        if node is None:
            raise Refused(self._errno_from_parents(caller, path, perm), f"{path} does not exist")
        if access_for(caller, node.perms) & perm != perm:
            raise Refused(errno.EACCES, f"no {_perm_name(perm)} permission on {path}")
        return node

    def _nearest_existing_ancestor(self, path: str) -> tuple[str, Node]:
        while path != "/":
            path = parent_of(path)
            node = self.get(path)
            if node is not None:
                return path, node
        raise AssertionError("root node missing")

    def _errno_from_parents(self, caller: Caller, path: str, perm: int) -> int:
        if path.startswith("@"):
            return errno.ENOENT
        _, ancestor = self._nearest_existing_ancestor(path)
        return errno.ENOENT if access_for(caller, ancestor.perms) & perm else errno.EACCES

    # -- operations --
    def read(self, caller: Caller, path: str) -> bytes:
        return self.require(caller, path, READ).value

    def write(self, caller: Caller, path: str, value: bytes, changes: list[Change]) -> None:
        node = self.get(path)
        if node is None:
            self._create(caller, path, value)
        else:
            node = self.require(caller, path, WRITE)
            self.put(path, replace(node, value=value, gen=self.daemon.next_gen()))
        changes.append(Change(path, self.nodes[path].perms))

    def mkdir(self, caller: Caller, path: str, changes: list[Change]) -> None:
        if self.get(path) is not None:
            self.require(caller, path, WRITE)
            return
        self._create(caller, path, b"")
        changes.append(Change(path, self.nodes[path].perms))

    def _create(self, caller: Caller, path: str, value: bytes) -> None:
        """Create path and any missing ancestors, inheriting the parent's permissions."""
        if self._errno_from_parents(caller, path, WRITE) == errno.EACCES:
            raise Refused(errno.EACCES, f"no write permission to create {path}")
        missing = [path]
        while self.get(parent_of(missing[-1])) is None:
            missing.append(parent_of(missing[-1]))
        if not caller.privileged:
            limit = self.daemon.limits.max_nodes_per_domain
            if self.nodes_owned(caller.domid) + len(missing) > limit:
                raise Refused(errno.ENOSPC, f"dom{caller.domid} would exceed {limit} nodes")
        for new_path in reversed(missing):
            parent_path = parent_of(new_path)
            parent = self.nodes[parent_path]
            perms = parent.perms
            if not caller.privileged:      # unprivileged domains own what they create
                perms = ((perms[0][0], caller.domid),) + perms[1:]
            gen = self.daemon.next_gen()
            self.put(parent_path, replace(parent, children=parent.children + (basename(new_path),), gen=gen))
            self.put(new_path, Node(value if new_path == path else b"", perms, (), gen))

    def rm(self, caller: Caller, path: str, changes: list[Change]) -> None:
        if path == "/":
            raise Refused(errno.EINVAL, "cannot remove the root")
        node = self.get(path)
        if node is None:
            # Removing a missing node is fine as long as its parent exists.
            if self.get(parent_of(path)) is not None:
                return
            raise Refused(self._errno_from_parents(caller, path, WRITE), f"{path} does not exist")
        self.require(caller, path, WRITE)
        removed: dict[str, Node] = {}
        stack = [path]
        while stack:
            current = stack.pop()
            current_node = self.get(current)
            if current_node is None:
                continue
            removed[current] = current_node
            stack.extend(child_path(current, name) for name in current_node.children)
            self.put(current, None)
        parent_path = parent_of(path)
        parent = self.get(parent_path)
        assert parent is not None
        name = basename(path)
        self.put(parent_path, replace(parent, children=tuple(c for c in parent.children if c != name),
                                      gen=self.daemon.next_gen()))
        changes.append(Change(path, node.perms, removed))

    def directory(self, caller: Caller, path: str) -> tuple[str, ...]:
        return self.require(caller, path, READ).children

    def get_perms(self, caller: Caller, path: str) -> Perms:
        return self.require(caller, path, READ).perms

    def set_perms(self, caller: Caller, path: str, perms: Perms, changes: list[Change]) -> None:
        node = self.require(caller, path, WRITE | OWNER)
        if not caller.privileged and perms[0][1] != node.owner:
            raise Refused(errno.EPERM, f"dom{caller.domid} may not change the owner of {path}")
        self.put(path, replace(node, perms=perms, gen=self.daemon.next_gen()))
        changes.append(Change(path, perms))


def _perm_name(perm: int) -> str:
    return "+".join(name for bit, name in ((READ, "read"), (WRITE, "write"), (OWNER, "owner")) if perm & bit)


@dataclass(slots=True)
class Transaction:
    tree: Tree
    changes: list[Change] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Watch:
    path: str           # absolute path or special @name
    token: bytes
    prefix: str | None  # domain path to strip from event paths (watch given as relative)


class Connection(asyncio.Protocol):
    """One client connection, acting as `caller`."""

    def __init__(self, daemon: "XenStored", caller: Caller) -> None:
        self.daemon = daemon
        self.caller = caller
        self.decoder = MessageDecoder()
        self.transport: asyncio.Transport | None = None
        self.watches: dict[tuple[str, bytes], Watch] = {}
        self.transactions: dict[int, Transaction] = {}
        self._next_tx_id = 1

    @property
    def name(self) -> str:
        return f"dom{self.caller.domid}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.daemon.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.daemon.connections.discard(self)
        self.watches.clear()
        self.transactions.clear()

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except ProtocolError as exc:
            self.drop(f"protocol violation: {exc}")
            return
        for msg in messages:
            if self.transport is None or self.transport.is_closing():
                return
            try:
                self.daemon.handle(self, msg)
            except Exception:           # a bug of ours: lose this client, keep the daemon
                log.exception("xenstored: internal error on %s request type %d", self.name, msg.type)
                self.drop("internal error")
                return

    def send(self, msg: Message) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(msg.encode())
        pending = self.transport.get_write_buffer_size()
        if pending > self.daemon.limits.max_pending_output:
            self.drop(f"{pending} bytes of unread output")

    def drop(self, reason: str) -> None:
        log.warning("xenstored: closing %s connection: %s", self.name, reason)
        if self.transport is not None:
            self.transport.abort()

    def new_tx_id(self) -> int:
        while True:
            tx_id = self._next_tx_id
            self._next_tx_id = 1 if tx_id >= 0xFFFFFFFF else tx_id + 1
            if tx_id not in self.transactions:
                return tx_id


@dataclass(slots=True)
class Domain:
    domid: int
    mfn: int
    port: int
    socket_path: str
    server_task: asyncio.Task | None = None
    listening: socket.socket | None = None


class XenStored:
    """The simulated daemon.  `await start()`, later `await close()`."""

    def __init__(self, run_dir: str, limits: Limits = Limits()) -> None:
        self.run_dir = run_dir
        self.socket_path = os.path.join(run_dir, "xenstored.sock")
        self.limits = limits
        self.connections: set[Connection] = set()
        self.domains: dict[int, Domain] = {}
        self._gen = 0
        self.nodes: dict[str, Node] = {}
        self.owner_counts: dict[int, int] = {}
        self._server: asyncio.AbstractServer | None = None
        self._build_initial_tree()

    # ---- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        _unlink_quietly(self.socket_path)
        self._server = await asyncio.get_running_loop().create_unix_server(
            lambda: Connection(self, Caller(0, privileged=True)), self.socket_path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for domain in list(self.domains.values()):
            self.stop_domain_server(domain)
        self.domains.clear()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        _unlink_quietly(self.socket_path)

    def _build_initial_tree(self) -> None:
        live = self.live_tree()
        gen = self.next_gen()
        live.put("/", Node(b"", DEFAULT_PERMS, (), gen))
        dom0 = Caller(0, privileged=True)
        for path in ("/tool/xenstored", "/local/domain/0"):
            live.mkdir(dom0, path, [])
        live.write(dom0, "/local/domain/0/name", b"Domain-0", [])
        live.write(dom0, "/local/domain/0/domid", b"0", [])
        for special in SPECIAL_WATCH_PATHS:
            live.put(special, Node(b"", DEFAULT_PERMS, (), gen))

    def next_gen(self) -> int:
        self._gen += 1
        return self._gen

    def live_tree(self) -> Tree:
        return Tree(self, self.nodes, self.owner_counts, in_transaction=False)

    # ---- request dispatch ------------------------------------------------

    def handle(self, conn: Connection, msg: Message) -> None:
        handler = _HANDLERS.get(msg.type)
        try:
            if handler is None:
                raise Refused(errno.ENOSYS, f"unknown message type {msg.type}")
            reply = handler(self, conn, msg)
        except Refused as exc:
            log.info("xenstored: %s %s refused (%s): %s", conn.name, _type_name(msg.type),
                     error_name(exc.errno), exc.reason)
            conn.send(Message(XsType.ERROR, msg.req_id, msg.tx_id, join_strings(error_name(exc.errno))))
            return
        if reply is not None:
            conn.send(Message(msg.type, msg.req_id, msg.tx_id, reply))

    def tree_for(self, conn: Connection, msg: Message) -> tuple[Tree, list[Change]]:
        """The tree a request works on and where its changes go."""
        if msg.tx_id == 0:
            return self.live_tree(), []
        tx = conn.transactions.get(msg.tx_id)
        if tx is None:
            raise Refused(errno.ENOENT, f"no transaction {msg.tx_id}")
        return tx.tree, tx.changes

    def resolve(self, conn: Connection, raw: bytes, *, allow_special: bool = False) -> str:
        """Validate a path argument and make it absolute for this connection."""
        try:
            path = validate_path(raw, allow_special=allow_special)
        except InvalidPathError as exc:
            raise Refused(errno.EINVAL, str(exc)) from None
        if path.startswith("/") or path.startswith("@"):
            return path
        path = f"{domain_path(conn.caller.domid)}/{path}"
        if len(path) > ABS_PATH_MAX:
            raise Refused(errno.EINVAL, f"path of {len(path)} bytes exceeds {ABS_PATH_MAX}")
        return path

    # ---- watches ---------------------------------------------------------

    def fire(self, changes: list[Change]) -> None:
        for change in changes:
            for conn in list(self.connections):
                for watch in list(conn.watches.values()):
                    event = _event_for(watch, change, conn.caller)
                    if event is not None:
                        self.send_event(conn, watch, event)

    def fire_special(self, name: str) -> None:
        special = self.nodes[name]
        for conn in list(self.connections):
            if not access_for(conn.caller, special.perms) & READ:
                continue
            for watch in list(conn.watches.values()):
                if watch.path == name:
                    self.send_event(conn, watch, name)

    def send_event(self, conn: Connection, watch: Watch, path: str) -> None:
        if watch.prefix is not None and path.startswith(watch.prefix + "/"):
            path = path[len(watch.prefix) + 1:]
        payload = join_strings(path, watch.token)
        if len(payload) > PAYLOAD_MAX:
            log.warning("xenstored: %s watch event for %s too big, dropped", conn.name, path[:64])
            return
        conn.send(Message(XsType.WATCH_EVENT, 0, 0, payload))

    # ---- domains ---------------------------------------------------------

    def start_domain_server(self, domain: Domain) -> None:
        """Bind and listen now (so the socket exists when INTRODUCE answers OK)."""
        os.makedirs(os.path.dirname(domain.socket_path), exist_ok=True)
        _unlink_quietly(domain.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(domain.socket_path)
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        domain.listening = sock
        caller = Caller(domain.domid, privileged=False)
        loop = asyncio.get_running_loop()
        domain.server_task = loop.create_task(
            loop.create_unix_server(lambda: Connection(self, caller), sock=sock))

    def stop_domain_server(self, domain: Domain) -> None:
        task = domain.server_task
        if task is not None:
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().close()
            else:
                task.cancel()
                if domain.listening is not None:
                    domain.listening.close()
        for conn in list(self.connections):
            if conn.caller.domid == domain.domid and not conn.caller.privileged and conn.transport is not None:
                conn.transport.abort()
        _unlink_quietly(domain.socket_path)


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _type_name(msg_type: int) -> str:
    try:
        return XsType(msg_type).name
    except ValueError:
        return f"type {msg_type}"


def _event_for(watch: Watch, change: Change, caller: Caller) -> str | None:
    """The event path a watch sees for a change, or None (not its business / no read access)."""
    if watch.path.startswith("@"):
        return None
    if is_at_or_below(change.path, watch.path):
        path, perms = change.path, change.perms
    elif change.removed is not None and is_at_or_below(watch.path, change.path):
        removed = change.removed.get(watch.path)
        path, perms = watch.path, removed.perms if removed is not None else change.perms
    else:
        return None
    if not access_for(caller, perms) & READ:
        return None
    return path


# ---- argument parsing ----------------------------------------------------

def _strings(msg: Message, count: int | None = None) -> list[bytes]:
    """NUL-terminated string arguments; EINVAL if unterminated or the count is wrong."""
    if not msg.payload.endswith(b"\0"):
        raise Refused(errno.EINVAL, "arguments not NUL-terminated")
    parts = msg.payload[:-1].split(b"\0")
    if count is not None and len(parts) != count:
        raise Refused(errno.EINVAL, f"expected {count} arguments, got {len(parts)}")
    return parts


def _int_arg(raw: bytes, what: str, maximum: int = 0xFFFFFFFF) -> int:
    if not raw.isdigit() or len(raw) > 20 or int(raw) > maximum:
        raise Refused(errno.EINVAL, f"bad {what} {raw[:24]!r}")
    return int(raw)


def _domid_arg(raw: bytes) -> int:
    return _int_arg(raw, "domid", 0xFFFF)


def _require_privileged(conn: Connection, what: str) -> None:
    if not conn.caller.privileged:
        raise Refused(errno.EACCES, f"{what} needs a privileged connection")


OK = b"OK\0"


# ---- handlers: return the reply payload, or None if they replied themselves ----

def _op_read(d: XenStored, conn: Connection, msg: Message) -> bytes:
    (raw,) = _strings(msg, 1)
    tree, _ = d.tree_for(conn, msg)
    return tree.read(conn.caller, d.resolve(conn, raw))


def _op_write(d: XenStored, conn: Connection, msg: Message) -> bytes:
    raw, sep, value = msg.payload.partition(b"\0")
    if not sep:
        raise Refused(errno.EINVAL, "WRITE without a NUL after the path")
    path = d.resolve(conn, raw)
    tree, changes = d.tree_for(conn, msg)
    tree.write(conn.caller, path, value, changes)
    return _commit_or_queue(d, msg, changes)


def _op_mkdir(d: XenStored, conn: Connection, msg: Message) -> bytes:
    (raw,) = _strings(msg, 1)
    path = d.resolve(conn, raw)
    tree, changes = d.tree_for(conn, msg)
    tree.mkdir(conn.caller, path, changes)
    return _commit_or_queue(d, msg, changes)


def _op_rm(d: XenStored, conn: Connection, msg: Message) -> bytes:
    (raw,) = _strings(msg, 1)
    path = d.resolve(conn, raw)
    tree, changes = d.tree_for(conn, msg)
    tree.rm(conn.caller, path, changes)
    return _commit_or_queue(d, msg, changes)


def _commit_or_queue(d: XenStored, msg: Message, changes: list[Change]) -> bytes:
    # Outside a transaction the changes fire now (the client may see its
    # event before the OK, as with xenstored); inside, they wait for commit.
    if msg.tx_id == 0:
        d.fire(changes)
    return OK


def _op_directory(d: XenStored, conn: Connection, msg: Message) -> bytes:
    (raw,) = _strings(msg, 1)
    tree, _ = d.tree_for(conn, msg)
    children = tree.directory(conn.caller, d.resolve(conn, raw))
    payload = join_strings(*children)
    if len(payload) > PAYLOAD_MAX:
        raise Refused(errno.E2BIG, f"{len(children)} children do not fit one reply")
    return payload


def _op_directory_part(d: XenStored, conn: Connection, msg: Message) -> bytes:
    raw, raw_offset = _strings(msg, 2)
    offset = _int_arg(raw_offset, "offset")
    tree, _ = d.tree_for(conn, msg)
    path = d.resolve(conn, raw)
    node = tree.require(conn.caller, path, READ)
    listing = join_strings(*node.children)
    gen = join_strings(str(node.gen))
    if offset >= len(listing):
        return gen + b"\0"
    room = PAYLOAD_MAX - len(gen) - 1
    end = offset
    while end < len(listing):
        name_end = listing.index(b"\0", end) + 1
        if name_end - offset > room:
            break
        end = name_end
    if end == offset:       # cannot happen with valid names; never loop a client forever
        raise Refused(errno.E2BIG, f"child name at offset {offset} does not fit a reply")
    chunk = listing[offset:end]
    return gen + chunk + (b"\0" if end == len(listing) else b"")


def _op_get_perms(d: XenStored, conn: Connection, msg: Message) -> bytes:
    (raw,) = _strings(msg, 1)
    tree, _ = d.tree_for(conn, msg)
    return join_strings(*format_perms(tree.get_perms(conn.caller, d.resolve(conn, raw, allow_special=True))))


def _op_set_perms(d: XenStored, conn: Connection, msg: Message) -> bytes:
    raw, *raw_perms = _strings(msg)
    if not raw_perms:
        raise Refused(errno.EINVAL, "SET_PERMS without permissions")
    try:
        perms: Perms = tuple(parse_perm(p) for p in raw_perms)
    except ValueError as exc:
        raise Refused(errno.EINVAL, str(exc)) from None
    path = d.resolve(conn, raw, allow_special=True)
    tree, changes = d.tree_for(conn, msg)
    tree.set_perms(conn.caller, path, perms, changes)
    if path.startswith("@"):
        return OK
    return _commit_or_queue(d, msg, changes)


def _op_watch(d: XenStored, conn: Connection, msg: Message) -> None:
    raw, token = _strings(msg, 2)
    path = d.resolve(conn, raw, allow_special=True)
    key = (path, token)
    if key in conn.watches:
        raise Refused(errno.EEXIST, f"already watching {path}")
    if len(conn.watches) >= d.limits.max_watches_per_connection:
        raise Refused(errno.E2BIG, f"more than {d.limits.max_watches_per_connection} watches")
    relative = not raw.startswith(b"/") and not raw.startswith(b"@")
    watch = Watch(path, token, domain_path(conn.caller.domid) if relative else None)
    conn.watches[key] = watch
    conn.send(Message(XsType.WATCH, msg.req_id, msg.tx_id, OK))
    d.send_event(conn, watch, path)       # the initial event, right after the OK


def _op_unwatch(d: XenStored, conn: Connection, msg: Message) -> bytes:
    raw, token = _strings(msg, 2)
    path = d.resolve(conn, raw, allow_special=True)
    if conn.watches.pop((path, token), None) is None:
        raise Refused(errno.ENOENT, f"no watch on {path}")
    return OK


def _op_reset_watches(d: XenStored, conn: Connection, msg: Message) -> bytes:
    conn.watches.clear()
    conn.transactions.clear()
    return OK


def _op_transaction_start(d: XenStored, conn: Connection, msg: Message) -> bytes:
    if msg.tx_id != 0:
        raise Refused(errno.EBUSY, "nested transaction")
    if len(conn.transactions) >= d.limits.max_transactions_per_connection:
        raise Refused(errno.ENOSPC, f"more than {d.limits.max_transactions_per_connection} transactions")
    tree = Tree(d, dict(d.nodes), d.owner_counts, in_transaction=True)
    tx_id = conn.new_tx_id()
    conn.transactions[tx_id] = Transaction(tree)
    return join_strings(str(tx_id))


def _op_transaction_end(d: XenStored, conn: Connection, msg: Message) -> bytes:
    (flag,) = _strings(msg, 1)
    if flag not in (b"T", b"F"):
        raise Refused(errno.EINVAL, f"TRANSACTION_END argument {flag[:8]!r}")
    tx = conn.transactions.pop(msg.tx_id, None)
    if tx is None:
        raise Refused(errno.ENOENT, f"no transaction {msg.tx_id}")
    if flag == b"T":
        _commit(d, conn, tx)
    return OK


def _commit(d: XenStored, conn: Connection, tx: Transaction) -> None:
    tree = tx.tree
    for path, seen in tree.first_seen.items():
        if d.nodes.get(path) is not seen:
            raise Refused(errno.EAGAIN, f"{path} changed since the transaction started")
    if not conn.caller.privileged:
        owned = d.owner_counts.get(conn.caller.domid, 0) + tree.count_delta.get(conn.caller.domid, 0)
        if owned > d.limits.max_nodes_per_domain:
            raise Refused(errno.ENOSPC, f"dom{conn.caller.domid} would exceed its node quota")
    gen = d.next_gen()
    for path in tree.written:
        node = tree.nodes.get(path)
        if node is None:
            d.nodes.pop(path, None)
        else:
            d.nodes[path] = replace(node, gen=gen)
    for owner, delta in tree.count_delta.items():
        d.owner_counts[owner] = d.owner_counts.get(owner, 0) + delta
    d.fire(tx.changes)


def _op_introduce(d: XenStored, conn: Connection, msg: Message) -> bytes:
    _require_privileged(conn, "INTRODUCE")
    raw_domid, raw_mfn, raw_port = _strings(msg, 3)
    domid = _domid_arg(raw_domid)
    mfn = _int_arg(raw_mfn, "mfn", 2**64 - 1)
    port = _int_arg(raw_port, "event channel")
    if domid == 0 or domid >= DOMID_FIRST_RESERVED:
        raise Refused(errno.EINVAL, f"cannot introduce domain {domid}")
    if domid in d.domains:
        return OK           # re-introduction (as after resume): nothing new to announce
    domain = Domain(domid, mfn, port, os.path.join(d.run_dir, f"dom{domid}", "xenstored.sock"))
    try:
        d.start_domain_server(domain)
    except OSError as exc:
        raise Refused(errno.EIO, f"cannot listen on {domain.socket_path}: {exc}") from None
    d.domains[domid] = domain
    d.fire_special(INTRODUCE_DOMAIN)
    return OK


def _op_release(d: XenStored, conn: Connection, msg: Message) -> bytes:
    _require_privileged(conn, "RELEASE")
    (raw_domid,) = _strings(msg, 1)
    domid = _domid_arg(raw_domid)
    if domid == 0:
        raise Refused(errno.EINVAL, "cannot release domain 0")
    domain = d.domains.pop(domid, None)
    if domain is None:
        raise Refused(errno.ENOENT, f"domain {domid} not introduced")
    d.stop_domain_server(domain)
    d.fire_special(RELEASE_DOMAIN)
    return OK


def _op_is_domain_introduced(d: XenStored, conn: Connection, msg: Message) -> bytes:
    (raw_domid,) = _strings(msg, 1)
    domid = _domid_arg(raw_domid)
    return b"T\0" if domid == 0 or domid in d.domains else b"F\0"


def _op_get_domain_path(d: XenStored, conn: Connection, msg: Message) -> bytes:
    (raw_domid,) = _strings(msg, 1)
    return join_strings(domain_path(_domid_arg(raw_domid)))


def _op_resume(d: XenStored, conn: Connection, msg: Message) -> bytes:
    _require_privileged(conn, "RESUME")
    (raw_domid,) = _strings(msg, 1)
    if _domid_arg(raw_domid) not in d.domains:
        raise Refused(errno.ENOENT, "domain not introduced")
    return OK


def _op_set_target(d: XenStored, conn: Connection, msg: Message) -> bytes:
    _require_privileged(conn, "SET_TARGET")
    raw_domid, raw_target = _strings(msg, 2)
    _domid_arg(raw_domid)
    _domid_arg(raw_target)
    return OK


_CONTROL_HELP = b"Supported commands:\nhelp\nprint <text>\n"


def _op_control(d: XenStored, conn: Connection, msg: Message) -> bytes:
    _require_privileged(conn, "CONTROL")
    command, *args = _strings(msg)
    if command == b"help":
        return _CONTROL_HELP + b"\0"
    if command == b"print":
        log.info("xenstored: control print: %s", b" ".join(args).decode("ascii", "replace")[:200])
        return OK
    raise Refused(errno.EINVAL, f"unknown control command {command[:32]!r}")


_HANDLERS: dict[int, Callable[[XenStored, Connection, Message], bytes | None]] = {
    XsType.CONTROL: _op_control,
    XsType.DIRECTORY: _op_directory,
    XsType.READ: _op_read,
    XsType.GET_PERMS: _op_get_perms,
    XsType.WATCH: _op_watch,
    XsType.UNWATCH: _op_unwatch,
    XsType.TRANSACTION_START: _op_transaction_start,
    XsType.TRANSACTION_END: _op_transaction_end,
    XsType.INTRODUCE: _op_introduce,
    XsType.RELEASE: _op_release,
    XsType.GET_DOMAIN_PATH: _op_get_domain_path,
    XsType.WRITE: _op_write,
    XsType.MKDIR: _op_mkdir,
    XsType.RM: _op_rm,
    XsType.SET_PERMS: _op_set_perms,
    XsType.IS_DOMAIN_INTRODUCED: _op_is_domain_introduced,
    XsType.RESUME: _op_resume,
    XsType.SET_TARGET: _op_set_target,
    XsType.RESET_WATCHES: _op_reset_watches,
    XsType.DIRECTORY_PART: _op_directory_part,
}
