"""The host's end of one secured session with the device: what the cc and pipellm
engines share.

A :class:`SecureChannel` agrees the session's keys with the device, holds the sealer
(host to device) and the opener (device to host), the device's end of the session, the
bounce pools pinned for the device, and the error that closed the channel. Its parts are
the engines' members: the sender (``_sender.pyx``) and the receiver (``d2h.py``)
work through it; no engine inherits another.
"""

from __future__ import annotations

from .._ext import PAGE_BYTES, BouncePool
from ..channel import Direction, KeyAgreement, Opener, Sealer
from ..channel.protocol import TAG_BYTES
from ..errors import ArgumentError, ChannelClosedError, DeviceError, IntegrityError


def slot_bytes_for(chunk_size: int) -> int:
    """A slot holds one message (chunk + tag), rounded up to whole pages."""
    return -(-(chunk_size + TAG_BYTES) // PAGE_BYTES) * PAGE_BYTES


def make_pool(what: str, nbytes: int, max_message: int, minimum: int = 2) -> BouncePool:
    """A bounce pool of ``nbytes`` that holds at least ``minimum`` of the largest messages."""
    need = minimum * slot_bytes_for(max_message - TAG_BYTES)
    if nbytes < need:
        raise ArgumentError(f"{what}={nbytes} holds fewer than {minimum} messages of {max_message} bytes "
                            f"(chunk_size + 16, in whole pages): give it at least {need}")
    return BouncePool(nbytes)


class SecureChannel:
    """A session opened on ``device`` (keys rotated after ``rotate_after`` messages; the
    device accepts host-to-device indices in a ``window``, 0: strict order)."""

    def __init__(self, device, *, rotate_after: int, window: int = 0):
        self.device, self.window = device, window
        mine = KeyAgreement()
        #: the session's id, as the device's calls take it
        self.session, device_public = device.open_session(mine.public_bytes, rotate_after=rotate_after,
                                                          window=window)
        keys = mine.derive(device_public, session=self.session, host_public=mine.public_bytes,
                           device_public=device_public)
        self.sealer = Sealer(keys, Direction.H2D, rotate_after)
        self.opener = Opener(keys, Direction.D2H, rotate_after)
        self.device_end = device._session(self.session)  # the device's end (its failure)
        # everything failure() reads, each with a ``failure`` that is None while all is
        # well (fail() closes the sealer too): a request reads these in C and calls
        # failure() only when one is set
        self.sources = (self.sealer, self.opener, device, self.device_end)
        self.error: BaseException | None = None  # what closed the channel
        self.reported = False  # has a caller seen the error raised?
        self._pinned: list = []

    def fail(self, error: BaseException) -> None:
        """Close the channel, both ways, with ``error`` (the first error stays)."""
        if self.error is None:
            self.error = error
            self.opener.close(error)
            self.sealer.close(error)

    def failure(self) -> BaseException | None:
        """The error that closed the channel, on either side, if any."""
        if self.error is None and self.sealer.failure is not None:
            self.fail(self.sealer.failure)  # an on-demand encryption failed: its caller saw it raised
            self.reported = True
        if self.error is None and self.opener.failure is not None:
            self.fail(self.opener.failure)  # a decryption broke (maybe on a worker): report it
        if self.error is None:
            device_failure = self.device.failure or self.device_end.failure
            if isinstance(device_failure, (IntegrityError, DeviceError)):
                self.fail(device_failure)
        return self.error

    def raise_error(self, error: BaseException):
        """Raise ``error`` to a caller (noting when it is the channel's own)."""
        if error is self.error:
            self.reported = True
        raise error

    def pinned_pool(self, what: str, nbytes: int, max_message: int, minimum: int = 2) -> BouncePool:
        """A bounce pool (see make_pool) the device may DMA from directly (pinned for it
        until ``close``)."""
        pool = make_pool(what, nbytes, max_message, minimum)
        self.device.pin_host(pool.address, pool.cap_bytes)
        self._pinned.append(pool.address)
        return pool

    def close(self) -> BaseException:
        """Unpin the pools (before their memory is unmapped), close the device's end and
        both directions; the error later use of the channel meets."""
        for address in self._pinned:
            self.device.unpin_host(address)
        self._pinned.clear()
        self.device.close_session(self.session)
        error = ChannelClosedError("the pipeline was closed")
        self.sealer.close(error)
        self.opener.close(error)
        return error

    def stats(self) -> dict:
        sealer, opener = self.sealer, self.opener
        return {"messages_h2d": sealer.messages, "messages_d2h": opener.messages,
                "encrypt_s": sealer.aes_s, "decrypt_s": opener.aes_s,
                "encrypt_bytes": sealer.bytes, "decrypt_bytes": opener.bytes,
                "key_rotations": sealer.rotations + opener.rotations}
