"""The one definition of pipellm's confidential-channel protocol (version 2).

Every engine that speaks the channel imports it from here: the host endpoint, the
emulated device's copy engine and (later) the GPU kernels. Two copies of this layout
would be two protocols.

Message on the untrusted link::

    header (56 bytes, sent in clear, authenticated as AES-GCM associated data)
    ciphertext (length bytes) || tag (16 bytes)

Header layout, big-endian (``HEADER``)::

    magic    4s  b"PLM2"
    dir      B   0 = host to device, 1 = device to host
    kind     B   0 = DATA (other kinds are reserved for the speculative pipeline)
    flags    H   host-to-device DATA: FIRST (1) and LAST (2) mark the first and last
                 message of a transfer (a transfer of one message carries both);
                 ABANDON (4, DATA FIRST or GO, window order) says the host gave up the
                 transfer before this one part-way. 0 in every other message. Unknown
                 bits are refused.
    session  I   session id chosen by the device at key agreement
    epoch    I   key epoch (key rotation: see ``next_position``)
    counter  Q   message counter within the epoch, +1 per message per direction
    buffer   Q   destination: device buffer id (h2d) or host region id (d2h)
    offset   Q   destination byte offset
    length   Q   plaintext length
    order    Q   host-to-device: the number of the transfer request this message serves
                 (DATA and GO; 0 in SPEC and SKIP, and in GO commands sealed ahead)

IV (96 bits) = ``mask XOR counter`` with the counter in the low 64 bits, where ``mask``
is the 12-byte IV mask of the (direction, epoch). The receiver never trusts the IV or the
counter it is sent: it uses its own expected position and refuses anything else (with
``iv_order="window"``: any not-yet-used position in a sliding window). In window order
positions no longer tell request order, so the receiver also refuses a message whose
``order`` is below one it already took (SPEC messages take their GO's): a delayed
transfer can never land over a later one.

Speculative messages (``Kind.SPEC``) are sealed before they are requested and sit in
shared memory; they name no destination and land only where an authenticated GO
command, sealed at request time, sends them. SKIP moves the receiver's expected index
past speculative messages that will never be sent (the strict-order "NOP").

A transfer is committed whole or not at all: the receiver stages its messages (a DATA
run from FIRST to LAST, contiguous in its destination, or the SPEC messages of one GO)
and commits them only once the last one has authenticated. A message of another
transfer, or a command, arriving while one is open means either that the host abandoned
it part-way (strict order: the indices prove nothing of it was lost; window order: the
new transfer says so with ABANDON) and it is discarded, or that a message of it was
lost: the channel closes.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple

MAGIC = b"PLM2"  # protocol version 2 (version 1 had no order field)
KEY_BYTES = 32
IV_BYTES = 12
TAG_BYTES = 16
HEADER = struct.Struct(">4sBBHIIQQQQQ")
HEADER_BYTES = HEADER.size  # 56
COUNTER_LIMIT = 1 << 64
EPOCH_LIMIT = 1 << 32
#: Messages per key before rotation: a 32-bit counter, as in NVIDIA's CC channels.
DEFAULT_ROTATE_AFTER = 1 << 32
#: Largest plaintext of one message (GCM allows 2**36 - 32 bytes; we stay well below).
MAX_MESSAGE_BYTES = 1 << 32

# byte offsets of fields inside the header, for in-place rewrites (Message.dst setter)
_BUFFER_AT = 24


class Direction(IntEnum):
    H2D = 0
    D2H = 1

    @property
    def label(self) -> str:
        return "h2d" if self is Direction.H2D else "d2h"


#: DATA flags (authenticated with the header): the first and the last message of a transfer
FIRST = 1
LAST = 2
#: on a transfer's first message (DATA or GO): the host abandoned the transfer before it
#: part-way (a local failure it raised to its caller); the receiver discards what it staged
#: of that one. Window order only: in strict order the indices already prove that nothing
#: of the open transfer was lost, so a new transfer simply replaces it.
ABANDON = 4
_FLAGS_KNOWN = FIRST | LAST | ABANDON


class Kind(IntEnum):
    """What a message is. Only DATA travels device to host."""

    DATA = 0  # plaintext for the destination the header names
    SPEC = 1  # speculative data, sealed before its request: lands only where a GO sends it
    GO = 2    # command: the next `count` messages are SPEC data for (buffer, offset)
    SKIP = 3  # command: the receiver's next expected message index becomes `target`


#: GO plaintext: destination buffer id, destination offset, SPEC messages that follow, their total bytes
GO_BODY = struct.Struct(">QQIQ")
#: SKIP plaintext: the message index the receiver expects next
SKIP_BODY = struct.Struct(">Q")


class Header(NamedTuple):
    direction: int
    kind: int
    session: int
    epoch: int
    counter: int
    buffer: int
    offset: int
    length: int
    order: int = 0
    flags: int = 0


def pack_header(direction: int, kind: int, session: int, epoch: int, counter: int,
                buffer: int, offset: int, length: int, order: int = 0, flags: int = 0) -> bytes:
    """Header bytes (the AAD) of one message; the hot path calls this, not ``Header``."""
    return HEADER.pack(MAGIC, direction, kind, flags, session, epoch, counter, buffer, offset, length, order)


def unpack_header(aad) -> Header | None:
    """Parse header bytes; None where they are not a version-2 header (wrong size/magic/flags)."""
    if len(aad) != HEADER_BYTES:
        return None
    magic, direction, kind, flags, session, epoch, counter, buffer, offset, length, order = HEADER.unpack(aad)
    if magic != MAGIC or flags & ~_FLAGS_KNOWN:
        return None
    return Header(direction, kind, session, epoch, counter, buffer, offset, length, order, flags)


def rewrite_destination(aad: bytearray, buffer: int, offset: int, length: int) -> None:
    """Overwrite the destination fields of header bytes in place."""
    struct.pack_into(">QQQ", aad, _BUFFER_AT, buffer, offset, length)


def iv_for(mask: int, counter: int) -> bytes:
    """The 96-bit IV of ``counter`` under a 12-byte IV mask given as an int."""
    return (mask ^ counter).to_bytes(IV_BYTES, "big")


def position(index: int, rotate_after: int) -> tuple[int, int]:
    """(epoch, counter) of a direction's ``index``-th message: the rotation rule.

    A direction's messages are numbered 0, 1, 2, ... Message ``index`` is sealed under
    the key of epoch ``index // rotate_after`` with counter ``index % rotate_after``, so a
    key moves to the next epoch (a fresh key) every ``rotate_after`` messages and no IV
    repeats under a key. Both endpoints follow this rule; no rotation message is needed.
    """
    return divmod(index, rotate_after)


def check_rotate_after(rotate_after: int) -> int:
    from ..errors import ArgumentError, ArgumentTypeError

    if isinstance(rotate_after, bool) or not isinstance(rotate_after, int):
        raise ArgumentTypeError(f"rotate_after must be an int, got {type(rotate_after).__name__}")
    if not 1 <= rotate_after <= COUNTER_LIMIT:
        raise ArgumentError(f"rotate_after must be in 1..2**64 messages per key, got {rotate_after}")
    return rotate_after
