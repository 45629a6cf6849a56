"""The receiving end of the host-to-device protocol: message order plus commands.

Wraps an :class:`Opener` (authentication, order) and applies the command kinds:
DATA lands where its header says; GO authorizes the SPEC messages that follow it and
says where they land; SPEC without a GO covering its index is refused; SKIP moves the
expected index forward (strict order only). In window order, where positions may come in
any order, request order is enforced instead: DATA and GO carry the number of the
request they serve (SPEC the number of its GO), and a number below one already taken is
refused, so a delayed transfer never lands over a later one. A transfer's messages are
staged and committed together once its last one authenticated. Any refusal closes the
channel.
"""

from __future__ import annotations

from typing import NamedTuple

from ..errors import IntegrityError
from .endpoint import Message, Opener
from .protocol import ABANDON, FIRST, GO_BODY, LAST, SKIP_BODY, Kind

#: every kind a host-to-device receiver takes
H2D_KINDS = frozenset({Kind.DATA, Kind.SPEC, Kind.GO, Kind.SKIP})


class Commit(NamedTuple):
    """Plaintext that authenticated, and where it goes."""

    buffer: int
    offset: int
    plaintext: memoryview
    index: int


class _Run(NamedTuple):
    buffer: int
    offset: int
    total: int
    order: int


class _Transfer:
    """The transfer being received: its messages staged until the last one authenticates."""

    __slots__ = ("order", "run", "buffer", "next", "waiting", "commits", "first")

    def __init__(self, order: int, first: int, run=None, buffer: int = 0, next: int = 0, waiting: int = 0):
        self.order, self.first, self.run = order, first, run
        self.buffer, self.next, self.waiting = buffer, next, waiting
        self.commits: list[Commit] = []

    def describe(self) -> str:
        return f"the transfer of request {self.order} (from message {self.first})"


class Receiver:
    """Host-to-device protocol state of one session, on the device side.

    :meth:`receive` returns what to commit only once a whole transfer has authenticated
    (see the protocol): the caller hands it a staging area per message that stays put
    until then (:attr:`receiving` says whether a transfer is open)."""

    def __init__(self, opener: Opener):
        self.opener = opener
        self._authorized: dict[int, _Run] = {}  # SPEC message index -> where it lands
        self._order = 0  # window order: the highest request number taken
        self._open: _Transfer | None = None
        self.abandoned = 0  # transfers the host gave up part-way, discarded uncommitted

    @property
    def receiving(self) -> _Transfer | None:
        """The transfer whose messages are staged, waiting for the rest, or None."""
        return self._open

    def discard(self) -> None:
        """Drop the open transfer uncommitted (the session failed or closed)."""
        self._open = None

    def flush(self) -> list[Commit]:
        """Commit what authenticated of the open transfer so far (a device whose staging
        cannot hold the whole transfer: see the cuda device); the rest follows as more."""
        t = self._open
        if t is None:
            return []
        done, t.commits = t.commits, []
        return done

    def receive(self, msg: Message, staging: memoryview) -> list[Commit]:
        """Authenticate one message; the commits of the transfer it completes, else []."""
        header, index, plain = self.opener.open_into(msg, staging)
        kind = header.kind
        t = self._open
        if kind == Kind.DATA:
            self._in_order(header.order, index)
            if header.flags & FIRST:
                self._replace(t, index, header.flags)
                t = self._open = _Transfer(header.order, index, buffer=header.buffer, next=header.offset)
            elif t is None or t.run is not None or (header.order, header.buffer, header.offset) != (
                    t.order, t.buffer, t.next):
                self._fail(f"message {index} does not continue the transfer in progress "
                           f"(a message before it was lost, reordered or forged)")
            t.commits.append(Commit(header.buffer, header.offset, plain, index))
            t.next += header.length
            return self._close_if(header.flags & LAST)
        if kind == Kind.SPEC:
            run = self._authorized.pop(index, None)
            if run is None or header.offset + header.length > run.total:
                self._fail(f"speculative message {index} arrived without a GO for it")
            self._in_order(run.order, index)
            if t is None or t.run is not run:
                self._fail(f"speculative message {index} arrived outside its GO's transfer")
            t.commits.append(Commit(run.buffer, run.offset + header.offset, plain, index))
            t.waiting -= 1
            return self._close_if(t.waiting == 0)
        self._replace(t, index, header.flags)
        if kind == Kind.GO:
            if header.length != GO_BODY.size:
                self._fail(f"GO command {index} is malformed")
            self._in_order(header.order, index)
            buffer, offset, count, total = GO_BODY.unpack(plain)
            run = _Run(buffer, offset, total, header.order)
            for i in range(index + 1, index + 1 + count):
                self._authorized[i] = run
            if count:
                self._open = _Transfer(header.order, index, run=run, waiting=count)
            self._expire()
            return []
        # SKIP: the opener accepted only H2D kinds, so this is the last one
        if header.length != SKIP_BODY.size:
            self._fail(f"SKIP command {index} is malformed")
        (target,) = SKIP_BODY.unpack(plain)
        self.opener.skip_to(target)
        self._expire()
        return []

    def _close_if(self, last) -> list[Commit]:
        if not last:
            return []
        t, self._open = self._open, None
        return t.commits

    def _replace(self, t: _Transfer | None, index: int, flags: int) -> None:
        """Message ``index`` begins a transfer or is a command while ``t`` is open: the
        host abandoned ``t`` (discard what was staged of it) or a message of it was lost."""
        if t is None:
            return
        if self.opener.window and not flags & ABANDON:
            self._fail(f"message {index} began before {t.describe()} had all its messages: "
                       f"a message of it never arrived")
        self._open = None  # strict order: every index before this one arrived, so the host sent no more of it
        self.abandoned += 1

    def _in_order(self, order: int, index: int) -> None:
        """Window order: refuse a message of an earlier request than one already taken."""
        if not self.opener.window:
            return  # strict order: positions already are request order
        if order < self._order:
            self._fail(f"message {index} serves request {order}, which arrived after request {self._order} "
                       f"(reordered or delayed)")
        self._order = order

    def _expire(self) -> None:
        """Forget authorizations of indices the opener can no longer accept."""
        if len(self._authorized) < 256:
            return
        opener = self.opener
        floor = opener.next_index - opener.window if opener.window else opener.next_index
        for index in [i for i in self._authorized if i < floor]:
            del self._authorized[index]

    def _fail(self, what: str):
        self._open = None
        error = IntegrityError(f"{self.opener.label} {what}; the channel is closed")
        self.opener.close(error)
        raise error
