"""The receiving end of the host-to-device protocol: message order plus commands.

Wraps an :class:`Opener` (authentication, order) and applies the command kinds:
DATA lands where its header says; GO authorizes the SPEC messages that follow it and
says where they land; SPEC without a GO covering its index is refused; SKIP moves the
expected index forward (strict order only). Any refusal closes the channel.
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


class Receiver:
    """Host-to-device protocol state of one session, on the device side."""

    def __init__(self, opener: Opener):
        self.opener = opener
        self._authorized: dict[int, _Run] = {}  # SPEC message index -> where it lands

    def receive(self, msg: Message, staging: memoryview) -> Commit | None:
        """Authenticate one message; what to commit, or None for a command."""
        header, index, plain = self.opener.open_into(msg, staging)
        kind = header.kind
        if kind == Kind.DATA:
            return Commit(header.buffer, header.offset, plain, index)
        if kind == Kind.SPEC:
            run = self._authorized.pop(index, None)
            if run is None or header.offset + header.length > run.total:
                self._fail(f"speculative message {index} arrived without a GO for it")
            return Commit(run.buffer, run.offset + header.offset, plain, index)
        if kind == Kind.GO:
            if header.length != GO_BODY.size:
                self._fail(f"GO command {index} is malformed")
            buffer, offset, count, total = GO_BODY.unpack(plain)
            run = _Run(buffer, offset, total)
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
