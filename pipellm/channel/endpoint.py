"""Channel endpoints: a :class:`Sealer` per sending direction, an :class:`Opener` per
receiving one, and the :class:`Message` that crosses the untrusted link between them.

The host seals host-to-device messages and opens device-to-host ones; the device does
the mirror image, with the same classes.
"""

from __future__ import annotations

from time import perf_counter
from typing import NamedTuple

from .. import timeline
from ._message import Endpoint, Message, Ticket, publish, shared_write_observers  # noqa: F401 - re-exported
from ._message import expose as _expose
from ._message import reserve_run as _reserve_run
from ..errors import ArgumentError, ChannelClosedError, IntegrityError
from .cipher import open_into, seal_into
from .keys import EpochKey, SessionKeys
from .protocol import (
    MAX_MESSAGE_BYTES,
    TAG_BYTES,
    Direction,
    Kind,
    iv_for,
    pack_header,
    position,
    unpack_header,
)

class Claim(NamedTuple):
    """A received message checked and given its index, not yet authenticated
    (:meth:`Opener.claim`)."""

    header: object  # protocol.Header
    index: int
    key: EpochKey
    iv: bytes
    aad: bytes


class Destination(NamedTuple):
    """Where a message says its plaintext goes: a device buffer id (h2d) or a host
    region id (d2h), a byte offset and a length."""

    buffer: int
    offset: int
    length: int


class _Endpoint(Endpoint):
    """Shared state of a sealer or opener: one direction of one session.

    Messages are numbered 0, 1, 2, ... per direction; ``protocol.position`` maps an index
    to its (epoch, counter), so rotation is implicit."""

    def __init__(self, keys: SessionKeys, direction: Direction, rotate_after: int):
        self.direction = Direction(direction)
        super().__init__(self.direction.label, rotate_after)  # (the fields the extensions read)
        self._keys = keys
        self.session = keys.session
        self.aes_s = 0.0  # time spent inside the AES-GCM calls
        self.bytes = 0    # plaintext bytes through them

    def _key_at(self, index: int) -> tuple[int, int, EpochKey]:
        epoch, counter = position(index, self.rotate_after)
        return epoch, counter, self._keys.epoch_key(self.direction, epoch)

    def close(self, reason: BaseException) -> None:
        if self.failure is None:
            self.failure = reason

    def _broke(self, doing: str, index: int, error: BaseException, why: str) -> None:
        """The AES step itself raised (not a refusal): close, naming it."""
        self.close(ChannelClosedError(
            f"{doing} {self.label} message {index} failed ({type(error).__name__}: {error}); "
            f"{why}: open a new session"))

    def _check_open(self) -> None:
        if self.failure is not None:
            raise ChannelClosedError(f"{self.label} channel is closed: {self.failure}") from self.failure

    @property
    def next_index(self) -> int:
        return self._next

    @property
    def rotations(self) -> int:
        """Key epochs moved through so far."""
        return max(self._next - 1, 0) // self.rotate_after


class Sealer(_Endpoint):
    """Encrypts one direction's messages, handing out each IV exactly once.

    ``reserve()`` assigns the next index in order; ``seal_into`` encrypts one plaintext
    under a reserved ticket straight into ``out`` (a bounce slot). Tickets may be sealed
    in any order and on any thread, but each only once. ``seal_next`` reserves and
    seals at once (the on-demand path).
    """

    def reserve(self) -> Ticket:
        """The next ticket."""
        return self.reserve_run(1)[0]

    # ``count`` consecutive tickets (C: a plan reserves a run per predicted transfer)
    reserve_run = _reserve_run

    def seal_into(self, ticket: Ticket, kind: int, buffer: int, offset: int, plaintext,
                  out: memoryview, *, shared: bool = True, order: int = 0, flags: int = 0,
                  recoverable: bool = False) -> Message:
        """Encrypt ``plaintext`` for destination (buffer, offset) into ``out``, which must
        be exactly ``len(plaintext) + 16`` bytes, under a reserved ticket. Returns the
        message. ``shared`` says ``out`` is attacker-visible memory (observers are told);
        ``order`` is the number of the request it serves, ``flags`` its place in it
        (FIRST, LAST: see the protocol).

        If the encryption fails, the ticket is spent and the sealer closes, unless the
        caller says it can pass the lost index itself (``recoverable``: speculative work
        that a SKIP or the IV window will step over)."""
        if ticket.used:
            raise ArgumentError(f"{ticket!r} was already sealed: an IV is never used twice")
        _check_sizes(plaintext, out)
        self._check_open()
        if shared:
            ticket.used = True
        # a private seal (shared=False) leaves the ticket usable: ciphertext that never
        # reached shared memory may be replaced under the same IV (see expose)
        try:
            return self._seal(ticket.epoch, ticket.counter, ticket.key, kind, buffer, offset, plaintext, out,
                              shared, order, flags)
        except BaseException as error:
            if shared and not recoverable:
                self._spent(ticket.index, error)
            raise

    # (C: a speculative hit exposes its GO command on the request path)
    expose = _expose

    def seal_next(self, kind: int, buffer: int, offset: int, plaintext, out: memoryview, order: int = 0,
                  flags: int = 0) -> Message:
        """Reserve the next index and seal under it at once, into shared memory ``out``."""
        _check_sizes(plaintext, out)
        with self._lock:
            self._check_open()
            index = self._next
            self._next += 1
        epoch, counter, key = self._key_at(index)
        try:
            return self._seal(epoch, counter, key, kind, buffer, offset, plaintext, out, True, order, flags)
        except BaseException as error:
            self._spent(index, error)
            raise

    def _spent(self, index: int, error: BaseException) -> None:
        """An encryption failed: its IV may be half-written into shared memory, so it is
        never used again, and the receiver's strict order can't pass it: end here."""
        self._broke("encrypting", index, error, "its IV is spent, so the channel can't go on")

    def _seal(self, epoch, counter, key, kind, buffer, offset, plaintext, out, shared, order, flags=0) -> Message:
        aad = pack_header(self.direction, kind, self.session, epoch, counter, buffer, offset, len(plaintext),
                          order, flags)
        iv = iv_for(key.mask, counter)
        start = perf_counter()
        self._encrypt(key, iv, kind, plaintext, aad, out)
        elapsed = perf_counter() - start
        if timeline.recording:
            timeline.span("encrypt", start, start + elapsed)
        with self._lock:
            self.aes_s += elapsed
            self.bytes += len(plaintext)
            if shared:  # a private seal is not a message until it is exposed
                self.messages += 1
        msg = Message(self.label, iv, bytearray(aad), out)
        if shared and shared_write_observers:
            publish(msg, key.key_id, epoch, counter)
        return msg

    def _encrypt(self, key: EpochKey, iv: bytes, kind: int, plaintext, aad: bytes, out: memoryview) -> None:
        """The AES-GCM step (an engine with its own AES, the GPU's, overrides it)."""
        seal_into(key.aead, iv, plaintext, aad, out)


def _check_sizes(plaintext, out) -> None:
    length = len(plaintext)
    if length > MAX_MESSAGE_BYTES:
        raise ArgumentError(f"one message carries at most {MAX_MESSAGE_BYTES} bytes, got {length}")
    if len(out) != length + TAG_BYTES:
        raise ArgumentError(f"output must be exactly {length + TAG_BYTES} bytes, got {len(out)}")


class Opener(_Endpoint):
    """Authenticates and decrypts one direction's messages.

    ``window=0`` (strict, the H100's rule): it accepts only the message at its own
    expected index. ``window=W``: any index not used before, up to W behind the highest
    one accepted (an anti-replay bitmap, as in IPsec/DTLS). In both, the IV and key come
    from the receiver's own computation, the session and direction must be its own, and
    the kind must be one of ``kinds``. Anything else, or a bad tag, closes the channel
    and raises :class:`IntegrityError`. Plaintext goes to ``staging`` (decryption writes
    it before the tag is checked), never to the destination: the caller commits it after
    ``open_into`` returns.
    """

    def __init__(self, keys: SessionKeys, direction: Direction, rotate_after: int, *,
                 window: int = 0, kinds: frozenset = frozenset({Kind.DATA})):
        super().__init__(keys, direction, rotate_after)
        self.window = window
        self.kinds = kinds
        self._high = -1    # window: highest index accepted
        self._seen = 0     # window: bit i set = index (high - i) was accepted

    def open_into(self, msg: Message, staging: memoryview):
        """Return (header, index, plaintext view into ``staging``) of the next message."""
        claim = self.claim(msg, len(staging))
        return claim.header, claim.index, self.finish(claim, msg.payload, staging[:claim.header.length])

    def claim(self, msg: Message, room: int) -> Claim:
        """Check the next message against this receiver's own position (header, session,
        direction, epoch, counter, kind, IV, length within ``room``) and take its index,
        so the message after it can be claimed while this one is decrypted
        (:meth:`finish`, on any thread). A refusal closes the channel and raises
        :class:`IntegrityError`. Whoever claims must commit plaintext in claim order, and
        only once every message claimed before has finished: a later one's tag may verify
        while an earlier one's fails."""
        with self._lock:
            self._check_open()
            aad = bytes(msg.aad)  # read shared memory once: what is checked is what is authenticated
            header = unpack_header(aad)
            if self.window:
                index = (-1 if header is None else header.epoch * self.rotate_after + header.counter)
                fresh = self._fresh(index)
            else:
                index, fresh = self._next, True
            epoch, counter = position(max(index, 0), self.rotate_after)
            ok = (fresh and header is not None and header.direction == self.direction
                  and header.session == self.session and header.epoch == epoch
                  and header.counter == counter and header.kind in self.kinds
                  and len(msg.payload) == header.length + TAG_BYTES
                  and header.length <= room)
            if ok:
                key = self._keys.epoch_key(self.direction, epoch)
                iv = iv_for(key.mask, counter)
                ok = msg.iv == iv
            if not ok:
                claimed = -1 if header is None else header.epoch * self.rotate_after + header.counter
                lost = (f": what came in its place claims to be message {claimed}, so message {index} was "
                        f"lost or withheld" if not self.window and claimed > index else "")
                self._refuse(index, lost)
            self._accept(index)
            return Claim(header, index, key, iv, aad)

    def finish(self, claim: Claim, payload, plain):
        """Authenticate and decrypt a claimed message's ``payload`` (ciphertext || tag)
        into ``plain`` (staging, never the destination); the plaintext. A bad tag closes
        the channel and raises :class:`IntegrityError`."""
        header, index = claim.header, claim.index
        start = perf_counter()
        try:
            out = self._decrypt(claim.key, claim.iv, index, header.kind, payload, claim.aad, plain)
        except Exception as error:  # not a refusal: the decryption itself broke
            self._broke("decrypting", index, error, "the channel can't go on")
            raise
        elapsed = perf_counter() - start
        with self._lock:
            if out is None:
                self._refuse(index, "")
            self.aes_s += elapsed
            self.bytes += header.length
            self.messages += 1
        if timeline.recording:
            timeline.span("decrypt", start, start + elapsed)
        return out

    def _refuse(self, index: int, why: str) -> None:
        """Close the channel over message ``index`` and raise (lock held)."""
        where = f"message {index}" if index >= 0 else "a malformed message"
        error = IntegrityError(f"{self.label} {where} (session {self.session}) failed authentication{why}; "
                               f"the channel is closed")
        self.close(error)
        raise error

    def _decrypt(self, key: EpochKey, iv: bytes, index: int, kind: int, payload, aad: bytes, plain):
        """The AES-GCM step for message ``index``: authenticate ``payload`` (ciphertext ||
        tag) with ``aad`` and decrypt it into ``plain``; the plaintext, or None where the
        tag is wrong (an engine with its own AES overrides it)."""
        return plain if open_into(key.aead, iv, payload, aad, plain) else None

    def accepted(self, index: int) -> bool:
        """Message ``index`` was received (or can no longer be: behind the window)."""
        with self._lock:
            if not self.window:
                return 0 <= index < self._next
            return index >= 0 and not self._fresh(index)

    def _fresh(self, index: int) -> bool:
        if index < 0:
            return False
        if index > self._high:
            return True
        behind = self._high - index
        return behind < self.window and not (self._seen >> behind) & 1

    def _accept(self, index: int) -> None:
        if not self.window:
            self._next = index + 1
        elif index > self._high:
            shift = index - self._high
            self._seen = ((self._seen << shift) | 1) & ((1 << self.window) - 1)
            self._high = index
            self._next = index + 1
        else:
            self._seen |= 1 << (self._high - index)

    def skip_to(self, index: int) -> None:
        """Strict order only: the next message expected is ``index`` (a SKIP command)."""
        with self._lock:
            if self.window or index < self._next:
                error = IntegrityError(f"{self.label} SKIP to {index} refused (expected >= {self._next}); "
                                       f"the channel is closed")
                self.close(error)
                raise error
            self._next = index
