"""``mode="cc"``: confidential computing as the vanilla driver does it.

Host to device: on the calling thread, each chunk is encrypted into a bounce slot and
handed to the device at once, so earlier chunks are on the link while later ones are
being encrypted; the call returns when the last chunk is encrypted (``_sender.pyx``).
Device to host: the device seals each chunk into a bounce slot; the host authenticates
and decrypts the chunks when a caller needs them (``d2h.py``).

The engine is its parts: the secure channel (``secure.py``), one bounce pool for both
directions, the sender and the receiver. The pipellm engine holds a ``CCEngine`` as a
member and sends and receives with its parts.
"""

from __future__ import annotations

from ..channel.protocol import TAG_BYTES
from ._request import Engine
from ._sender import Sender
from .d2h import Receiver
from .secure import SecureChannel
from .transfer import Transfer


class CCEngine(Engine):
    mode = "cc"

    def __init__(self, device, *, timeout: float | None, chunk_size: int, bounce_bytes: int,
                 rotate_after: int, window: int = 0):
        channel = SecureChannel(device, rotate_after=rotate_after, window=window)
        super().__init__(channel.sources)
        self.device, self.timeout, self.chunk_size = device, timeout, chunk_size
        self.channel = channel
        self.pool = channel.pinned_pool("bounce_bytes", bounce_bytes, chunk_size + TAG_BYTES)
        self.sender = Sender(channel, self.pool, chunk_size=chunk_size, timeout=timeout)
        self.receiver = Receiver(channel, self.pool, chunk_size=chunk_size, timeout=timeout)

    @property
    def session(self) -> int:
        """The channel's session id (what the device's calls take)."""
        return self.channel.session

    @property
    def failure_reported(self) -> bool:
        """Has a caller seen the channel's error raised?"""
        return self.channel.reported

    @failure_reported.setter
    def failure_reported(self, value: bool) -> None:
        self.channel.reported = value

    def to_device(self, region, offset, nbytes, dst, dst_offset, stream) -> None:
        sender = self.sender
        with sender.lock:
            sender.order += 1
            sender.send_data(region, offset, nbytes, dst, dst_offset, stream)
            self.transfers_h2d += 1
            self.bytes_h2d += nbytes

    def to_host(self, src, src_offset, region, offset, nbytes, stream) -> Transfer:
        transfer = self.receiver.to_host(src, src_offset, region, offset, nbytes, stream)
        self.transfers_d2h += 1
        self.bytes_d2h += nbytes
        return transfer

    def failure(self) -> BaseException | None:
        """The error that closed the channel, on either side, if any."""
        return self.channel.failure()

    def wait_speculation(self, timeout=None) -> bool:
        return True  # (nothing is encrypted ahead)

    def drain(self, timeout) -> None:
        """Receive every expected device-to-host chunk."""
        self.receiver.drain(timeout)

    def adopt(self, region) -> None:
        """A region was registered."""

    def forget(self, region) -> None:
        """The region is being unregistered."""

    def close(self) -> None:
        self.receiver.close(self.channel.close())
        self.pool.close()

    def stats(self) -> dict:
        """The counters of this engine's own requests, the channel's and the pool's."""
        pool = self.pool
        return {"transfers_h2d": self.transfers_h2d, "transfers_d2h": self.transfers_d2h,
                "bytes_h2d": self.bytes_h2d, "bytes_d2h": self.bytes_d2h, **self.channel.stats(),
                "bounce": {"cap_bytes": pool.cap_bytes, "in_use_bytes": pool.in_use,
                           "high_water_bytes": pool.high_water, "pinned": pool.pinned}}
