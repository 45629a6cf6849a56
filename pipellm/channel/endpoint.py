"""Channel endpoints: a :class:`Sealer` per sending direction, an :class:`Opener` per
receiving one, and the :class:`Message` that crosses the untrusted link between them.

The host seals host-to-device messages and opens device-to-host ones; the device does
the mirror image, with the same classes.
"""

from __future__ import annotations

import threading
from time import perf_counter
from typing import Callable, NamedTuple

from ..errors import ArgumentError, ChannelClosedError, IntegrityError
from .cipher import open_into, seal_into
from .keys import EpochKey, SessionKeys
from .protocol import (
    MAX_MESSAGE_BYTES,
    TAG_BYTES,
    Direction,
    iv_for,
    next_position,
    pack_header,
    rewrite_destination,
    unpack_header,
)

#: Called as ``observer(msg, key_id, epoch, counter)`` whenever ciphertext is written into
#: shared (attacker-visible) memory; :class:`pipellm.testing.IVLedger` uses it.
shared_write_observers: list[Callable[[Message, bytes, int, int], None]] = []


class Destination(NamedTuple):
    """Where a message says its plaintext goes: a device buffer id (h2d) or a host
    region id (d2h), a byte offset and a length."""

    buffer: int
    offset: int
    length: int


class Message:
    """One message as it sits in shared memory / crosses the link.

    ``direction`` is ``"h2d"`` or ``"d2h"``; ``iv`` the 12 IV bytes the sender used;
    ``aad`` the header (writable ``bytearray``); ``payload`` a writable memoryview of
    ciphertext + tag; ``dst`` the destination parsed from the header (settable, which
    rewrites the header). An adversary may change any of them; the receiver refuses.
    """

    __slots__ = ("direction", "iv", "aad", "payload", "_owner")

    def __init__(self, direction: str, iv: bytes, aad: bytearray, payload: memoryview, owner=None):
        self.direction = direction
        self.iv = iv
        self.aad = aad
        self.payload = payload
        self._owner = owner  # the host's bookkeeping of which transfer this is; not on the wire

    @property
    def dst(self) -> Destination:
        header = unpack_header(self.aad)
        if header is None:
            raise ValueError("message header is malformed")
        return Destination(header.buffer, header.offset, header.length)

    @dst.setter
    def dst(self, value) -> None:
        buffer, offset, length = value
        rewrite_destination(self.aad, int(getattr(buffer, "id", buffer)), int(offset), int(length))

    def copy(self) -> Message:
        """A snapshot that owns its bytes (for an adversary that holds messages back)."""
        return Message(self.direction, bytes(self.iv), bytearray(self.aad),
                       memoryview(bytearray(self.payload)), self._owner)

    def __repr__(self) -> str:
        try:
            where = tuple(self.dst)
        except ValueError:
            where = "?"
        return f"<Message {self.direction} dst={where} payload={len(self.payload)}B>"


def publish(msg: Message, key_id: bytes, epoch: int, counter: int) -> None:
    """Record that ``msg``'s ciphertext now sits in shared memory (for observers)."""
    for observer in shared_write_observers:
        observer(msg, key_id, epoch, counter)


class Ticket:
    """A reserved (epoch, counter): the IV one message will carry. Sealed at most once."""

    __slots__ = ("epoch", "counter", "key", "used")

    def __init__(self, epoch: int, counter: int, key: EpochKey):
        self.epoch, self.counter, self.key, self.used = epoch, counter, key, False

    def __repr__(self) -> str:
        return f"<Ticket epoch={self.epoch} counter={self.counter}{' used' if self.used else ''}>"


class _Endpoint:
    def __init__(self, keys: SessionKeys, direction: Direction, rotate_after: int):
        self._keys = keys
        self.direction = Direction(direction)
        self.label = self.direction.label
        self.session = keys.session
        self.rotate_after = rotate_after
        self._epoch, self._counter = 0, 0
        self._key = keys.epoch_key(self.direction, 0)
        self.rotations = 0
        self.messages = 0
        self.aes_s = 0.0  # time spent inside the AES-GCM calls
        self.failure: BaseException | None = None
        self._lock = threading.Lock()

    def _advance(self) -> None:
        epoch, self._counter = next_position(self._epoch, self._counter, self.rotate_after)
        if epoch != self._epoch:
            self._epoch = epoch
            self._key = self._keys.epoch_key(self.direction, epoch)
            self.rotations += 1

    def close(self, reason: BaseException) -> None:
        if self.failure is None:
            self.failure = reason

    def _check_open(self) -> None:
        if self.failure is not None:
            raise ChannelClosedError(f"{self.label} channel is closed: {self.failure}") from self.failure

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, counter) of the next message."""
        return self._epoch, self._counter


class Sealer(_Endpoint):
    """Encrypts one direction's messages, handing out each IV exactly once.

    ``reserve()`` assigns the next (epoch, counter) in order; ``seal_into`` encrypts one
    plaintext under a reserved ticket straight into ``out`` (a bounce slot). Tickets may
    be sealed in any order and on any thread, but each only once.
    """

    def reserve(self) -> Ticket:
        with self._lock:
            self._check_open()
            ticket = Ticket(self._epoch, self._counter, self._key)
            self._advance()
            return ticket

    def seal_into(self, ticket: Ticket, kind: int, buffer: int, offset: int, plaintext,
                  out: memoryview, *, shared: bool = True) -> Message:
        """Encrypt ``plaintext`` for destination (buffer, offset) into ``out``, which must
        be exactly ``len(plaintext) + 16`` bytes, under a reserved ticket. Returns the
        message. ``shared`` says ``out`` is attacker-visible memory (observers are told)."""
        if ticket.used:
            raise ArgumentError(f"{ticket!r} was already sealed: an IV is never used twice")
        _check_sizes(plaintext, out)
        self._check_open()
        ticket.used = True
        return self._seal(ticket.epoch, ticket.counter, ticket.key, kind, buffer, offset, plaintext, out, shared)

    def seal_next(self, kind: int, buffer: int, offset: int, plaintext, out: memoryview, *,
                  shared: bool = True) -> Message:
        """Reserve the next IV and seal under it at once (the on-demand path)."""
        _check_sizes(plaintext, out)
        with self._lock:
            self._check_open()
            epoch, counter, key = self._epoch, self._counter, self._key
            self._advance()
        return self._seal(epoch, counter, key, kind, buffer, offset, plaintext, out, shared)

    def _seal(self, epoch, counter, key, kind, buffer, offset, plaintext, out, shared) -> Message:
        aad = pack_header(self.direction, kind, self.session, epoch, counter, buffer, offset, len(plaintext))
        iv = iv_for(key.mask, counter)
        start = perf_counter()
        seal_into(key.aead, iv, plaintext, aad, out)
        elapsed = perf_counter() - start
        with self._lock:
            self.aes_s += elapsed
            self.messages += 1
        msg = Message(self.label, iv, bytearray(aad), out)
        if shared and shared_write_observers:
            publish(msg, key.key_id, epoch, counter)
        return msg


def _check_sizes(plaintext, out) -> None:
    length = len(plaintext)
    if length > MAX_MESSAGE_BYTES:
        raise ArgumentError(f"one message carries at most {MAX_MESSAGE_BYTES} bytes, got {length}")
    if len(out) != length + TAG_BYTES:
        raise ArgumentError(f"output must be exactly {length + TAG_BYTES} bytes, got {len(out)}")


class Opener(_Endpoint):
    """Authenticates and decrypts one direction's messages in strict order.

    It accepts only the message at its own expected (epoch, counter), for its session and
    direction, under its own IV; anything else, or a bad tag, closes the channel and
    raises :class:`IntegrityError`. Plaintext goes to ``staging`` (decryption writes it
    before the tag is checked), never to the destination: the caller commits it after
    ``open_into`` returns.
    """

    def open_into(self, msg: Message, staging: memoryview):
        """Return (header, plaintext view into ``staging``) of the next message."""
        with self._lock:
            self._check_open()
            epoch, counter = self._epoch, self._counter
            iv = iv_for(self._key.mask, counter)
            header = unpack_header(msg.aad)
            ok = (header is not None and header.direction == self.direction
                  and header.session == self.session and header.epoch == epoch
                  and header.counter == counter and header.kind == 0
                  and len(msg.payload) == header.length + TAG_BYTES
                  and header.length <= len(staging)
                  and msg.iv == iv)
            if ok:
                plain = staging[:header.length]
                start = perf_counter()
                ok = open_into(self._key.aead, iv, msg.payload, msg.aad, plain)
                self.aes_s += perf_counter() - start
            if not ok:
                error = IntegrityError(
                    f"{self.label} message {counter} (key epoch {epoch}, session {self.session}) "
                    f"failed authentication; the channel is closed")
                self.close(error)
                raise error
            self.messages += 1
            self._advance()
            return header, plain
