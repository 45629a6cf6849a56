"""The receiving end of the host-to-device protocol: message order plus commands.

Wraps an :class:`Opener` (authentication, order) and applies the command kinds:
DATA lands where its header says; GO authorizes the SPEC messages that follow it and
says where they land; SPEC without a GO covering its index is refused; SKIP moves the
expected index forward (strict order only). In window order, where positions may come in
any order, request order is enforced instead: DATA and GO carry the number of the
request they serve (SPEC the number of its GO), and a number below one already taken is
refused, so a delayed transfer never lands over a later one. Any refusal closes the
channel.
"""

from __future__ import annotations

from typing import NamedTuple

from ..errors import IntegrityError
from .endpoint import Message, Opener
from .protocol import GO_BODY, SKIP_BODY, Kind

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


class Receiver:
    """Host-to-device protocol state of one session, on the device side."""

    def __init__(self, opener: Opener):
        self.opener = opener
        self._authorized: dict[int, _Run] = {}  # SPEC message index -> where it lands
        self._order = 0  # window order: the highest request number taken

    def receive(self, msg: Message, staging: memoryview) -> Commit | None:
        """Authenticate one message; what to commit, or None for a command."""
        header, index, plain = self.opener.open_into(msg, staging)
        kind = header.kind
        if kind == Kind.DATA:
            self._in_order(header.order, index)
            return Commit(header.buffer, header.offset, plain, index)
        if kind == Kind.SPEC:
            run = self._authorized.pop(index, None)
            if run is None or header.offset + header.length > run.total:
                self._fail(f"speculative message {index} arrived without a GO for it")
            self._in_order(run.order, index)
            return Commit(run.buffer, run.offset + header.offset, plain, index)
        if kind == Kind.GO:
            if header.length != GO_BODY.size:
                self._fail(f"GO command {index} is malformed")
            self._in_order(header.order, index)
            buffer, offset, count, total = GO_BODY.unpack(plain)
            run = _Run(buffer, offset, total, header.order)
            for i in range(index + 1, index + 1 + count):
                self._authorized[i] = run
            self._expire()
            return None
        # SKIP: the opener accepted only H2D kinds, so this is the last one
        if header.length != SKIP_BODY.size:
            self._fail(f"SKIP command {index} is malformed")
        (target,) = SKIP_BODY.unpack(plain)
        self.opener.skip_to(target)
        self._expire()
        return None

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
        error = IntegrityError(f"{self.opener.label} {what}; the channel is closed")
        self.opener.close(error)
        raise error
